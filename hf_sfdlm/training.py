"""Training diffusion language models with accelerate: configuration, the loop, and the standard pipeline.

Three layers, each usable on its own:

    TrainConfig / load_config   the YAML presets (`training/configs/*.yaml`) with `a.b=value` overrides;
                                `TrainConfig()` itself is the `tiny` preset
    DiffusionTrainer            the loop, for any model whose forward returns `.loss` (or any `compute_loss`):
                                AdamW, warmup + schedule from `transformers.get_scheduler`, gradient accumulation
                                and clipping, mixed precision, EMA, periodic held-out NELBO, trackers (TensorBoard,
                                JSON lines), tqdm, non-finite loss detection, atomic checkpoints, exact resume
    run_training                the standard pipeline: data -> tokenizer -> checks -> model -> DiffusionTrainer

The loop in one breath: every optimizer step consumes `gradient_accumulation_steps` micro-batches of the
global batch (split across processes, so the global batch does not depend on the number of processes),
then clips, steps the optimizer and the schedule, updates the EMA, logs, evaluates and checkpoints. Data
order is a function of (seed, epoch) only and the position in the epoch is checkpointed, so a resumed run
reads exactly the batches the uninterrupted run would have read; with the RNG, optimizer, scheduler and EMA
restored by `accelerator.load_state`, a resumed CPU run ends with bit-identical weights.

Reuse (e.g. LoRA fine-tuning): build your own model (a PEFT-wrapped one works), datasets and collator, and
pass them to `DiffusionTrainer`; add a `TrainerCallback` whose `on_save(trainer, directory)` writes a model
card next to every saved model and whose `on_train_end(trainer, result)` sees the final metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker
from torch import nn

from .checkpointing import Checkpoint, CheckpointManager, fingerprint_hash
from .data import DataConfig, DiffusionCollator
from .diffusion_lm import scored_positions

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")
BUILTIN_TRACKERS = ("tensorboard", "jsonl")

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


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient norm became NaN or infinite; the step that produced it was not applied."""


