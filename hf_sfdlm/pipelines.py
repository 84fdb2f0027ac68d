"""The two standard pipelines on top of `DiffusionTrainer`:

    run_training    pretraining: data -> tokenizer -> checks -> model -> DiffusionTrainer (`sfdlm train`)
    run_finetune    LoRA fine-tuning of an SFDLM checkpoint on domain text or instruction (SFT) data
                    (`sfdlm finetune`)

Each checks every cheap input before loading data or models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checkpointing import check_output_dir, clear_run, fingerprint_hash
from .data import DataConfig
from .train_config import FINETUNE_FORMATS, FinetuneConfig, TrainConfig, check_model_section
from .trainer import DiffusionTrainer, TrainerCallback, TrainResult, _no_accelerator


# ============================================================================================== pretraining
def check_model_inputs(model_config, tokenizer, block_size: int) -> None:
    """Raise before training when the tokenizer or the block size do not fit the model."""
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model's `vocab_size` is "
                         f"{model_config.vocab_size}: ids >= {model_config.vocab_size} could not be embedded. "
                         "Raise `model.vocab_size` (or leave it unset to use the tokenizer's size).")
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise ValueError(f"`data.block_size`={block_size} exceeds the model's `max_position_embeddings`={limit}.")


def build_model_config(model_args: dict[str, Any], tokenizer):
    """`SFDLMConfig` from the `model` section, taking `vocab_size` and special-token ids from the tokenizer
    where the section leaves them unset."""
    from .configuration_sfdlm import SFDLMConfig

    values = dict(model_args)
    if values.get("vocab_size") is None:
        values["vocab_size"] = len(tokenizer)
    for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        if values.get(name) is None and getattr(tokenizer, name, None) is not None:
            values[name] = getattr(tokenizer, name)
    return SFDLMConfig(**values)


def build_model(model_config) -> nn.Module:
    """A freshly initialised `SFDLMForDiffusionLM` whose generation config knows the special tokens."""
    from .modeling_sfdlm import SFDLMForDiffusionLM

    model = SFDLMForDiffusionLM(model_config)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(model_config, name, None)
            if value is not None:
                setattr(generation_config, name, value)
    return model


@dataclass
class Pipeline:
    """Everything `run_training` builds before the loop (handy for inspection and tests)."""

    config: TrainConfig
    tokenizer: Any
    model: nn.Module
    train_dataset: Any
    eval_dataset: Any


def prepare_pipeline(config: TrainConfig) -> Pipeline:
    """Data -> tokenizer -> checks -> tokenised datasets -> model. Every input error is raised before
    any tokenisation of the corpus or model construction."""
    from accelerate import PartialState
    from accelerate.utils import set_seed

    from .data import load_text_dataset, load_tokenizer, split_heldout, tokenize_dataset

    check_model_section(config.model)  # before any data is read or a tokenizer trained
    state = PartialState(cpu=_no_accelerator())
    out = Path(config.training.output_dir)
    data = config.data
    with state.main_process_first():
        raw = load_text_dataset(data, work_dir=out / "data")
        train_raw, eval_raw = split_heldout(raw, data, seed=config.training.seed)
        tokenizer = load_tokenizer(config.tokenizer, data, raw_train=train_raw,
                                   vocab_size=config.tokenizer_vocab_size, save_dir=out / "tokenizer")
        model_config = build_model_config(config.model, tokenizer)
        check_model_inputs(model_config, tokenizer, data.block_size)
        train = tokenize_dataset(train_raw, tokenizer, data, desc="Tokenizing train")
        evaluation = tokenize_dataset(eval_raw, tokenizer, data, desc="Tokenizing validation")
    if data.streaming:
        train = train.shuffle(seed=config.training.seed, buffer_size=data.shuffle_buffer)
    set_seed(config.training.seed)  # the same initial weights on every process and every run
    model = build_model(model_config)
    return Pipeline(config, tokenizer, model, train, evaluation)


def data_fingerprint(data: DataConfig) -> dict[str, Any]:
    """The data settings a resumed run must share with its checkpoint (they fix the data order)."""
    return {"data": fingerprint_hash({k: v for k, v in asdict(data).items() if k not in ("num_proc", "cache_dir")})}


def run_training(config: TrainConfig, resume: bool = False, callbacks: Sequence[TrainerCallback] = (),
                 pipeline: Pipeline | None = None, overwrite: bool = False) -> tuple[TrainResult, DiffusionTrainer]:
    """The standard run: `prepare_pipeline`, then `DiffusionTrainer(...).train(resume, overwrite)`. An output
    folder used by another run is refused (before any data is read) unless `resume` or `overwrite`; with
    `overwrite`, the old run's tokenizer and corpus copy go too, so the new run never reuses them."""
    check_output_dir(config.training.output_dir, resume=resume, overwrite=overwrite)
    if overwrite and pipeline is None:
        from accelerate import PartialState

        state = PartialState(cpu=_no_accelerator())
        if state.is_main_process:
            clear_run(config.training.output_dir, also=("tokenizer", "data"))
        state.wait_for_everyone()
    pipeline = pipeline or prepare_pipeline(config)
    trainer = DiffusionTrainer(pipeline.model, config.training, pipeline.train_dataset, pipeline.eval_dataset,
                               tokenizer=pipeline.tokenizer, callbacks=callbacks,
                               fingerprint=data_fingerprint(config.data), run_config=config.to_dict())
    return trainer.train(resume=resume, overwrite=overwrite), trainer


