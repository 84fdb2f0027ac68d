"""The `sfdlm` command line: one subcommand per job, each defined in its own module.

Each module named in `SUBCOMMANDS` exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed arguments). Only the chosen command's module is imported, so `sfdlm
--help` loads neither torch nor transformers and a job's heavy dependencies load only when it runs.

Errors. A mistake the user can fix (a bad argument, a missing or malformed file, bad data, a model
folder that does not exist: `ValueError`, `OSError` and argparse errors) prints one line,
`sfdlm <command>: error: <message>`, and exits with status 2; `--debug` (or `SFDLM_DEBUG=1`) shows
the traceback as well. Any other exception is a bug and keeps its traceback. Ctrl-C exits with status
130 and, for training commands, prints the command that resumes the run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

# command: (module defining it, one-line summary for `sfdlm --help`)
SUBCOMMANDS = {
    "train": ("hf_sfdlm.commands.train", "Train an SFDLM (default: tiny preset on the synthetic corpus)."),
    "train-tokenizer": ("hf_sfdlm.commands.train_tokenizer", "Train a byte-level BPE tokenizer on a corpus."),
    "generate": ("hf_sfdlm.commands.generate", "Continue a prompt by iterative denoising."),
    "infill": ("hf_sfdlm.commands.generate", "Fill the [MASK]s of a text."),
    "finetune": ("hf_sfdlm.commands.finetune", "LoRA fine-tuning: domain text or instruction (SFT) data."),
    "push": ("hf_sfdlm.commands.push", "Upload a model or adapter folder to the Hugging Face Hub."),
    "eval": ("hf_sfdlm.commands.evaluate", "NELBO / exact perplexity of a model on a text file or dataset."),
    "lm-eval": ("hf_sfdlm.lm_eval", "lm-evaluation-harness with the `sfdlm` model registered (flags pass through)."),
}
# Commands whose Ctrl-C message says how to continue (they checkpoint and accept --resume).
RESUMABLE = ("train", "finetune")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandLineError(Exception):
    """An argparse error, raised instead of printed so `main` reports every mistake the same way."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message and exits; we report it in one line
        raise CommandLineError(f"{message} (see `{self.prog} --help`)")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: the chosen command's module is imported and registers its options; the
    other commands are listed by name and summary only."""
    parser = _Parser(prog="sfdlm", description="State Fourier Diffusion Language Models.",
                     epilog="Run `sfdlm COMMAND --help` for a command's options. --debug (or SFDLM_DEBUG=1) "
                            "shows the traceback of an error.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    if chosen in SUBCOMMANDS:
        module = SUBCOMMANDS[chosen][0]
        try:
            importlib.import_module(module).register(subparsers)
        except ModuleNotFoundError as error:  # a job whose optional dependencies are not installed
            raise CommandLineError(f"missing dependency {error.name!r}; install the extras with "
                                   "`pip install 'hf-sfdlm[train]'`.") from error
    for name, (_, summary) in SUBCOMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=summary)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse `argv`; `SECTION.KEY=VALUE` overrides may stand anywhere, not only in one run."""
    args, extras = parser.parse_known_args(argv)
    overrides = [item for item in extras if "=" in item and not item.startswith("-")]
    unknown = [item for item in extras if item not in overrides]
    if overrides and not hasattr(args, "overrides"):
        unknown = extras
    if unknown:
        prog = " ".join(["sfdlm", *([args.command] if args.command else [])])
        raise CommandLineError(f"unrecognized arguments: {' '.join(unknown)} (see `{prog} --help`)")
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    return args


def _one_line(error: BaseException) -> str:
    message = str(error) or type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return " ".join(message.split())


# Libraries whose exceptions say the network or the Hub could not be reached (no connection, a proxy,
# a timeout): the user's environment, not a bug.
NETWORK_ERROR_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def is_expected_error(error: BaseException) -> bool:
    """Mistakes the user can fix: bad values (ValueError), missing/unreadable files and folders or
    models that cannot be found (OSError), malformed YAML, a file torch refuses to unpickle, no network;
    everything else is a bug."""
    import pickle

    if isinstance(error, (CommandLineError, ValueError, OSError, pickle.UnpicklingError)):
        return True
    return type(error).__module__.split(".")[0] in ("yaml", *NETWORK_ERROR_MODULES)


def _command_of(argv: list[str]) -> str | None:
    return next((arg for arg in argv if arg in SUBCOMMANDS), None)


def _resume_hint(command: str | None, argv: list[str]) -> str:
    if command not in RESUMABLE:
        return ""
    again = argv if "--resume" in argv else [*argv, "--resume"]
    return f" Continue from the newest checkpoint with: sfdlm {shlex.join(again)}"


def _close_progress_bars() -> None:
    """Close open tqdm bars now, so they are not redrawn after the message that follows."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every further flag belongs to lm-evaluation-harness's own parser
        return importlib.import_module(SUBCOMMANDS["lm-eval"][0]).main(argv[1:])
    debug = "--debug" in argv or os.environ.get("SFDLM_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [arg for arg in argv if arg != "--debug"]
    command = _command_of(argv)
    prog = f"sfdlm {command}" if command else "sfdlm"
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv) if not argv or argv[0] in ("-h", "--help") else parse_args(parser, argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 0 if not argv else EXIT_USAGE
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"\n{prog}: interrupted (Ctrl-C); nothing new was saved.{_resume_hint(command, argv)}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if not is_expected_error(error):
            raise
        if debug:
            import traceback

            traceback.print_exc()
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