# ============================================================================================== configuration
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
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"`training.learning_rate` must be a positive number, got {self.learning_rate!r}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"`training.mixed_precision` must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`training.ema_decay` must be in (0, 1) or null, got {self.ema_decay!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"`training.max_grad_norm` must be positive or null, got {self.max_grad_norm!r}.")
        if self.eval_max_sequences is not None:
            positive_int("eval_max_sequences")
        if self.cpu_threads is not None:
            positive_int("cpu_threads")
        if not 0.0 <= self.min_lr_ratio < 1.0:
            raise ValueError(f"`training.min_lr_ratio` must be in [0, 1), got {self.min_lr_ratio!r}.")
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.lr_scheduler not in names:
            raise ValueError(f"`training.lr_scheduler` must be one of {names}, got {self.lr_scheduler!r}.")
        if isinstance(self.log_with, str):
            self.log_with = [self.log_with]


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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown top-level config key(s) {unknown}; expected some of {sorted(known)}.")
        values = dict(values)
        model = values.pop("model", None)
        if model is not None and not isinstance(model, dict):
            raise ValueError(f"`model` must be a mapping of SFDLMConfig arguments, got {type(model).__name__}.")
        data = DataConfig.from_dict(values.pop("data", None) or {})
        training_values = values.pop("training", None) or {}
        allowed = {f.name for f in fields(TrainingConfig)}
        unknown = sorted(set(training_values) - allowed)
        if unknown:
            raise ValueError(f"Unknown `training` option(s) {unknown}; expected some of {sorted(allowed)}.")
        return cls(model=dict(TINY_MODEL) if model is None else dict(model), data=data,
                   training=TrainingConfig(**training_values), **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_override(item: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in item:
        raise ValueError(f"Override {item!r} must look like `section.key=value` (e.g. training.max_steps=100).")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ValueError(f"Override {item!r} has an empty key part.")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return path, value


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML preset (`None`: the `tiny` defaults) and apply `section.key=value` overrides (values are
    parsed as YAML: `training.max_steps=100`, `model.stage_depths=[1,1]`, `training.ema_decay=null`)."""
    import yaml

    values: dict[str, Any] = TrainConfig().to_dict()  # overrides of the built-in preset keep its other keys
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
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
    return TrainConfig.from_dict(values)


# ============================================================================================== logging
class JSONLinesTracker(GeneralTracker):
    """Accelerate tracker writing one JSON object per `log` call to `<dir>/metrics.jsonl` (flushed at once).

    On resume, `truncate_after(step)` drops the lines a killed run wrote after the checkpoint it resumes
    from, so the file always describes one consistent run.
    """

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str | os.PathLike, filename: str = "metrics.jsonl"):
        super().__init__()
        self.path = Path(logging_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        pass

    def store_init_configuration(self, values: dict) -> None:
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=1, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in values.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _line_step(line) is not None and _line_step(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def finish(self) -> None:
        pass


def _line_step(line: str) -> int | None:
    try:
        return json.loads(line).get("step")
    except ValueError:  # a line cut short by a kill: drop it
        return None


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` file (see `JSONLinesTracker`)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# ============================================================================================== the loop
class TrainerCallback:
    """Hooks of `DiffusionTrainer`; override the ones you need. All run on every process unless noted."""

    def on_train_begin(self, trainer: "DiffusionTrainer") -> None: ...

    def on_step_end(self, trainer: "DiffusionTrainer", step: int, loss: float) -> None: ...

    def on_evaluate(self, trainer: "DiffusionTrainer", metrics: dict[str, float]) -> None: ...

    def on_save(self, trainer: "DiffusionTrainer", directory: Path) -> None:
        """Main process only: the model, tokenizer and generation config were just written to `directory`
        (a temporary folder published right after this returns): add files such as a model card here."""

    def on_train_end(self, trainer: "DiffusionTrainer", result: "TrainResult") -> None: ...


class TrainState:
    """Position of the run (checkpointed with `accelerator.register_for_checkpointing`)."""

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tokens = 0
        self.best_eval = math.inf
        self.best_step = -1

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the dataset that depends only on (seed, epoch): any epoch's order is reproducible
    without replaying the ones before it, which is what exact resumption needs."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


@dataclass
class TrainResult:
    """What a finished run reports."""

    step: int
    train_loss: float | None
    eval_nelbo: float | None
    best_eval_nelbo: float | None
    best_step: int | None
    tokens: int
    seconds: float
    output_dir: Path
    resumed_from: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def default_compute_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss: `model(**batch).loss` (the NELBO per scored token for SFDLM)."""
    return model(**batch).loss


@torch.no_grad()
def default_evaluate_batch(model: nn.Module, batch: dict[str, torch.Tensor], num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (NELBO in nats, scored tokens) of a held-out batch: the model's Monte Carlo `nelbo` with
    `num_samples` noise levels when it has one, else `num_samples` draws of its per-token training loss."""
    labels = batch.get("labels")
    mask = batch.get("attention_mask")
    tokens = scored_positions(batch["input_ids"], labels, mask).sum(-1)
    if hasattr(model, "nelbo"):
        nats = model.nelbo(batch["input_ids"], attention_mask=mask, labels=labels, num_samples=num_samples)
    else:
        loss = torch.stack([model(**batch).loss for _ in range(num_samples)]).mean()
        nats = loss * tokens
    return nats.float(), tokens


def _no_decay(name: str, parameter: nn.Parameter) -> bool:
    """Biases and norm scales (1-D), token/position embeddings (and the head tied to them), and the SSM's own
    parameters (A, dt, C, D: decaying them changes the dynamics, not just the scale) get no weight decay."""
    return parameter.ndim < 2 or "embed_tokens" in name or "embeddings." in name or ".mixer." in name


class DiffusionTrainer:
    """The training loop (see the module docstring).

    Args:
        model: the model to train (an `SFDLMForDiffusionLM`, a PEFT-wrapped one, or any module that
            `compute_loss` can drive). Only parameters with `requires_grad` are optimised.
        args: a `TrainingConfig`.
        train_dataset: a map-style dataset (or a `datasets.IterableDataset`) of examples the collator reads.
        eval_dataset: held-out examples (optional).
        data_collator: turns a list of examples into a batch (default: `DiffusionCollator`).
        tokenizer: saved next to the model.
        compute_loss: `(model, batch) -> scalar loss` (default: `model(**batch).loss`).
        evaluate_batch: `(model, batch, num_samples) -> (nats per sequence, tokens per sequence)`.
        callbacks: `TrainerCallback`s.
        fingerprint: extra facts a checkpoint must share with a run that resumes it (e.g. the data source).
        run_config: the whole run's configuration, stored by the trackers.
        accelerator_kwargs: extra `accelerate.Accelerator` arguments.
    """

    def __init__(self, model: nn.Module, args: TrainingConfig, train_dataset, eval_dataset=None,
                 data_collator: Callable | None = None, tokenizer=None,
                 compute_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None,
                 evaluate_batch: Callable | None = None, callbacks: Sequence[TrainerCallback] = (),
                 fingerprint: dict[str, Any] | None = None, run_config: dict[str, Any] | None = None,
                 accelerator_kwargs: dict[str, Any] | None = None):
        from accelerate import Accelerator, DataLoaderConfiguration

        self.args = args
        self.output_dir = Path(args.output_dir)
        self.tokenizer = tokenizer
        self.compute_loss = compute_loss or default_compute_loss
        self.evaluate_batch = evaluate_batch or default_evaluate_batch
        self.callbacks = list(callbacks)
        self.run_config = run_config or {"training": asdict(args)}
        self.trackers = self._make_trackers()
        accelerator_kwargs = {"cpu": _no_accelerator(), **(accelerator_kwargs or {})}
        self.accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=self.trackers or None,
            project_dir=str(self.output_dir / "logs"),
            # The DataLoader yields global batches, split across processes: same global batch, any world size.
            # No dispatching for streams: every process reads the stream itself, through a loader that keeps
            # our seeded generator (the dispatcher drops it and draws from the global RNG at every epoch).
            dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False),
            step_scheduler_with_optimizer=False,
            **accelerator_kwargs,
        )
        acc = self.accelerator
        self._check_world(acc)
        if args.cpu_threads is not None and acc.device.type == "cpu":
            torch.set_num_threads(args.cpu_threads)
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if data_collator is None and pad_id is None:
            raise ValueError("The default collator pads with the tokenizer's pad token: pass a tokenizer with "
                             "`pad_token_id` (see `prepare_tokenizer`) or a `data_collator`.")
        self.data_collator = data_collator or DiffusionCollator(pad_token_id=pad_id)

        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.ema = None
        if args.ema_decay is not None:
            from accelerate.utils import DistributedType

            if acc.distributed_type == DistributedType.FSDP:
                raise ValueError("`training.ema_decay` is not supported with FSDP (the EMA would hold sharded "
                                 "weights); set `training.ema_decay=null` or train with DDP.")
            from .ema import create_ema

            self.ema = create_ema(model.to(acc.device), args.ema_decay)
        self.state = TrainState()
        self.fingerprint = self._fingerprint(model, fingerprint or {})

        micro_batch = args.batch_size // args.gradient_accumulation_steps
        loader_kwargs = dict(batch_size=micro_batch, collate_fn=self.data_collator, num_workers=args.num_workers,
                             drop_last=True, generator=torch.Generator().manual_seed(args.seed))
        self.iterable_train = isinstance(train_dataset, torch.utils.data.IterableDataset)
        if not self.iterable_train:
            if len(train_dataset) < micro_batch:
                raise ValueError(f"The training set has {len(train_dataset)} examples, fewer than one micro-batch "
                                 f"({micro_batch}): lower `training.batch_size` or add data.")
            self.sampler = EpochSampler(len(train_dataset), args.seed)
            loader_kwargs["sampler"] = self.sampler
        self.train_dataset = train_dataset
        train_loader = torch.utils.data.DataLoader(train_dataset, **loader_kwargs)

        eval_loader = None
        if eval_dataset is not None:
            if args.eval_max_sequences is not None:
                eval_dataset = (eval_dataset.take(args.eval_max_sequences) if hasattr(eval_dataset, "take")
                                and isinstance(eval_dataset, torch.utils.data.IterableDataset)
                                else eval_dataset.select(range(min(len(eval_dataset), args.eval_max_sequences))))
            eval_batch = max(acc.num_processes, micro_batch // acc.num_processes * acc.num_processes)
            eval_loader = torch.utils.data.DataLoader(eval_dataset, batch_size=eval_batch,
                                                      collate_fn=self.data_collator, shuffle=False)

        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("The model has no parameter with `requires_grad=True`: nothing to train.")
        groups = [
            {"params": [p for n, p in trainable if not _no_decay(n, p)], "weight_decay": args.weight_decay},
            {"params": [p for n, p in trainable if _no_decay(n, p)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        scheduler = self._make_scheduler(optimizer)

        prepared = acc.prepare(model, optimizer, train_loader, scheduler,
                               *([eval_loader] if eval_loader is not None else []))
        self.model, self.optimizer, self.train_loader, self.scheduler = prepared[:4]
        self.eval_loader = prepared[4] if eval_loader is not None else None
        acc.register_for_checkpointing(self.state)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)

    # ------------------------------------------------------------------ setup helpers
    def _make_trackers(self) -> list:
        trackers = []
        for name in self.args.log_with:
            if name == "jsonl":
                trackers.append(JSONLinesTracker(self.output_dir / "logs"))
            else:
                trackers.append(name)
        return trackers

    def _check_world(self, acc) -> None:
        micro = self.args.batch_size // self.args.gradient_accumulation_steps
        if micro % acc.num_processes:
            raise ValueError(f"The micro-batch ({self.args.batch_size} / {self.args.gradient_accumulation_steps} "
                             f"= {micro} sequences) must be divisible by the {acc.num_processes} processes.")

    def _make_scheduler(self, optimizer):
        from transformers import get_scheduler

        name, kwargs = self.args.lr_scheduler, None
        if name == "cosine" and self.args.min_lr_ratio > 0:
            name, kwargs = "cosine_with_min_lr", {"min_lr_rate": self.args.min_lr_ratio}
        return get_scheduler(name, optimizer, num_warmup_steps=self.args.warmup_steps,
                             num_training_steps=self.args.max_steps, scheduler_specific_kwargs=kwargs)

    def _fingerprint(self, model: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            described = {k: v for k, v in config.to_dict().items()
                         if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype")}
        else:
            described = {n: list(p.shape) for n, p in model.state_dict().items()}
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        return {"model": fingerprint_hash(described), "trainable": fingerprint_hash(trainable),
                "num_processes": self.accelerator.num_processes, "batch_size": self.args.batch_size,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps, "seed": self.args.seed,
                "ema": self.args.ema_decay is not None, **extra}

    # ------------------------------------------------------------------ data order
    def _set_epoch(self, epoch: int) -> None:
        if not self.iterable_train:
            self.sampler.set_epoch(epoch)
        elif hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(epoch)

    def _micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches forever, epoch after epoch, resuming mid-epoch at `state.batch_in_epoch`."""
        while True:
            skip = self.state.batch_in_epoch
            loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            # accelerate's loaders re-apply their own epoch counter when iterated: set it on the loader itself
            # (a fresh loader after a resume would otherwise replay epoch 0's order).
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.state.epoch)
            self._set_epoch(self.state.epoch)
            produced = False
            for batch in loader:
                produced = True
                self.state.batch_in_epoch += 1
                yield batch
            if not produced and skip == 0:
                raise ValueError("The training data yielded no batch in a whole epoch.")
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # ------------------------------------------------------------------ the loop
    def train(self, resume: bool = False) -> TrainResult:
        """Train to `args.max_steps`. With `resume`, continue from the newest usable checkpoint in
        `<output_dir>/checkpoints` (a fresh start when there is none)."""
        from tqdm.auto import tqdm

        acc, args = self.accelerator, self.args
        manager = CheckpointManager(self.output_dir / "checkpoints", args.keep_checkpoints,
                                    fingerprint=self.fingerprint, checksums=args.checkpoint_checksums)
        if acc.is_main_process:
            manager.remove_temporary()
            self._remove_unfinished_saves()
        acc.wait_for_everyone()
        from accelerate.utils import set_seed

        # Different corruption noise on each process; the same on every run (and restored on resume).
        set_seed(args.seed + 1 + acc.process_index)
        resumed: Checkpoint | None = manager.load_latest(acc) if resume else None
        if resume and resumed is None:
            logger.info("No checkpoint in %s: starting from scratch.", manager.root)
        if resumed is not None:
            acc.print(f"Resumed from {resumed.path} (step {self.state.step}, epoch {self.state.epoch}).")
        self._init_trackers(resumed)
        for callback in self.callbacks:
            callback.on_train_begin(self)

        start_time = time.perf_counter()
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        last_loss = None
        eval_nelbo = None
        progress = tqdm(total=args.max_steps, initial=self.state.step, desc="train", dynamic_ncols=True,
                        disable=not (args.progress_bar and acc.is_local_main_process))
        batches = self._micro_batches()
        self.model.train()
        while self.state.step < args.max_steps:
            loss, tokens, grad_norm = self._optimizer_step(batches)
            self.state.step += 1
            self.state.tokens += tokens
            step = self.state.step
            last_loss = loss
            window_loss += loss
            window_tokens += tokens
            progress.update(1)
            for callback in self.callbacks:
                callback.on_step_end(self, step, loss)
            if step % args.log_every == 0 or step == args.max_steps:
                elapsed = time.perf_counter() - window_start
                steps_in_window = (step - 1) % args.log_every + 1
                logs = {"train/loss": window_loss / steps_in_window, "train/lr": self.scheduler.get_last_lr()[0],
                        "train/tokens_per_second": window_tokens / max(elapsed, 1e-9),
                        "train/tokens": self.state.tokens, "train/epoch": self.state.epoch}
                if grad_norm is not None:
                    logs["train/grad_norm"] = grad_norm
                acc.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            at_end = step == args.max_steps
            if self.eval_loader is not None and ((args.eval_every and step % args.eval_every == 0) or at_end):
                eval_nelbo = self._evaluate_and_track(progress)
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or at_end:
                manager.save(acc, step, metadata={"epoch": self.state.epoch, "loss": loss})
        progress.close()

        self.save_model(self.output_dir)
        result = TrainResult(step=self.state.step, train_loss=last_loss, eval_nelbo=eval_nelbo,
                             best_eval_nelbo=None if math.isinf(self.state.best_eval) else self.state.best_eval,
                             best_step=None if self.state.best_step < 0 else self.state.best_step,
                             tokens=self.state.tokens, seconds=time.perf_counter() - start_time,
                             output_dir=self.output_dir, resumed_from=resumed.path if resumed else None)
        for callback in self.callbacks:
            callback.on_train_end(self, result)
        acc.end_training()
        return result

    def _optimizer_step(self, batches: Iterator[dict]) -> tuple[float, int, float | None]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss, the
        global number of scored tokens and the gradient norm. Raises `NonFiniteLossError` before applying a
        step whose loss or gradients are not finite."""
        acc, args = self.accelerator, self.args
        accumulation = args.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=acc.device)
        tokens = torch.zeros((), device=acc.device)
        for micro in range(accumulation):
            batch = next(batches)
            sync = contextlib.nullcontext() if micro == accumulation - 1 else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    loss = self.compute_loss(self.model, batch)
                acc.backward(loss / accumulation)
            loss_sum += loss.detach().float()
            tokens += _scored_tokens(batch)
        # One collective per step: mean loss over processes and micro-batches, global token count.
        totals = acc.reduce(torch.stack([loss_sum / accumulation, tokens]), reduction="sum")
        mean_loss = float(totals[0]) / acc.num_processes
        step = self.state.step + 1
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"Training loss is {mean_loss} at step {step} (epoch {self.state.epoch}); "
                                     "the step was not applied. Lower `training.learning_rate`, enable "
                                     "`training.max_grad_norm`, or use bf16 instead of fp16.")
        grad_norm = None
        if args.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm))
            if not math.isfinite(grad_norm) and args.mixed_precision != "fp16":  # fp16: the scaler skips the step
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(f"Gradient norm is {grad_norm} at step {step} (loss {mean_loss:.4f}); "
                                         "the step was not applied.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update_parameters(self.accelerator.unwrap_model(self.model))
        return mean_loss, int(totals[1]), grad_norm

    def _init_trackers(self, resumed: Checkpoint | None) -> None:
        acc = self.accelerator
        init_kwargs = {}
        if resumed is not None:
            init_kwargs["tensorboard"] = {"purge_step": resumed.step + 1}
            if acc.is_main_process:
                for tracker in self.trackers:
                    if isinstance(tracker, JSONLinesTracker):
                        tracker.truncate_after(resumed.step)
        if self.trackers:
            acc.init_trackers("sfdlm", config=_flatten(self.run_config), init_kwargs=init_kwargs)

    # ------------------------------------------------------------------ evaluation and saving
    def eval_model(self) -> nn.Module:
        """The weights used for evaluation and saving: the EMA copy if there is one, else the trained model."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def evaluate(self, num_samples: int | None = None) -> dict[str, float]:
        """Held-out NELBO per token (nats), its perplexity exp(NELBO) and bits per token, with the evaluation
        weights. The noise is seeded afresh each time (common random numbers across evaluations) and the
        training RNG is left untouched."""
        if self.eval_loader is None:
            raise ValueError("No `eval_dataset` was given to the trainer.")
        acc = self.accelerator
        model = self.eval_model()
        was_training = model.training
        model.eval()
        num_samples = num_samples or self.args.eval_num_samples
        devices = [] if acc.device.type == "cpu" else [acc.device]
        total_nats = torch.zeros((), dtype=torch.float64, device=acc.device)
        total_tokens = torch.zeros((), dtype=torch.float64, device=acc.device)
        with torch.random.fork_rng(devices=devices, device_type=acc.device.type):
            torch.manual_seed(self.args.seed + 10_007 + acc.process_index)
            for batch in self.eval_loader:
                with acc.autocast():
                    nats, tokens = self.evaluate_batch(model, batch, num_samples)
                nats, tokens = acc.gather_for_metrics((nats.double(), tokens.double()))
                total_nats += nats.sum()
                total_tokens += tokens.sum()
        model.train(was_training)
        nelbo = float(total_nats / total_tokens.clamp_min(1))
        return {"eval/nelbo": nelbo, "eval/perplexity": math.exp(min(nelbo, 700.0)),
                "eval/bits_per_token": nelbo / math.log(2), "eval/tokens": float(total_tokens)}

    def _evaluate_and_track(self, progress) -> float:
        metrics = self.evaluate()
        nelbo = metrics["eval/nelbo"]
        if not math.isfinite(nelbo):
            raise NonFiniteLossError(f"Held-out NELBO is {nelbo} at step {self.state.step}.")
        self.accelerator.log(metrics, step=self.state.step)
        improved = nelbo < self.state.best_eval
        if improved:
            self.state.best_eval, self.state.best_step = nelbo, self.state.step
        message = (f"step {self.state.step}: held-out NELBO {nelbo:.4f} nats/token "
                   f"(perplexity {metrics['eval/perplexity']:.2f}){' *best*' if improved else ''}")
        if self.accelerator.is_main_process:
            (progress.write if not progress.disable else print)(message)
        for callback in self.callbacks:
            callback.on_evaluate(self, metrics)
        if improved and self.args.save_best:
            self.save_model(self.output_dir / "best")
        return nelbo

    def save_model(self, directory: str | os.PathLike) -> Path:
        """`save_pretrained` the evaluation weights (EMA if any), the tokenizer and the generation config
        into `directory`. Everything is written to a temporary folder first (callbacks' `on_save` add their
        files there), then published: a dedicated folder such as `best/` is swapped in by renames, the run's
        own output folder (which also holds checkpoints and logs) file by file, weights last, so that no file
        is ever seen half-written. Every process must call this."""
        acc = self.accelerator
        directory = Path(directory)
        model = self.eval_model()
        acc.wait_for_everyone()
        if acc.is_main_process:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = directory.parent / f".tmp-save-{directory.name or 'model'}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            for callback in self.callbacks:
                callback.on_save(self, tmp)
            if directory.resolve() == self.output_dir.resolve():
                directory.mkdir(parents=True, exist_ok=True)
                for item in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".safetensors"):
                    target = directory / item.name
                    if target.is_dir():
                        shutil.rmtree(target)
                    os.replace(item, target)
                tmp.rmdir()
            else:
                old = directory.parent / f".tmp-save-{directory.name}-old-{os.getpid()}"
                if directory.exists():
                    os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return directory

    def _remove_unfinished_saves(self) -> None:
        """Clean up after model saves interrupted by a crash (main process, before training)."""
        if not self.output_dir.is_dir():
            return
        best = self.output_dir / "best"
        previous = sorted(self.output_dir.glob(".tmp-save-best-old-*"))
        if previous and not best.exists():  # killed between the two renames: the old best is complete
            os.replace(previous[0], best)
        for path in self.output_dir.glob(".tmp-save-*"):
            shutil.rmtree(path, ignore_errors=True)


def _no_accelerator() -> bool:
    """True on a machine with no GPU/XPU/NPU/MPS. accelerate only forms a multi-process CPU group (gloo) when
    told `cpu=True`: without it, processes started by torchrun on such a machine each train alone."""
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())


def _scored_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return scored_positions(batch["input_ids"], batch.get("labels"), batch.get("attention_mask")).sum().float()


# ============================================================================================== the pipeline
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
                 pipeline: Pipeline | None = None) -> tuple[TrainResult, DiffusionTrainer]:
    """The standard run: `prepare_pipeline`, then `DiffusionTrainer(...).train(resume)`."""
    pipeline = pipeline or prepare_pipeline(config)
    trainer = DiffusionTrainer(pipeline.model, config.training, pipeline.train_dataset, pipeline.eval_dataset,
                               tokenizer=pipeline.tokenizer, callbacks=callbacks,
                               fingerprint=data_fingerprint(config.data), run_config=config.to_dict())
    return trainer.train(resume=resume), trainer


__all__ = [
    "DiffusionTrainer",
    "EpochSampler",
    "JSONLinesTracker",
    "NonFiniteLossError",
    "Pipeline",
    "TINY_MODEL",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainerCallback",
    "TrainingConfig",
    "build_model",
    "build_model_config",
    "check_model_inputs",
    "data_fingerprint",
    "default_compute_loss",
    "default_evaluate_batch",
    "load_config",
    "prepare_pipeline",
    "read_metrics",
    "run_training",
]