# ============================================================================================== fine-tuning
def finetune_data_format(config: FinetuneConfig) -> str:
    """'text' or 'sft' for `config.data` (raises when the file does not exist)."""
    from .sft import is_sft_file

    if config.format not in FINETUNE_FORMATS:
        raise ValueError(f"`format` must be one of {FINETUNE_FORMATS}, got {config.format!r}.")
    if not os.path.exists(config.data):
        raise ValueError(f"--data {config.data!r} does not exist (fine-tuning reads local files).")
    if config.format != "auto":
        return config.format
    return "sft" if is_sft_file(config.data) else "text"


def finetune_target_modules(target_modules: str | list[str] | None):
    """The LoRA target modules: the default list, `"all-linear"`, or names from a comma-separated string."""
    from .lora import DEFAULT_TARGET_MODULES

    if target_modules is None:
        return list(DEFAULT_TARGET_MODULES)
    if target_modules == "all-linear":
        return "all-linear"
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    return [name.strip() for name in target_modules if name.strip()]


def build_finetune_datasets(config: FinetuneConfig, kind: str, tokenizer, seed: int):
    """(train, validation, collator) of `config.data` for `kind` ('text' or 'sft')."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if kind == "sft":
        from .sft import SFTCollator, load_sft_dataset

        dataset = load_sft_dataset(config.data, tokenizer, max_length=config.block_size,
                                   use_chat_template=config.chat_template)
        if len(dataset) < 2:
            raise ValueError(f"{config.data!r} has {len(dataset)} usable record(s); at least 2 are needed "
                             "(one is held out).")
        size = max(1, round(config.validation_fraction * len(dataset)))
        parts = dataset.train_test_split(test_size=size, seed=seed, shuffle=True)
        return parts["train"], parts["test"], SFTCollator(pad_token_id=pad)
    from .data import DiffusionCollator, build_datasets

    data = DataConfig(dataset=config.data, text_column=config.text_column, block_size=config.block_size,
                      validation_fraction=config.validation_fraction)
    train, evaluation = build_datasets(data, tokenizer, seed=seed)
    return train, evaluation, DiffusionCollator(pad_token_id=pad)


def run_finetune(config: FinetuneConfig, resume: bool = False,
                 overwrite: bool = False) -> tuple[TrainResult, DiffusionTrainer]:
    """Build everything (inputs checked first), train with `DiffusionTrainer`, save the adapter, tokenizer
    and model card to `config.training.output_dir` (and the merged model with `merge`). `resume` and
    `overwrite` as in `DiffusionTrainer.train`."""
    from accelerate.utils import set_seed

    from .hub import check_repo_id, folder_kind, load_pretrained, load_tokenizer
    from .lora import apply_lora, lora_config
    from .model_card import ModelCardCallback, is_repo_id

    # Everything cheap is checked before the model or the data are loaded.
    training = config.training
    check_output_dir(training.output_dir, resume=resume, overwrite=overwrite)
    kind = finetune_data_format(config)
    targets = finetune_target_modules(config.target_modules)
    lora_config(config.lora_r, config.lora_alpha, targets, config.lora_dropout, config.train_ssm)
    if config.block_size < 2:
        raise ValueError(f"--block-size must be at least 2, got {config.block_size}.")
    if os.path.isdir(config.model):
        folder_kind(config.model)  # a clear error for a folder without config.json
    else:
        check_repo_id(config.model)

    tokenizer = load_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code)
    model = load_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    if getattr(model, "peft_config", None):
        raise ValueError(f"{config.model!r} is an adapter; fine-tune its base model (or merge it first).")
    if getattr(model.config, "model_type", None) != "sfdlm":
        raise ValueError(f"{config.model!r} is a {model.config.model_type!r} model, not an SFDLM.")
    check_model_inputs(model.config, tokenizer, config.block_size)
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: documents and responses must end with one.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is marked by position, so EOS can pad

    set_seed(training.seed)  # the same adapter initialisation on every process and every run
    peft_model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, target_modules=targets,
                            dropout=config.lora_dropout, train_ssm=config.train_ssm)
    train, evaluation, collator = build_finetune_datasets(config, kind, tokenizer, training.seed)
    fingerprint = peft_model.sfdlm_base_fingerprint

    base_id = config.base_model_id or (config.model if is_repo_id(config.model) else None)
    data_name = Path(config.data).name
    method = "LoRA instruction tuning (prompt conditions, response scored)" if kind == "sft" else \
        "LoRA domain adaptation (diffusion NELBO on packed text)"
    info = {"method": method, "base_model": base_id or str(config.model), "datasets": [data_name],
            "training_examples": len(train), "held_out_examples": len(evaluation),
            "block_size" if kind == "text" else "max_length": config.block_size}
    card = ModelCardCallback(
        data_name, training_info=info, tokenizer_name=getattr(tokenizer, "name_or_path", None) or None,
        extra_files={"sfdlm_adapter.json": lambda _: json.dumps(fingerprint)},
        repo_id=config.repo_id or Path(training.output_dir).resolve().name, license=config.license,
        base_model=base_id, datasets=[data_name])
    run_config = {"finetune": config.options(), "training": vars(training).copy()}
    trainer = DiffusionTrainer(
        peft_model, training, train, evaluation, data_collator=collator, tokenizer=tokenizer, callbacks=[card],
        fingerprint={"data": fingerprint_hash({"data": os.path.abspath(config.data), "format": kind,
                                               "block_size": config.block_size, "chat": config.chat_template}),
                     "lora": fingerprint_hash([config.lora_r, config.lora_alpha, targets, config.train_ssm])},
        run_config=run_config)
    result = trainer.train(resume=resume, overwrite=overwrite)
    if config.merge and not result.already_finished and trainer.accelerator.is_main_process:
        save_merged(trainer, Path(training.output_dir) / "merged", card, base_id)
    trainer.accelerator.wait_for_everyone()
    return result, trainer


def save_merged(trainer: DiffusionTrainer, directory: Path, card, base_id: str | None) -> Path:
    """Merge the (evaluation) adapter into a copy of its base and save it as a plain model with its card."""
    import copy

    from .model_card import eval_results_from_metrics, write_model_card

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


__all__ = [
    "Pipeline",
    "build_finetune_datasets",
    "build_model",
    "build_model_config",
    "check_model_inputs",
    "data_fingerprint",
    "prepare_pipeline",
    "run_finetune",
    "run_training",
]
