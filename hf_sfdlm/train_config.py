"""Run configuration: `TrainingConfig` (how to train), `TrainConfig` (a whole run: model, tokenizer, data,
training) and `load_config`, which reads the YAML presets (`training/configs/*.yaml`) and applies
`section.key=value` overrides. `TrainConfig()` itself is the `tiny` preset."""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import DataConfig, check_field_types, reject_unknown_keys

MIXED_PRECISION = ("no", "fp16", "bf16")
# Largest `training.learning_rate` accepted: AdamW's normalised step moves each weight by about the learning
# rate, so beyond 1 every step is larger than the weights themselves.
MAX_LEARNING_RATE = 1.0

# The `tiny` preset's model: the configuration that trains best on the synthetic corpus within a few CPU
# minutes (see README "Training"). `vocab_size` and the special-token ids come from the tokenizer.
TINY_MODEL: dict[str, Any] = {
    "process": "absorbing",
    "hidden_size": 128,
    "stage_depths": [2, 2],
    "pool_factors": [2],
    "ssm_state_size": 16,
    "fourier_intermediate_size": 256,
    "num_timesteps": None,
    "noise_schedule": "loglinear",
}

@dataclass
class TrainingConfig:
    """How to train: optimisation, evaluation, logging and checkpointing.

    Args:
        output_dir: where the model, checkpoints (`checkpoints/`) and logs (`logs/`) go.
        seed: seeds model initialisation, data order and corruption noise.
        max_steps: optimizer steps to train for.
        batch_size: sequences per optimizer step across all processes and accumulation steps (global batch).
        gradient_accumulation_steps: micro-batches per optimizer step (`batch_size` must be divisible by it,
            and each micro-batch by the number of processes).
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW. Biases, norms, embeddings
            and SSM parameters get no weight decay.
        lr_scheduler: any `transformers.get_scheduler` name (`cosine`, `linear`, `constant_with_warmup`, ...).
        warmup_steps: linear warm-up steps of the schedule.
        min_lr_ratio: floor of `cosine` schedules as a fraction of the peak (`cosine_with_min_lr`); 0 for none.
        max_grad_norm: clip the global gradient norm to this (`None`: no clipping).
        mixed_precision: `"no"`, `"bf16"` or `"fp16"`, through accelerate.
        ema_decay: decay of the EMA of the weights used for evaluation and the saved model (`None`: no EMA).
        eval_every: evaluate the held-out NELBO every this many steps (and at the end); 0: only at the end.
        eval_num_samples: noise levels per held-out sequence in the Monte Carlo NELBO.
        eval_max_sequences: held-out sequences used per evaluation (`None`: all).
        save_best: write the model to `<output_dir>/best` at every evaluation that improves the NELBO.
        checkpoint_every: write a checkpoint every this many steps (and at the end); 0: only at the end.
        keep_checkpoints: complete checkpoints kept.
        checkpoint_checksums: record and verify SHA-256 sums of checkpoint files.
        log_every: log the training loss, learning rate, gradient norm and throughput every this many steps.
        log_with: trackers: `"tensorboard"`, `"jsonl"` (`logs/metrics.jsonl`) and any other accelerate tracker name.
        progress_bar: show a tqdm bar on the main process.
        num_workers: DataLoader workers.
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        compile: `true` to `torch.compile` the model's forward in place (`nn.Module.compile`, so weights,
            checkpoints and the EMA keep their names), or the name of a `torch.compile` backend
            (`inductor`, the default; `aot_eager`, ...). Pays off on GPUs; on CPU it can be slower (README).
        cpu_threads: torch intra-op threads when training on CPU (`None`: torch's default, one per core). Small
            models gain little from more threads, and on a shared machine OpenMP threads that wait for each
            other can make a step several times slower than one thread does.
    """

    output_dir: str = "outputs/sfdlm-tiny"
    seed: int = 0
    max_steps: int = 500
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    ema_decay: float | None = 0.99
    eval_every: int = 250
    eval_num_samples: int = 4
    eval_max_sequences: int | None = 128
    save_best: bool = True
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    checkpoint_checksums: bool = True
    log_every: int = 20
    log_with: list[str] = field(default_factory=lambda: ["tensorboard", "jsonl"])
    progress_bar: bool = True
    num_workers: int = 0
    gradient_checkpointing: bool = False
    compile: bool | str = False
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        # YAML 1.1 reads `3e-4` (no dot) as a string: accept it as the number it obviously is.
        for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "min_lr_ratio",
                     "max_grad_norm", "ema_decay"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, float(value))
                except ValueError:
                    raise ValueError(f"`training.{name}` must be a number, got {value!r}.") from None
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]
        check_field_types(self, "training")  # types first, so that every range check below compares numbers
        self._check_optimizer()

        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`training.{name}` must be an integer >= {minimum}, got {value!r}.")

        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "eval_num_samples",
                     "keep_checkpoints", "log_every"):
            positive_int(name)
        for name in ("seed", "warmup_steps", "eval_every", "checkpoint_every", "num_workers"):
            positive_int(name, minimum=0)
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"`training.batch_size`={self.batch_size} must be divisible by "
                             f"`training.gradient_accumulation_steps`={self.gradient_accumulation_steps}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"`training.mixed_precision` must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`training.ema_decay` must be in (0, 1) or null, got {self.ema_decay!r}.")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise ValueError(f"`training.max_grad_norm` must be a positive finite number or null (no clipping), "
                             f"got {self.max_grad_norm!r}.")
        if not self.output_dir.strip():
            raise ValueError("`training.output_dir` must be a folder path, got an empty string.")
        if self.eval_max_sequences is not None:
            positive_int("eval_max_sequences")
        if self.cpu_threads is not None:
            positive_int("cpu_threads")
        if not isinstance(self.compile, (bool, str)):
            raise ValueError(f"`training.compile` must be true, false or a torch.compile backend name, got {self.compile!r}.")
        if isinstance(self.compile, str):
            from torch._dynamo import list_backends

            if self.compile not in list_backends(exclude_tags=()):
                raise ValueError(f"`training.compile` backend {self.compile!r} is not one of "
                                 f"{list_backends(exclude_tags=())}.")
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise ValueError(f"`training.min_lr_ratio` must be in [0, 1), got {self.min_lr_ratio!r}.")
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.lr_scheduler not in names:
            raise ValueError(f"`training.lr_scheduler` must be one of {names}, got {self.lr_scheduler!r}.")

    def _check_optimizer(self) -> None:
        """AdamW's values, each in the range where it means something (NaN and infinities refused)."""
        if not 0 < self.learning_rate <= MAX_LEARNING_RATE:
            raise ValueError(f"`training.learning_rate` must be in (0, {MAX_LEARNING_RATE}] (AdamW moves every "
                             f"weight by about this much per step), got {self.learning_rate!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`training.{name}` must be in [0, 1), got {getattr(self, name)!r}.")
        if not 0 < self.adam_epsilon < 1:
            raise ValueError(f"`training.adam_epsilon` must be in (0, 1) (it keeps AdamW's division by the "
                             f"gradient's RMS finite), got {self.adam_epsilon!r}.")
        if not 0 <= self.weight_decay < math.inf or self.learning_rate * self.weight_decay >= 1:
            raise ValueError(f"`training.weight_decay` must be >= 0 with learning_rate * weight_decay < 1 (AdamW "
                             f"multiplies the weights by 1 - lr * wd every step), got {self.weight_decay!r} with "
                             f"learning_rate {self.learning_rate!r}.")


