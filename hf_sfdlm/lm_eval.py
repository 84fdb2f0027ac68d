"""lm-evaluation-harness's own command line, with the `sfdlm` model registered.

lm-evaluation-harness 0.4.x resolves `--model NAME` in its own registry and has no plugin discovery
(no entry points), so a bare `lm_eval --model sfdlm` cannot see a model class that lives in another
package. These run the harness's CLI unchanged after registering ours, so every harness flag
(`--tasks`, `--num_fewshot`, `--include_path`, `--output_path`, `--log_samples`, `--limit`, ...) means
what `lm_eval --help` says:

    python -m hf_sfdlm.lm_eval --model sfdlm --model_args pretrained=outputs/sfdlm-tiny,num_samples=32 --tasks lambada_openai
    sfdlm lm-eval --model sfdlm --model_args pretrained=outputs/sfdlm-tiny --tasks arc_easy --device cpu

In Python, `import hf_sfdlm.lm_eval_adapter` before `lm_eval.simple_evaluate(model="sfdlm", ...)`.
"""

from __future__ import annotations

import sys

HELP = "lm-evaluation-harness's CLI with the `sfdlm` model registered (every lm_eval flag passes through)"


def main(argv: list[str] | None = None) -> int:
    """Run `lm_eval` with `argv` (default: this process's arguments) after registering `sfdlm`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as error:
        raise SystemExit("sfdlm lm-eval needs lm-evaluation-harness: `pip install 'hf-sfdlm[eval]'`.") from error
    from . import lm_eval_adapter  # noqa: F401  (registers the harness model "sfdlm")

    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # the harness's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def register(subparsers) -> None:
    """List `lm-eval` in `sfdlm --help`; `hf_sfdlm.cli.main` hands its arguments to `main` unparsed."""
    subparsers.add_parser("lm-eval", help=HELP, add_help=False)


if __name__ == "__main__":
    sys.exit(main())
