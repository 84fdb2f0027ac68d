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
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace tokenizer files already in --output-dir (default: refuse, before any work).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import DataConfig, load_text_dataset, train_bpe_tokenizer

    if args.max_documents is not None and args.max_documents < 1:
        raise ValueError(f"--max-documents must be a positive integer, got {args.max_documents}.")
    check_output_dir(args.output_dir, args.overwrite)
    config = DataConfig(dataset=args.data, dataset_config=args.dataset_config, train_split=args.split,
                        text_column=args.text_column, streaming=args.streaming,
                        validation_size=1 if args.streaming else None)
    split = load_text_dataset(config)["train"]
    texts = (row[args.text_column] for row in islice(iter(split), args.max_documents))
    tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Saved a byte-level BPE tokenizer of {len(tokenizer)} tokens to {args.output_dir}")
    return 0


# What `save_pretrained` of the trained tokenizer writes (and would silently replace).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse, before the corpus is read, an --output-dir that is a file, or that holds tokenizer files
    already unless --overwrite is given."""
    import os

    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path!r} is a file; expected a folder for the tokenizer files.")
    existing = [name for name in TOKENIZER_FILES if os.path.exists(os.path.join(path, name))]
    if existing and not overwrite:
        raise ValueError(f"--output-dir {path!r} already holds a tokenizer ({', '.join(existing)}); pass "
                         "--overwrite to replace it, or choose another folder.")