@dataclass
class TrainConfig:
    """A whole run: `model` (keyword arguments of `SFDLMConfig`; `vocab_size` and special-token ids default to
    the tokenizer's), `tokenizer` (an `AutoTokenizer` name/folder; `None`: the synthetic corpus's word-level
    tokenizer, or a byte-level BPE of `tokenizer_vocab_size` trained on the corpus), `data` and `training`.
    The defaults are the `tiny` preset."""

    model: dict[str, Any] = field(default_factory=lambda: dict(TINY_MODEL))
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 4096
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(cpu_threads=1))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        reject_unknown_keys(values, cls, "Unknown top-level config key(s)")
        values = dict(values)
        model = values.pop("model", None)
        if model is not None and not isinstance(model, dict):
            raise ValueError(f"`model` must be a mapping of SFDLMConfig arguments, got {type(model).__name__}.")
        data = DataConfig.from_dict(values.pop("data", None) or {})
        training_values = values.pop("training", None) or {}
        reject_unknown_keys(training_values, TrainingConfig, "Unknown `training` option(s)")
        return cls(model=dict(TINY_MODEL) if model is None else dict(model), data=data,
                   training=TrainingConfig(**training_values), **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@functools.cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """YAML 1.2 floats: `1e-6` and `3E5` (no dot) too."""

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that numbers in exponent notation without a dot (`1e-6`, `3E5`) are floats, as
    in YAML 1.2 (PyYAML follows YAML 1.1, which reads them as strings)."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


@functools.cache
def model_section_keys() -> frozenset[str]:
    """What the `model` section may set: the arguments of `SFDLMConfig` and of transformers'
    `PretrainedConfig` (`dtype`, `output_hidden_states`, ...). Anything else is a typo, which `SFDLMConfig`
    itself would keep silently as an attribute (and write into config.json)."""
    import inspect

    from transformers import PretrainedConfig

    from .configuration_sfdlm import SFDLMConfig

    names = set()
    for cls in (SFDLMConfig, PretrainedConfig):
        names |= {name for name, parameter in inspect.signature(cls.__init__).parameters.items()
                  if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)}
    return frozenset(names - {"self", "transformers_version"}) | {"torch_dtype"}


