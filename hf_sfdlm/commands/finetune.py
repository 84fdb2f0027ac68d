"""`sfdlm finetune`: LoRA fine-tuning of an SFDLM checkpoint (also `training/finetune_lora.py`, `accelerate launch`).

Two kinds of data, chosen from the file (or `--format`):

* plain text (`.txt`, or JSON lines / CSV / Parquet with a `text` column): domain adaptation, the
  pretraining objective on packed blocks of the new text (`hf_sfdlm.data`);
* instruction tuning, JSON lines with `prompt`/`response` or chat `messages` (`hf_sfdlm.sft`): the
  prompt is never corrupted and only the response (and its EOS) is scored, as in LLaDA's SFT.

The loop is `hf_sfdlm.training.DiffusionTrainer`: same checkpoints (`<output-dir>/checkpoints`, `--resume`),
logs (`<output-dir>/logs`, TensorBoard and JSON lines) and held-out NELBO as pretraining. The adapter,
tokenizer and model card are saved to `<output-dir>` (and `<output-dir>/best`); `--merge` also saves the
merged full model to `<output-dir>/merged`.

    sfdlm finetune --model org/sfdlm-small --data my.jsonl --output-dir outputs/my-lora training.max_steps=300
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

# Fine-tuning defaults, different from pretraining: short runs, a smaller step size, no EMA (the adapter
# is small and the run short; `training.ema_decay=0.99` turns it on).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/sfdlm-lora", "max_steps": 300, "batch_size": 16, "learning_rate": 1e-3,
    "warmup_steps": 20, "ema_decay": None, "eval_every": 100, "checkpoint_every": 100, "log_every": 10,
}
FORMATS = ("auto", "text", "sft")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..remote_code import TRUST_REMOTE_CODE_HELP

    parser.add_argument("--model", required=True, help="Base model: Hub repo id or save_pretrained folder.")
    parser.add_argument("--data", required=True, help="Text file/folder (domain adaptation) or JSON lines with "
                                                      "prompt/response or messages (instruction tuning).")
    parser.add_argument("--format", choices=FORMATS, default="auto",
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
                        help="Continue from the newest complete checkpoint in <output-dir>/checkpoints.")
    parser.add_argument("--base-model-id", help="Hub repo id of the base for the model card (default: --model "
                                                "when it is a repo id).")
    parser.add_argument("--repo-id", help="Name used in the model card (default: the output folder's name).")
    parser.add_argument("--license", default="apache-2.0", help="License id for the model card.")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.add_argument("overrides", nargs="*", metavar="training.KEY=VALUE",
                        help="Any option of hf_sfdlm.training.TrainingConfig, e.g. training.learning_rate=5e-4.")


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="LoRA fine-tuning: domain text or instruction (SFT) data.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def training_config(args: argparse.Namespace):
    """`TrainingConfig` from the fine-tuning defaults, the flags and `training.key=value` overrides."""
    import yaml

    from ..training import TrainingConfig

    values = dict(FINETUNE_DEFAULTS)
    if args.output_dir is not None:
        values["output_dir"] = args.output_dir
    if args.max_steps is not None:
        values["max_steps"] = args.max_steps
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("training.") or key.count(".") != 1:
            raise ValueError(f"Override {item!r} must look like `training.key=value` (e.g. training.max_steps=100).")
        values[key.split(".", 1)[1]] = yaml.safe_load(raw) if raw.strip() else None
    try:
        return TrainingConfig(**values)
    except TypeError as error:  # an unknown field
        raise ValueError(f"Unknown training option in {args.overrides}: {error}") from None


def data_format(args: argparse.Namespace) -> str:
    from ..sft import is_sft_file

    if not os.path.exists(args.data):
        raise ValueError(f"--data {args.data!r} does not exist (fine-tuning reads local files).")
    if args.format != "auto":
        return args.format
    return "sft" if is_sft_file(args.data) else "text"


def target_modules(args: argparse.Namespace):
    from ..lora import DEFAULT_TARGET_MODULES

    if args.target_modules is None:
        return list(DEFAULT_TARGET_MODULES)
    if args.target_modules == "all-linear":
        return "all-linear"
    return [name.strip() for name in args.target_modules.split(",") if name.strip()]


def build_datasets(args: argparse.Namespace, kind: str, tokenizer, seed: int):
    """(train, validation, collator) for `kind` ('text' or 'sft')."""
    if kind == "sft":
        from ..sft import SFTCollator, load_sft_dataset

        dataset = load_sft_dataset(args.data, tokenizer, max_length=args.block_size,
                                   use_chat_template=args.chat_template)
        if len(dataset) < 2:
            raise ValueError(f"{args.data!r} has {len(dataset)} usable record(s); at least 2 are needed "
                             "(one is held out).")
        size = max(1, round(args.validation_fraction * len(dataset)))
        parts = dataset.train_test_split(test_size=size, seed=seed, shuffle=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return parts["train"], parts["test"], SFTCollator(pad_token_id=pad)
    from ..data import DataConfig, DiffusionCollator
    from ..data import build_datasets as build_text_datasets

    config = DataConfig(dataset=args.data, text_column=args.text_column, block_size=args.block_size,
                        validation_fraction=args.validation_fraction)
    train, evaluation = build_text_datasets(config, tokenizer, seed=seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return train, evaluation, DiffusionCollator(pad_token_id=pad)


def run_finetune(args: argparse.Namespace):
    """Build everything (inputs checked first), train with `DiffusionTrainer`, save; returns (result, trainer)."""
    from accelerate.utils import set_seed

    from ..hub import check_repo_id, folder_kind, load_pretrained, load_tokenizer
    from ..lora import apply_lora, lora_config
    from ..model_card import ModelCardCallback, is_repo_id
    from ..checkpointing import fingerprint_hash
    from ..training import DiffusionTrainer, check_model_inputs

    # Everything cheap is checked before the model or the data are loaded.
    config = training_config(args)
    kind = data_format(args)
    targets = target_modules(args)
    lora_config(args.lora_r, args.lora_alpha, targets, args.lora_dropout, args.train_ssm)
    if args.block_size < 2:
        raise ValueError(f"--block-size must be at least 2, got {args.block_size}.")

    if os.path.isdir(args.model):
        folder_kind(args.model)  # a clear error for a folder without config.json
    else:
        check_repo_id(args.model)

    tokenizer = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    model = load_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if getattr(model, "peft_config", None):
        raise ValueError(f"{args.model!r} is an adapter; fine-tune its base model (or merge it first).")
    if getattr(model.config, "model_type", None) != "sfdlm":
        raise ValueError(f"{args.model!r} is a {model.config.model_type!r} model, not an SFDLM.")
    check_model_inputs(model.config, tokenizer, args.block_size)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: documents and responses must end with one.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is marked by position, so EOS can pad

    set_seed(config.seed)  # the same adapter initialisation on every process and every run
    peft_model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, target_modules=targets,
                            dropout=args.lora_dropout, train_ssm=args.train_ssm)
    train, evaluation, collator = build_datasets(args, kind, tokenizer, config.seed)
    fingerprint = peft_model.sfdlm_base_fingerprint

    base_id = args.base_model_id or (args.model if is_repo_id(args.model) else None)
    data_name = Path(args.data).name
    method = "LoRA instruction tuning (prompt conditions, response scored)" if kind == "sft" else \
        "LoRA domain adaptation (diffusion NELBO on packed text)"
    info = {"method": method, "base_model": base_id or str(args.model), "datasets": [data_name],
            "training_examples": len(train), "held_out_examples": len(evaluation),
            "block_size" if kind == "text" else "max_length": args.block_size}
    card = ModelCardCallback(
        data_name, training_info=info, tokenizer_name=getattr(tokenizer, "name_or_path", None) or None,
        extra_files={"sfdlm_adapter.json": lambda _: json.dumps(fingerprint)},
        repo_id=args.repo_id or Path(config.output_dir).resolve().name, license=args.license,
        base_model=base_id, datasets=[data_name])
    run_config = {"finetune": {k: v for k, v in vars(args).items() if k not in ("func", "overrides")},
                  "training": vars(config).copy()}
    trainer = DiffusionTrainer(
        peft_model, config, train, evaluation, data_collator=collator, tokenizer=tokenizer, callbacks=[card],
        fingerprint={"data": fingerprint_hash({"data": os.path.abspath(args.data), "format": kind,
                                               "block_size": args.block_size, "chat": args.chat_template}),
                     "lora": fingerprint_hash([args.lora_r, args.lora_alpha, targets, args.train_ssm])},
        run_config=run_config)
    result = trainer.train(resume=args.resume)
    if args.merge and trainer.accelerator.is_main_process:
        save_merged(trainer, Path(config.output_dir) / "merged", card, base_id)
    trainer.accelerator.wait_for_everyone()
    return result, trainer


def save_merged(trainer, directory: Path, card, base_id: str | None) -> Path:
    """Merge the (evaluation) adapter into a copy of its base and save it as a plain model with its card."""
    import copy

    from ..model_card import eval_results_from_metrics, write_model_card

    merged = copy.deepcopy(trainer.eval_model()).merge_and_unload()
    merged.save_pretrained(directory)
    trainer.tokenizer.save_pretrained(directory)
    info = {**card.training_info, "optimizer_steps": trainer.state.step, "tokens_seen": trainer.state.tokens,
            "weights_saved": "base + merged LoRA adapter"}
    write_model_card(directory, merged, eval_results=eval_results_from_metrics(card.metrics, card.dataset_name,
                                                                               tokenizer_name=card.tokenizer_name),
                     training_info=info, repo_id=card.card_kwargs.get("repo_id"),
                     license=card.card_kwargs.get("license", "apache-2.0"), base_model=base_id,
                     datasets=card.card_kwargs.get("datasets"))
    return directory


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
