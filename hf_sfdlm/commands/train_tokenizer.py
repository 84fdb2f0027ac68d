"""`sfdlm train-tokenizer`: train a byte-level BPE tokenizer on a corpus and save it in Hugging Face format.

    sfdlm train-tokenizer --data corpus.txt --vocab-size 8192 --output-dir tokenizers/my-bpe
    sfdlm train-tokenizer --data Salesforce/wikitext --dataset-config wikitext-103-raw-v1 --output-dir tok

The result has `[PAD]`, `[MASK]` and `[EOS]` as ids 0, 1, 2 and loads with `AutoTokenizer.from_pretrained`;
pass it to training with `sfdlm train --tokenizer tokenizers/my-bpe`.
"""

from __future__ import annotations

import argparse
from itertools import islice


def register(subparsers) -> None:
    parser = subparsers.add_parser("train-tokenizer", help="Train a byte-level BPE tokenizer on a corpus.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Text/JSON lines/CSV/Parquet file or folder, or a Hub dataset (required).")
    parser.add_argument("--dataset-config", help="Configuration name of a Hub dataset (default: none).")
    parser.add_argument("--split", default="train", help="Split to read (default: train).")
    parser.add_argument("--text-column", default="text", help="Column holding the text (default: text).")
    parser.add_argument("--streaming", action="store_true", help="Stream the corpus instead of loading it.")
    parser.add_argument("--max-documents", type=int, help="Read at most this many documents (default: all).")
    parser.add_argument("--vocab-size", type=int, default=8192, help="Vocabulary size, special tokens included (default: 8192).")
    parser.add_argument("--min-frequency", type=int, default=2, help="Minimum pair frequency of a merge (default: 2).")
    parser.add_argument("--output-dir", required=True, help="Folder for the tokenizer files.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import DataConfig, load_text_dataset, train_bpe_tokenizer

    if args.max_documents is not None and args.max_documents < 1:
        raise ValueError(f"--max-documents must be a positive integer, got {args.max_documents}.")
    config = DataConfig(dataset=args.data, dataset_config=args.dataset_config, train_split=args.split,
                        text_column=args.text_column, streaming=args.streaming,
                        validation_size=1 if args.streaming else None)
    split = load_text_dataset(config)["train"]
    texts = (row[args.text_column] for row in islice(iter(split), args.max_documents))
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Saved a byte-level BPE tokenizer of {len(tokenizer)} tokens to {args.output_dir}")
    return 0