def _check_dtype(key: str, value: Any) -> None:
    import torch

    if value is None or value == "auto":
        return
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`model.{key}` must be a torch floating-point dtype name such as 'float32' or "
                         f"'bfloat16' (or 'auto'), got {value!r}.")


def check_model_section(model: dict[str, Any]) -> None:
    """Build an `SFDLMConfig` from the `model` section at once, with placeholders for what the tokenizer
    supplies later (`vocab_size`, `mask_token_id`), so that a bad value is reported before any data is read
    or a tokenizer trained. Raises `ValueError` naming the section."""
    from .configuration_sfdlm import SFDLMConfig

    values = dict(model)
    unknown = sorted(set(values) - model_section_keys())
    if unknown:
        close = {key: difflib.get_close_matches(key, model_section_keys(), n=1) for key in unknown}
        hints = "".join(f" ({key!r}: did you mean {match[0]!r}?)" for key, match in close.items() if match)
        raise ValueError(f"Unknown `model` option(s) {unknown}{hints}; expected arguments of SFDLMConfig "
                         "(its docstring lists them) or of transformers' PretrainedConfig.")
    for key in ("dtype", "torch_dtype"):
        if key in values:
            _check_dtype(key, values[key])
    given_ids = [v for k in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")
                 if isinstance(v := values.get(k), int) and not isinstance(v, bool)]
    if values.get("vocab_size") is None:
        values["vocab_size"] = max(given_ids + [0]) + 2
    if values.get("mask_token_id") is None:
        values["mask_token_id"] = max(given_ids + [-1]) + 1  # no clash with a given id (eos != mask is checked)
    try:
        SFDLMConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"The `model` section is invalid: {error}") from None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"Override {item!r} must look like `section.key=value` (e.g. training.max_steps=100).")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"Override {item!r} has an empty key part.")
    return path, parse_yaml(raw) if raw.strip() else None


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML preset (`None`: the `tiny` defaults) and apply `section.key=value` overrides (values are
    parsed as YAML: `training.max_steps=100`, `model.stage_depths=[1,1]`, `training.ema_decay=null`). Numbers
    read as numbers in every section (`1e-6` included); the `model` section is validated here."""

    values: dict[str, Any] = TrainConfig().to_dict()  # overrides of the built-in preset keep its other keys
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        values = parse_yaml(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"Config file {str(path)!r} must hold a mapping, got {type(values).__name__}.")
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {item!r}: {key!r} is not a section.")
        node[keys[-1]] = value
    config = TrainConfig.from_dict(values)
    check_model_section(config.model)
    return config



# ============================================================================================== fine-tuning
# Fine-tuning defaults, different from pretraining: short runs, a smaller step size, no EMA (the adapter
# is small and the run short; `training.ema_decay=0.99` turns it on).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/sfdlm-lora", "max_steps": 300, "batch_size": 16, "learning_rate": 1e-3,
    "warmup_steps": 20, "ema_decay": None, "eval_every": 100, "checkpoint_every": 100, "log_every": 10,
}
FINETUNE_FORMATS = ("auto", "text", "sft")


def finetune_training_config(overrides: Sequence[str] = (), output_dir: str | None = None,
                             max_steps: int | None = None) -> TrainingConfig:
    """`TrainingConfig` from `FINETUNE_DEFAULTS`, then `output_dir`/`max_steps`, then `training.key=value`
    overrides (values parsed as YAML)."""
    values = dict(FINETUNE_DEFAULTS)
    if output_dir is not None:
        values["output_dir"] = output_dir
    if max_steps is not None:
        values["max_steps"] = max_steps
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.startswith("training.") or key.count(".") != 1:
            raise ValueError(f"Override {item!r} must look like `training.key=value` (e.g. training.max_steps=100).")
        values[key.split(".", 1)[1]] = parse_yaml(raw) if raw.strip() else None
    try:
        return TrainingConfig(**values)
    except TypeError as error:  # an unknown field
        raise ValueError(f"Unknown training option in {list(overrides)}: {error}") from None


@dataclass
class FinetuneConfig:
    """A LoRA fine-tuning run (the options of `sfdlm finetune`).

    Args:
        model: base model, a Hub repo id or `save_pretrained` folder of an SFDLM.
        data: text file/folder (domain adaptation) or JSON lines with prompt/response or messages (SFT).
        format: `"text"`, `"sft"` or `"auto"` (SFT for .json/.jsonl whose records have prompt/response or messages).
        tokenizer: tokenizer name or folder (default: the base model's).
        lora_r, lora_alpha, lora_dropout: the LoRA adapter (scale alpha / r).
        target_modules: `None` (`hf_sfdlm.lora.DEFAULT_TARGET_MODULES`), `"all-linear"`, a comma-separated
            string or a list of module names.
        train_ssm: also train the SSM parameters in full (PEFT `modules_to_save=["mixer"]`).
        block_size: text: length of the packed blocks; SFT: longest example (prompt + response).
        text_column: text: the column holding the text.
        chat_template: SFT: render prompt/response records through the tokenizer's chat template too.
        validation_fraction: held-out fraction of the data.
        merge: also save the merged model to `<output_dir>/merged`.
        base_model_id, repo_id, license: for the model card.
        trust_remote_code: allow running code shipped with the base model (`hf_sfdlm.remote_code`; default off).
        training: the `TrainingConfig` (default: `finetune_training_config()`).
    """

    model: str
    data: str
    format: str = "auto"
    tokenizer: str | None = None
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    train_ssm: bool = False
    block_size: int = 128
    text_column: str = "text"
    chat_template: bool = False
    validation_fraction: float = 0.05
    merge: bool = False
    base_model_id: str | None = None
    repo_id: str | None = None
    license: str = "apache-2.0"
    trust_remote_code: bool = False
    training: TrainingConfig = field(default_factory=finetune_training_config)

    def options(self) -> dict[str, Any]:
        """The fine-tuning options (everything but `training`), as stored in the run's logs."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "training"}


__all__ = ["FINETUNE_DEFAULTS", "FINETUNE_FORMATS", "MIXED_PRECISION", "TINY_MODEL", "FinetuneConfig", "TrainConfig",
           "TrainingConfig", "check_model_section", "finetune_training_config", "load_config", "parse_yaml"]
