"""`sfdlm finetune`: LoRA fine-tuning of an SFDLM checkpoint (also `training/finetune_lora.py`, `accelerate launch`).

Two kinds of data, chosen from the file (or `--format`):

* plain text (`.txt`, or JSON lines / CSV / Parquet with a `text` column): domain adaptation, the
  pretraining objective on packed blocks of the new text (`hf_sfdlm.data`);
* instruction tuning, JSON lines with `prompt`/`response` or chat `messages` (`hf_sfdlm.sft`): the
  prompt is never corrupted and only the response (and its EOS) is scored, as in LLaDA's SFT.

The pipeline is `hf_sfdlm.pipelines.run_finetune`, its loop `hf_sfdlm.trainer.DiffusionTrainer`: same
checkpoints (`<output-dir>/checkpoints`, `--resume`), logs (`<output-dir>/logs`, TensorBoard and JSON lines)
and held-out NELBO as pretraining. The adapter,
tokenizer and model card are saved to `<output-dir>` (and `<output-dir>/best`); `--merge` also saves the
merged full model to `<output-dir>/merged`.

    sfdlm finetune --model org/sfdlm-small --data my.jsonl --output-dir outputs/my-lora training.max_steps=300
"""

from __future__ import annotations

import argparse

# Shown in --help without importing the library (and torch); tests keep them equal to
# `hf_sfdlm.train_config.FINETUNE_DEFAULTS` and `FINETUNE_FORMATS`.
FORMATS = ("auto", "text", "sft")
DEFAULT_MAX_STEPS = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..remote_code import TRUST_REMOTE_CODE_HELP
    from ._common import add_threads_argument

    parser.add_argument("--model", required=True, help="base model: local save_pretrained folder or Hub id (org/name)")
    parser.add_argument("--data", required=True, help="text file/folder (domain adaptation) or JSON lines with "
                                                      "prompt/response or messages (instruction tuning)")
    parser.add_argument("--format", choices=FORMATS, default="auto",
                        help="'text' or 'sft' (default: auto, which picks 'sft' for .json/.jsonl whose records have "
                             "prompt/response or messages)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the base model's)")
    parser.add_argument("--output-dir", help="where the adapter, checkpoints and logs go (default: "
                                             "outputs/<model name>-lora-<data name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the checkpoints and logs of an earlier run in <output-dir> and start afresh "
                             "(default: refuse to touch a used folder)")
    parser.add_argument("--max-steps", type=int, help=f"optimizer steps (default: {DEFAULT_MAX_STEPS})")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--lora-alpha", type=float, default=16.0,
                        help="LoRA alpha; the update is scaled by alpha / r (default: 16)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (default: 0)")
    parser.add_argument("--target-modules", default=None,
                        help="'all-linear' or comma-separated module names (default: in_proj,out_proj,fc_in,fc_out; "
                             "see hf_sfdlm.lora)")
    parser.add_argument("--train-ssm", action="store_true",
                        help="also train the SSM parameters in full, PEFT modules_to_save=['mixer'] (default: off)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="text: length of the packed blocks; SFT: longest example, prompt + response "
                             "(default: 128)")
    parser.add_argument("--text-column", default="text", help="text data: the column holding the text (default: text)")
    parser.add_argument("--chat-template", action="store_true",
                        help="SFT: render prompt/response records through the tokenizer's chat template (default: off)")
    parser.add_argument("--validation-fraction", type=float, default=0.05,
                        help="held-out fraction of the data (default: 0.05)")
    parser.add_argument("--merge", action="store_true",
                        help="also save the merged model to <output-dir>/merged (default: off)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in <output-dir> from its newest usable checkpoint")
    parser.add_argument("--base-model-id", help="Hub id of the base model for the model card (default: --model when "
                                                "it is a Hub id; else the card says `sfdlm push --base-model` fills it)")
    parser.add_argument("--repo-id", help="name used in the model card (default: the output folder's name)")
    parser.add_argument("--license", default="apache-2.0", help="license id for the model card (default: apache-2.0)")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    add_threads_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="training.KEY=VALUE",
                        help="any field of hf_sfdlm.train_config.TrainingConfig, anywhere on the command line, "
                             "e.g. training.learning_rate=5e-4")


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="LoRA fine-tuning: domain text or instruction (SFT) data.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def default_output_dir(model: str, data: str) -> str:
    """`outputs/<model name>-lora-<data name>`: a new run on other data never lands on an earlier one."""
    from ._common import slug

    return f"outputs/{slug(model)}-lora-{slug(data)}"


def finetune_config(args: argparse.Namespace):
    """The library's `FinetuneConfig` from the parsed arguments."""
    from dataclasses import fields

    from ..train_config import FinetuneConfig, finetune_training_config
    from ._common import DEFAULT_CPU_THREADS

    overrides = list(args.overrides or [])
    if not any(item.startswith("training.cpu_threads=") for item in overrides):
        overrides.insert(0, f"training.cpu_threads={args.threads or DEFAULT_CPU_THREADS}")
    output_dir = args.output_dir
    if output_dir is None and not any(item.startswith("training.output_dir=") for item in overrides):
        output_dir = default_output_dir(args.model, args.data)
    training = finetune_training_config(overrides, output_dir=output_dir, max_steps=args.max_steps)
    options = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if f.name != "training"}
    return FinetuneConfig(**options, training=training)


def run_finetune(args: argparse.Namespace):
    """`hf_sfdlm.pipelines.run_finetune` on the parsed arguments; returns (result, trainer)."""
    from ._common import check_model_location

    args.model = check_model_location(args.model)
    if args.tokenizer:
        args.tokenizer = check_model_location(args.tokenizer, "--tokenizer", bare_ids=True)
    from ..pipelines import run_finetune as run_pipeline
    from ._common import quiet_expected_warnings

    quiet_expected_warnings()
    return run_pipeline(finetune_config(args), resume=args.resume, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    result, trainer = run_finetune(args)
    if trainer.accelerator.is_main_process and not result.already_finished:
        nelbo = "n/a" if result.eval_nelbo is None else f"{result.eval_nelbo:.4f} nats/token"
        print(f"Fine-tuned {result.step} steps ({result.tokens:,} scored tokens) in {result.seconds:.0f} s; "
              f"held-out NELBO {nelbo}. Adapter and model card in {result.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `training/finetune_lora.py`: `sfdlm finetune`, with the same options and error reporting."""
    import sys

    from ..cli import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])
