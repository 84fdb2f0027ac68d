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

from ..train_config import FINETUNE_DEFAULTS, FINETUNE_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Base model: Hub repo id or save_pretrained folder.")
    parser.add_argument("--data", required=True, help="Text file/folder (domain adaptation) or JSON lines with "
                                                      "prompt/response or messages (instruction tuning).")
    parser.add_argument("--format", choices=FINETUNE_FORMATS, default="auto",
                        help="'text' or 'sft'; 'auto' picks 'sft' for .json/.jsonl whose records have "
                             "prompt/response or messages.")
    parser.add_argument("--tokenizer", help="Tokenizer name or folder (default: the base model's).")
    parser.add_argument("--output-dir", help=f"Default: {FINETUNE_DEFAULTS['output_dir']}.")
    parser.add_argument("--max-steps", type=int, help=f"Optimizer steps (default {FINETUNE_DEFAULTS['max_steps']}).")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scale alpha / r).")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--target-modules", default=None,
                        help="'all-linear' or comma-separated names (default: in_proj,out_proj,fc_in,fc_out; "
                             "see hf_sfdlm.lora.LORA_TARGET_MODULES).")
    parser.add_argument("--train-ssm", action="store_true",
                        help="Also train the SSM parameters in full (PEFT modules_to_save=['mixer']).")
    parser.add_argument("--block-size", type=int, default=128,
                        help="Text: length of the packed blocks. SFT: longest example (prompt + response).")
    parser.add_argument("--text-column", default="text", help="Text: the column holding the text.")
    parser.add_argument("--chat-template", action="store_true",
                        help="SFT: render prompt/response records through the tokenizer's chat template too.")
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="Held-out fraction of the data.")
    parser.add_argument("--merge", action="store_true", help="Also save the merged model to <output-dir>/merged.")
    parser.add_argument("--resume", action="store_true",
                        help="Continue the run in <output-dir> from its newest usable checkpoint.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Delete the checkpoints and logs of the run in <output-dir> and start afresh.")
    parser.add_argument("--base-model-id", help="Hub repo id of the base for the model card (default: --model "
                                                "when it is a repo id).")
    parser.add_argument("--repo-id", help="Name used in the model card (default: the output folder's name).")
    parser.add_argument("--license", default="apache-2.0", help="License id for the model card.")
    parser.add_argument("overrides", nargs="*", metavar="training.KEY=VALUE",
                        help="Any option of hf_sfdlm.train_config.TrainingConfig, e.g. training.learning_rate=5e-4.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="LoRA fine-tuning: domain text or instruction (SFT) data.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def finetune_config(args: argparse.Namespace):
    """The library's `FinetuneConfig` from the parsed arguments."""
    from dataclasses import fields

    from ..train_config import FinetuneConfig, finetune_training_config

    training = finetune_training_config(args.overrides, output_dir=args.output_dir, max_steps=args.max_steps)
    options = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if f.name != "training"}
    return FinetuneConfig(**options, training=training)


def run_finetune(args: argparse.Namespace):
    """`hf_sfdlm.pipelines.run_finetune` on the parsed arguments; returns (result, trainer)."""
    from ..pipelines import run_finetune as run_pipeline

    return run_pipeline(finetune_config(args), resume=args.resume, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> int:
    result, trainer = run_finetune(args)
    if trainer.accelerator.is_main_process:
        nelbo = "n/a" if result.eval_nelbo is None else f"{result.eval_nelbo:.4f} nats/token"
        print(f"Fine-tuned {result.step} steps ({result.tokens:,} scored tokens) in {result.seconds:.0f} s; "
              f"held-out NELBO {nelbo}. Adapter and model card in {result.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `training/finetune_lora.py` (the same options as `sfdlm finetune`)."""
    parser = argparse.ArgumentParser(prog="finetune_lora.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
