"""`sfdlm eval`: perplexity of a saved model on a text file or a dataset split.

    sfdlm eval path/to/model --text-file ../shared/data/ptb/ptb.test.txt --nelbo-samples 16
    sfdlm eval path/to/model --dataset wikitext --dataset-config wikitext-2-raw-v1 --split test --json out.json

Prints token-level perplexity (naming the tokenizer), word-level perplexity (PTB/WikiText convention)
and bits per byte, each with its Monte Carlo standard error, for SFDLM, the Transformer denoiser of
`hf_sfdlm.baselines` (NELBO bounds) or any transformers causal LM (exact).
"""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    from ..remote_code import TRUST_REMOTE_CODE_HELP
    from ._common import UNK_WARNING_SHARE, add_threads_argument

    parser = subparsers.add_parser("eval", help="NELBO / exact perplexity of a model on a text file or dataset.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder or Hub id, org/name (SFDLM, Transformer denoiser, or a causal LM)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text-file", help="UTF-8 text file, one line per sentence/paragraph (this or --dataset; "
                                            "default: none)")
    source.add_argument("--dataset", help="a `datasets` name or local data folder (this or --text-file; default: none)")
    parser.add_argument("--dataset-config", help="dataset configuration name (default: none)")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--text-column", default="text", help="dataset column holding the text (default: text)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    parser.add_argument("--max-lines", type=int, help="score only the first N lines, a fixed subset (default: all)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="tokens per independently scored block (default: 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per forward pass (default: 16)")
    parser.add_argument("--nelbo-samples", type=int, default=16,
                        help="Monte Carlo noise levels t drawn per block for diffusion NELBOs; more samples, "
                             "smaller error bars (default: 16)")
    parser.add_argument("--nelbo-estimator", default="auto",
                        help="how the NELBO's noise draws are chosen, one of hf_sfdlm.diffusion.NELBO_ESTIMATORS "
                             "(auto, masked_count, importance, uniform_t): 'auto' picks the finite-variance masked "
                             "count where it applies; 'uniform_t' is the historical estimator (default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise levels drawn (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_threads_argument(parser)
    parser.add_argument("--json", dest="json_path", help="also write the full result as JSON here (default: no)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json file (default: refuse, before any work)")
    parser.add_argument("--max-unk-share", type=float, default=UNK_WARNING_SHARE,
                        help="warn when more than this share of the text's tokens are the tokenizer's unknown "
                             f"token (default: {UNK_WARNING_SHARE})")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on stderr)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ._common import check_device, check_model_location, check_seed, set_cpu_threads

    for name in ("block_size", "batch_size", "nelbo_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.max_lines is not None and args.max_lines < 1:
        raise ValueError(f"--max-lines must be a positive integer, got {args.max_lines}.")
    check_seed(args.seed)
    check_json_path(args.json_path, args.overwrite)
    model_path = check_model_location(args.model, "model")
    tokenizer_path = check_model_location(args.tokenizer, "--tokenizer", bare_ids=True) if args.tokenizer else \
        adapter_base_tokenizer(model_path) or model_path
    if args.text_file and not os.path.isfile(args.text_file):
        raise ValueError(f"--text-file {args.text_file!r} does not exist.")
    check_device(args.device)

    from ..evaluation import evaluate_perplexity, load_model, read_text
    from ..hub import load_tokenizer

    from ._common import quiet_expected_warnings

    quiet_expected_warnings()
    set_cpu_threads(args.threads)
    if args.text_file:
        text = read_text(args.text_file, max_lines=args.max_lines)
    else:
        from datasets import load_dataset

        dataset = load_dataset(args.dataset, args.dataset_config, split=args.split)
        text = read_text(dataset, text_column=args.text_column, max_lines=args.max_lines)
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=args.trust_remote_code)
    model = load_model(model_path, device=args.device, trust_remote_code=args.trust_remote_code)
    result = evaluate_perplexity(model, tokenizer, text, block_size=args.block_size, batch_size=args.batch_size,
                                 num_samples=args.nelbo_samples, seed=args.seed, progress=not args.no_progress,
                                 estimator=args.nelbo_estimator)
    print(f"model: {args.model} ({type(model).__name__}), tokenizer: {result.tokenizer}")
    print(f"estimator: {'NELBO upper bound, ' + str(result.num_samples) + ' t samples per block' if result.estimator == 'nelbo' else 'exact'}; "
          f"{result.num_sequences} blocks of {result.block_size} tokens; {result.num_tokens} tokens, "
          f"{result.num_words} words, {result.num_bytes} bytes")
    print(f"unknown tokens: {result.num_unk_tokens} ({result.unk_share:.2%} of the text's tokens)")
    for label, name in (("token perplexity", "token_perplexity"), ("word perplexity", "word_perplexity"),
                        ("bits per byte", "bits_per_byte"), ("nats per token", "nll_per_token")):
        print(f"{label:>17}: {getattr(result, name):.4f} ± {result.stderr(name):.4f}")
    if result.unk_share > args.max_unk_share:
        print(f"warning: {result.unk_share:.1%} of the text's tokens are {tokenizer.unk_token!r}: the tokenizer does "
              "not cover this text, so these figures say little about the model (scoring an unknown token is "
              "easy). Evaluate with a tokenizer trained on similar text.", file=sys.stderr)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"model": args.model, **result.to_dict()}, handle, indent=1)
    return 0


def check_json_path(path: str | None, overwrite: bool) -> None:
    """Refuse, before any work, a --json path that could not be written at the end: its folder does not
    exist, it is a folder, or it exists and --overwrite is not given."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--json {path!r}: the folder {folder!r} does not exist; create it first.")
    if os.path.isdir(path):
        raise ValueError(f"--json {path!r} is a folder; expected a file name such as result.json.")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"--json {path!r} exists; pass --overwrite to replace it, or choose another name.")


def adapter_base_tokenizer(model_path: str) -> str | None:
    """For a local adapter folder without tokenizer files (as `hf_sfdlm.lora.save_adapter` writes it),
    the base model it names, whose tokenizer it uses; None otherwise."""
    config = os.path.join(model_path, "adapter_config.json")
    if not os.path.isfile(config) or any(os.path.isfile(os.path.join(model_path, name))
                                         for name in ("tokenizer_config.json", "tokenizer.json")):
        return None
    with open(config, encoding="utf-8") as handle:
        try:
            base = json.load(handle).get("base_model_name_or_path")
        except (ValueError, AttributeError):
            return None
    return base if isinstance(base, str) and base else None
