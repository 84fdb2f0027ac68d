"""`DiffusionTrainer`: the accelerate training loop for diffusion language models.

It drives any model whose forward returns `.loss` (or any `compute_loss`): AdamW, warmup + schedule from
`transformers.get_scheduler`, gradient accumulation and clipping, mixed precision, EMA, periodic held-out
NELBO, trackers (TensorBoard, JSON lines), tqdm, non-finite loss detection, atomic checkpoints, exact resume.

The loop in one breath: every optimizer step consumes `gradient_accumulation_steps` micro-batches of the
global batch (split across processes, so the global batch does not depend on the number of processes),
then clips, steps the optimizer and the schedule, updates the EMA, logs, evaluates and checkpoints. Data
order is a function of (seed, epoch) only and the position in the epoch is checkpointed, so a resumed run
reads exactly the batches the uninterrupted run would have read; with the RNG, optimizer, scheduler and EMA
restored, a resumed CPU run ends with bit-identical weights.

Reuse (e.g. LoRA fine-tuning): build your own model (a PEFT-wrapped one works), datasets and collator, and
pass them to `DiffusionTrainer`; add a `TrainerCallback` whose `on_save(trainer, directory)` writes a model
card next to every saved model and whose `on_train_end(trainer, result)` sees the final metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpointing import Checkpoint, CheckpointManager, check_output_dir, clear_run, fingerprint_hash
from .data import DiffusionCollator
from .diffusion_lm import scored_positions
from .integrity import write_checksums
from .state_files import load_module, load_tree, rng_state, save_module, save_tree, set_rng_state
from .tracking import JSONLinesTracker, flatten_config
from .train_config import TrainingConfig

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient norm became NaN or infinite; the step that produced it was not applied."""


class TrainerCallback:
    """Hooks of `DiffusionTrainer`; override the ones you need. All run on every process unless noted."""

    def on_train_begin(self, trainer: "DiffusionTrainer") -> None: ...

    def on_step_end(self, trainer: "DiffusionTrainer", step: int, loss: float) -> None: ...

    def on_evaluate(self, trainer: "DiffusionTrainer", metrics: dict[str, float]) -> None:
        """After each held-out evaluation; on resume, also once (after `on_train_begin`) with the latest
        evaluation recorded in the checkpoint, so that a callback sees what it saw in the uninterrupted run."""

    def on_save(self, trainer: "DiffusionTrainer", directory: Path) -> None:
        """Main process only: the model, tokenizer and generation config were just written to `directory`
        (a temporary folder published right after this returns): add files such as a model card here."""

    def on_train_end(self, trainer: "DiffusionTrainer", result: "TrainResult") -> None: ...


