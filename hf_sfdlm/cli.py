"""The `sfdlm` command line: one subcommand per job, each defined in its own module.

Each module named in `SUBCOMMANDS` exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed arguments). Modules are imported lazily so `sfdlm --help` stays fast
and a job's heavy dependencies load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": "hf_sfdlm.commands.train",
    "train-tokenizer": "hf_sfdlm.commands.train_tokenizer",
    "generate": "hf_sfdlm.commands.generate",
    "infill": "hf_sfdlm.commands.generate",
    "finetune": "hf_sfdlm.commands.finetune",
    "push": "hf_sfdlm.commands.push",
    "eval": "hf_sfdlm.commands.evaluate",
    "lm-eval": "hf_sfdlm.lm_eval",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfdlm", description="State Fourier Diffusion Language Models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    modules = {SUBCOMMANDS[chosen]} if chosen in SUBCOMMANDS else dict.fromkeys(SUBCOMMANDS.values())
    for name in modules:
        try:
            importlib.import_module(name).register(subparsers)
        except ModuleNotFoundError as error:  # a job whose optional dependencies are not installed
            if chosen in SUBCOMMANDS:
                raise SystemExit(f"sfdlm {chosen}: missing dependency {error.name!r}; "
                                 "install the extras with `pip install 'hf-sfdlm[train]'`.") from error
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # every further flag belongs to lm-evaluation-harness's own parser
        return importlib.import_module(SUBCOMMANDS["lm-eval"]).main(argv[1:])
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if not argv else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