class TrainState:
    """Position of the run, checkpointed as JSON: step, place in the data, best evaluation, the running sums
    of the current logging window and the latest evaluation (so a resumed run logs what an uninterrupted
    one would)."""

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tokens = 0
        self.best_eval = math.inf
        self.best_step = -1
        self.window_loss = 0.0
        self.window_tokens = 0
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state) - set(vars(self)))
        if unknown:
            raise ValueError(f"Unknown training state field(s) {unknown}.")
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
    already_finished: bool = False  # resumed a run that had finished: nothing was trained or written

    def summary(self) -> dict[str, Any]:
        """The figures of the run (JSON-serialisable, without paths)."""
        return {k: v for k, v in asdict(self).items() if k not in ("output_dir", "resumed_from", "already_finished")}


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
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.tokenizer = tokenizer
        self.compute_loss = compute_loss or default_compute_loss
        self.evaluate_batch = evaluate_batch or default_evaluate_batch
        self.callbacks = list(callbacks)
        self.run_config = run_config or {"training": asdict(args)}
        self._unsharded: nn.Module | None = None  # see `save_model`
        self.trackers = self._make_trackers()
        self.accelerator = self._make_accelerator(accelerator_kwargs)
        self.data_collator = self._make_collator(data_collator, tokenizer)
        self.ema = self._setup_model(model)
        self.state = TrainState()
        self.fingerprint = self._fingerprint(model, fingerprint or {})
        train_loader = self._make_train_loader(train_dataset)
        eval_loader = self._make_eval_loader(eval_dataset)
        optimizer = self._make_optimizer(model)
        scheduler = self._make_scheduler(optimizer)
        self._prepare(model, optimizer, train_loader, scheduler, eval_loader)

    # ------------------------------------------------------------------ setup steps
    def _make_accelerator(self, accelerator_kwargs: dict[str, Any] | None):
        from accelerate import Accelerator, DataLoaderConfiguration
        from accelerate.utils import DistributedType

        args = self.args
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            log_with=self.trackers or None,
            project_dir=str(self.output_dir / "logs"),
            # The DataLoader yields global batches, split across processes: same global batch, any world size.
            # No dispatching for streams: every process reads the stream itself, through a loader that keeps
            # our seeded generator (the dispatcher drops it and draws from the global RNG at every epoch).
            dataloader_config=DataLoaderConfiguration(split_batches=True, dispatch_batches=False),
            step_scheduler_with_optimizer=False,
            **{"cpu": _no_accelerator(), **(accelerator_kwargs or {})},
        )
        if _fsdp_requested() and accelerator.distributed_type != DistributedType.FSDP:
            _shard_on_cpu(accelerator)
        self._check_world(accelerator)
        if args.cpu_threads is not None and accelerator.device.type == "cpu":
            torch.set_num_threads(args.cpu_threads)
        return accelerator

    @staticmethod
    def _make_collator(data_collator: Callable | None, tokenizer) -> Callable:
        if data_collator is not None:
            return data_collator
        pad_id = getattr(tokenizer, "pad_token_id", None)
        if pad_id is None:
            raise ValueError("The default collator pads with the tokenizer's pad token: pass a tokenizer with "
                             "`pad_token_id` (see `prepare_tokenizer`) or a `data_collator`.")
        return DiffusionCollator(pad_token_id=pad_id)

    def _setup_model(self, model: nn.Module):
        """Gradient checkpointing and compilation if asked; returns the EMA copy of the model (or None)."""
        from transformers import PreTrainedModel

        args = self.args
        if self._fsdp and not isinstance(model, PreTrainedModel):
            raise ValueError(f"FSDP trains a transformers PreTrainedModel in full (it is saved from its gathered "
                             f"weights), got {type(model).__name__}; train adapters (PEFT) with DDP instead.")
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        ema = self._make_ema(model) if args.ema_decay is not None else None
        if args.compile:  # in place (state dict names unchanged), after the EMA copied the eager model
            model.compile(**({"backend": args.compile} if isinstance(args.compile, str) else {}))
        return ema

    def _make_ema(self, model: nn.Module):
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            raise ValueError("`training.ema_decay` is not supported with FSDP (the EMA would hold sharded "
                             "weights); set `training.ema_decay=null` or train with DDP.")
        from .ema import create_ema

        return create_ema(model.to(acc.device), self.args.ema_decay)

    @property
    def _micro_batch(self) -> int:
        return self.args.batch_size // self.args.gradient_accumulation_steps

    def _make_train_loader(self, train_dataset) -> torch.utils.data.DataLoader:
        args, micro_batch = self.args, self._micro_batch
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
        return torch.utils.data.DataLoader(train_dataset, **loader_kwargs)

    def _make_eval_loader(self, eval_dataset) -> torch.utils.data.DataLoader | None:
        if eval_dataset is None:
            return None
        limit, processes = self.args.eval_max_sequences, self.accelerator.num_processes
        if limit is not None:
            eval_dataset = (eval_dataset.take(limit) if hasattr(eval_dataset, "take")
                            and isinstance(eval_dataset, torch.utils.data.IterableDataset)
                            else eval_dataset.select(range(min(len(eval_dataset), limit))))
        eval_batch = max(processes, self._micro_batch // processes * processes)
        return torch.utils.data.DataLoader(eval_dataset, batch_size=eval_batch, collate_fn=self.data_collator,
                                           shuffle=False)

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        args = self.args
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("The model has no parameter with `requires_grad=True`: nothing to train.")
        groups = [
            {"params": [p for n, p in trainable if not _no_decay(n, p)], "weight_decay": args.weight_decay},
            {"params": [p for n, p in trainable if _no_decay(n, p)], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                                 betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)

    def _prepare(self, model, optimizer, train_loader, scheduler, eval_loader) -> None:
        """`accelerator.prepare` the model, optimizer, loaders and schedule."""
        acc = self.accelerator
        prepared = acc.prepare(model, optimizer, train_loader, scheduler,
                               *([eval_loader] if eval_loader is not None else []))
        self.model, self.optimizer, self.train_loader, self.scheduler = prepared[:4]
        self.eval_loader = prepared[4] if eval_loader is not None else None

    def _make_trackers(self) -> list:
        trackers = []
        for name in self.args.log_with:
            if name == "jsonl":
                trackers.append(JSONLinesTracker(self.output_dir / "logs"))
            else:
                trackers.append(name)
        return trackers

    def _check_world(self, acc) -> None:
        micro = self._micro_batch
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
    def train(self, resume: bool = False, overwrite: bool = False) -> TrainResult:
        """Train to `args.max_steps`. A folder another run used is refused unless `resume` (continue from the
        newest usable checkpoint in `<output_dir>/checkpoints`; a fresh start, with a warning, when there is
        none; nothing to do when that run already finished) or `overwrite` (delete its checkpoints and logs)."""
        from tqdm.auto import tqdm

        acc, args = self.accelerator, self.args
        manager = self._start(resume, overwrite)
        resumed = self._resume(manager) if resume else None
        if resumed is not None and (done := self._finished_result(manager, resumed)) is not None:
            return done
        if acc.is_main_process:
            manager.clear_finished()
        self._init_trackers(resumed.step if resumed else 0 if resume else None)
        for callback in self.callbacks:
            callback.on_train_begin(self)
            if resumed is not None and self.state.last_eval:  # callbacks see the evaluation the checkpoint saw
                callback.on_evaluate(self, dict(self.state.last_eval))

        start_time = window_start = time.perf_counter()
        progress = tqdm(total=args.max_steps, initial=self.state.step, desc="train", dynamic_ncols=True,
                        disable=not (args.progress_bar and acc.is_local_main_process))
        batches, state = self._micro_batches(), self.state
        self.model.train()
        while state.step < args.max_steps:
            loss, tokens, grad_norm = self._optimizer_step(batches)
            state.step += 1
            step = state.step
            state.tokens += tokens
            state.window_tokens += tokens
            state.window_loss += loss
            state.last_loss = loss
            progress.update(1)
            for callback in self.callbacks:
                callback.on_step_end(self, step, loss)
            if step % args.log_every == 0 or step == args.max_steps:
                self._log_window(progress, grad_norm, time.perf_counter() - window_start)
                window_start = time.perf_counter()
            at_end = step == args.max_steps
            if self.eval_loader is not None and ((args.eval_every and step % args.eval_every == 0) or at_end):
                self._evaluate_and_track(progress)
            if (args.checkpoint_every and step % args.checkpoint_every == 0) or at_end:
                manager.save(acc, step, self._write_state, metadata={"epoch": state.epoch, "loss": loss})
        progress.close()

        self.save_model(self.output_dir)
        result = self._result(time.perf_counter() - start_time, resumed)
        for callback in self.callbacks:
            callback.on_train_end(self, result)
        if acc.is_main_process:
            manager.mark_finished(self.state.step, result.summary())
        acc.end_training()
        return result

    def _start(self, resume: bool, overwrite: bool) -> CheckpointManager:
        """Check the output folder is this run's to use, clean up after interrupted saves (and after the old
        run with `overwrite`), seed the RNG; returns the checkpoint manager."""
        from accelerate.utils import set_seed

        acc, args = self.accelerator, self.args
        check_output_dir(self.output_dir, resume=resume, overwrite=overwrite)
        manager = CheckpointManager(self.output_dir / "checkpoints", args.keep_checkpoints,
                                    fingerprint=self.fingerprint, checksums=args.checkpoint_checksums)
        acc.wait_for_everyone()  # every process has looked at the folder before anything is deleted
        if acc.is_main_process:
            if overwrite and (removed := clear_run(self.output_dir)):
                logger.warning("overwrite: deleted %s of the previous run.", ", ".join(p.name for p in removed))
                (self.output_dir / "logs").mkdir(parents=True, exist_ok=True)
            manager.remove_temporary()
            self._remove_unfinished_saves()
        acc.wait_for_everyone()
        # Different corruption noise on each process; the same on every run (and restored on resume).
        set_seed(args.seed + 1 + acc.process_index)
        return manager

    def _resume(self, manager: CheckpointManager) -> Checkpoint | None:
        resumed = manager.load_latest(self._read_state)
        if resumed is None:
            logger.warning("resume: no checkpoint in %s; starting from scratch.", manager.root)
        else:
            self.accelerator.print(f"Resumed from {resumed.path} (step {self.state.step}, epoch {self.state.epoch}).")
        return resumed

    def _finished_result(self, manager: CheckpointManager, resumed: Checkpoint) -> TrainResult | None:
        """The stored result when the resumed run had already finished (its final model saved): then nothing
        is trained, evaluated or written, so its model, card and reports stay as they are."""
        record = manager.finished()
        if record is None or record.get("step") != self.state.step or self.state.step < self.args.max_steps:
            return None
        self.accelerator.print(f"The run in {self.output_dir} already finished at step {self.state.step} "
                               f"(training.max_steps={self.args.max_steps}): nothing to do; its model and files are "
                               "left as they are. Raise training.max_steps to train further.")
        stored = {k: v for k, v in record.get("result", {}).items() if k in TrainResult.__dataclass_fields__}
        return TrainResult(**{**stored, "output_dir": self.output_dir, "resumed_from": resumed.path,
                              "already_finished": True})

    def _log_window(self, progress, grad_norm: float | None, elapsed: float) -> None:
        """Log the means over the steps since the last log (the window survives a resume in `TrainState`)."""
        state, args = self.state, self.args
        steps_in_window = (state.step - 1) % args.log_every + 1
        logs = {"train/loss": state.window_loss / steps_in_window, "train/lr": self.scheduler.get_last_lr()[0],
                "train/tokens_per_second": state.window_tokens / max(elapsed, 1e-9),
                "train/tokens": state.tokens, "train/epoch": state.epoch}
        if grad_norm is not None:
            logs["train/grad_norm"] = grad_norm
        self.accelerator.log(logs, step=state.step)
        progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
        state.window_loss, state.window_tokens = 0.0, 0

    def _result(self, seconds: float, resumed: Checkpoint | None) -> TrainResult:
        state = self.state
        return TrainResult(step=state.step, train_loss=state.last_loss, eval_nelbo=state.last_eval.get("eval/nelbo"),
                           best_eval_nelbo=None if math.isinf(state.best_eval) else state.best_eval,
                           best_step=None if state.best_step < 0 else state.best_step, tokens=state.tokens,
                           seconds=seconds, output_dir=self.output_dir,
                           resumed_from=resumed.path if resumed else None, metrics=dict(state.last_eval))

    # ------------------------------------------------------------------ checkpoint contents
    def _write_state(self, folder: Path) -> None:
        """Every process: the training state as safetensors + JSON (no pickle). Under FSDP the sharded model,
        optimizer and schedule go through `accelerator.save_state` (loaded back with `weights_only=True`)."""
        acc = self.accelerator
        if self._fsdp:
            acc.save_state(str(folder))
        elif acc.is_main_process:
            save_module(acc.unwrap_model(self.model), folder, "model")
            save_tree(self.optimizer.state_dict(), folder, "optimizer")
            save_tree(self.scheduler.state_dict(), folder, "scheduler")
            if acc.scaler is not None:
                save_tree(acc.scaler.state_dict(), folder, "scaler")
        if acc.is_main_process:
            if self.ema is not None:
                save_module(self.ema, folder, "ema")
            save_tree(self.state.state_dict(), folder, "trainer_state")
        save_tree(rng_state(acc.device), folder, f"rng_state_{acc.process_index}")

    def _read_state(self, folder: Path) -> int:
        """Every process: load what `_write_state` wrote; returns the step the loaded state is at (checked
        against the checkpoint's marker by `CheckpointManager.load_latest`)."""
        acc = self.accelerator
        if self._fsdp:
            acc.load_state(str(folder))
        else:
            load_module(acc.unwrap_model(self.model), folder, "model")
            self.optimizer.load_state_dict(load_tree(folder, "optimizer"))
            self.scheduler.load_state_dict(load_tree(folder, "scheduler"))
            if acc.scaler is not None:
                acc.scaler.load_state_dict(load_tree(folder, "scaler"))
        if self.ema is not None:
            load_module(self.ema, folder, "ema")
        self.state.load_state_dict(load_tree(folder, "trainer_state"))
        set_rng_state(load_tree(folder, f"rng_state_{acc.process_index}"))
        return self.state.step

    @property
    def _fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

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

    def _init_trackers(self, resume_step: int | None) -> None:
        """Start the trackers; when resuming at `resume_step`, first drop what a killed run logged after it."""
        acc = self.accelerator
        init_kwargs = {}
        if resume_step is not None:
            init_kwargs["tensorboard"] = {"purge_step": resume_step + 1}
            if acc.is_main_process:
                for tracker in self.trackers:
                    if isinstance(tracker, JSONLinesTracker):
                        tracker.truncate_after(resume_step)
        if self.trackers:
            acc.init_trackers("sfdlm", config=flatten_config(self.run_config), init_kwargs=init_kwargs)

    # ------------------------------------------------------------------ evaluation and saving
    def eval_model(self) -> nn.Module:
        """The weights used for evaluation and saving: the EMA copy if there is one, else the trained model
        (under FSDP, while the main process saves, the unsharded copy it saves)."""
        if self._unsharded is not None:
            return self._unsharded
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
        with torch.random.fork_rng(devices=devices, device_type=acc.device.type), self._root_unsharded():
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

    @contextlib.contextmanager
    def _root_unsharded(self):
        """Under FSDP2, the root unit's weights (embeddings, head) gathered for the block: evaluation calls
        methods such as `nelbo`, not `forward`, so the root's pre-forward hook that gathers them never runs
        (the blocks, called through their `forward`, gather their own). Also drops the SSM spectrum caches:
        FSDP2 gathers new values into the same parameter objects without bumping their version counters, so
        a cache keyed on (id, version) can outlive an optimizer step (measured: a second evaluation in the
        same process off by 4e-7 relative until the cache is dropped)."""
        if not self._fsdp:
            yield
            return
        for module in self.model.modules():
            if getattr(module, "_spectrum_cache", None) is not None:
                module._spectrum_cache = None
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def _evaluate_and_track(self, progress) -> None:
        metrics = self.evaluate()
        nelbo = metrics["eval/nelbo"]
        if not math.isfinite(nelbo):
            raise NonFiniteLossError(f"Held-out NELBO is {nelbo} at step {self.state.step}.")
        self.accelerator.log(metrics, step=self.state.step)
        self.state.last_eval = dict(metrics)
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

    def save_model(self, directory: str | os.PathLike) -> Path:
        """`save_pretrained` the evaluation weights (EMA if any), the tokenizer and the generation config
        into `directory`. Everything is written to a temporary folder first (callbacks' `on_save` add their
        files there), then published: a dedicated folder such as `best/` is swapped in by renames, the run's
        own output folder (which also holds checkpoints and logs) file by file, weights last, so that no file
        is ever seen half-written. Every process must call this."""
        acc = self.accelerator
        directory = Path(directory)
        # FSDP: every process holds a shard. Gather the full weights (a collective, on every process); the main
        # process saves them from an unsharded copy, which callbacks also see as `eval_model()`.
        full_weights = acc.get_state_dict(self.model) if self._fsdp else None
        own_folder = directory.resolve() == self.output_dir.resolve()
        # Temporary folders stay inside the output folder (cleaned at the next start); an outside
        # `directory` is staged next to it, on the same filesystem, for the atomic rename.
        staging = self.output_dir if own_folder else directory.parent
        acc.wait_for_everyone()
        if acc.is_main_process:
            staging.mkdir(parents=True, exist_ok=True)
            tmp = staging / f".tmp-save-{'model' if own_folder else directory.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            if full_weights is not None:
                self._unsharded = _unsharded_copy(self.eval_model(), full_weights)
            model = self.eval_model()
            model.save_pretrained(tmp)
            if getattr(model, "peft_config", None):  # an adapter: loadable by AutoPeftModel from any folder
                from .lora import finish_adapter_config

                finish_adapter_config(model, tmp)
            write_checksums(tmp)  # SHA-256 of the weights (adapters too), verified by every loader
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            for callback in self.callbacks:
                callback.on_save(self, tmp)
            self._unsharded = None
            if own_folder:
                for item in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".safetensors"):
                    target = directory / item.name
                    if target.is_dir():
                        shutil.rmtree(target)
                    os.replace(item, target)
                tmp.rmdir()
            else:
                old = staging / f".tmp-save-{directory.name}-old-{os.getpid()}"
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


def _fsdp_requested() -> bool:
    """True when the launch configuration asks for FSDP (`distributed_type: FSDP`, which `accelerate launch`
    passes on as ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _shard_on_cpu(accelerator) -> None:
    """Make FSDP2 run on CPU processes (gloo) as the launch configuration asks.

    accelerate only switches to FSDP for accelerator process groups (CUDA, XPU, ...): on a machine without one
    it forms a MULTI_CPU group and drops the FSDP plugin, so an FSDP configuration would silently train as
    plain data parallel. torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo, and accelerate's FSDP2
    code path (sharding, `get_state_dict`, `save_state`/`load_state` through torch.distributed.checkpoint)
    only needs the state to say FSDP: set it, with the plugin built from the launch configuration."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"The launch configuration asks for FSDP but accelerate set up "
                         f"{accelerator.distributed_type}: launch with at least 2 processes "
                         "(`accelerate launch --config_file training/accelerate_configs/fsdp_cpu.yaml`).")
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables set by `accelerate launch`
    version = getattr(plugin, "fsdp_version", 1)  # accelerate releases without FSDP2 have no such field
    if version != 2:
        raise ValueError(f"FSDP on CPU processes needs `fsdp_version: 2` (FSDP2) in the launch configuration and "
                         f"an accelerate release that has it, got FSDP{version}.")
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.warning("FSDP2 on %d CPU processes (gloo): accelerate's FSDP path with the CPU device.",
                   accelerator.num_processes)


def _unsharded_copy(model: nn.Module, full_weights: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) instance of the model's own class holding `full_weights`. FSDP2 swaps the class of
    the sharded model for a generated subclass defined in torch, so `save_pretrained` on it would copy
    torch's files as the remote code instead of the model's."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.random.fork_rng(devices=[]):  # its initialisation must not move the training RNG
        copy = cls(model.config)
    copy.load_state_dict(full_weights)  # copied into the new parameters, so tied weights stay tied
    copy.generation_config = model.generation_config
    return copy.eval()


def _scored_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return scored_positions(batch["input_ids"], batch.get("labels"), batch.get("attention_mask")).sum().float()


__all__ = [
    "DiffusionTrainer",
    "EpochSampler",
    "NonFiniteLossError",
    "TrainResult",
    "TrainState",
    "TrainerCallback",
    "default_compute_loss",
    "default_evaluate_batch",
]
