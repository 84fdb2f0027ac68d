"""Fault-tolerant training checkpoints.

Layout under `root` (usually `<output_dir>/checkpoints`):

    .tmp-step-120/     being written; never read, removed at the next start
    step-100/          the training state (written by the trainer: safetensors + JSON, no pickle) + complete.json
    finished.json      written once the run's final model is saved: the run is done

A checkpoint is written into `.tmp-step-N`, its `complete.json` marker (step, compatibility fingerprint,
size and SHA-256 of every file) is written last and synced, and only then is the folder renamed to
`step-N` (an atomic rename). A process killed at any moment therefore leaves either the previous set of
checkpoints or the new complete one. On resume the newest `step-N` whose marker exists, parses, matches
the files on disk and matches the run's fingerprint is loaded; every newer one that fails is reported
with its reason. Pruning keeps the newest `keep_last` *usable* checkpoints and deletes the rest, so a
corrupt newest checkpoint never displaces a good one.

Format 1 checkpoints (accelerate's `save_state`, with pickled custom objects) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER = "complete.json"
FORMAT_VERSION = 2
FINISHED = "finished.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_DIR = re.compile(r"^\.tmp-step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: incomplete, truncated, corrupt or from another run."""


@dataclass
class Checkpoint:
    """A complete, verified checkpoint."""

    path: Path
    step: int
    marker: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    """Flush every file and folder under `directory` to disk (survives power loss, not only SIGKILL)."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint_hash(value: Any) -> str:
    """Short stable hash of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CheckpointManager:
    """Writes, finds, verifies and prunes checkpoints in `root`.

    Args:
        root: folder holding the `step-N` checkpoints.
        keep_last: how many complete checkpoints to keep (older ones are deleted after each save).
        fingerprint: JSON-serialisable facts a checkpoint must share with the run that resumes it (model
            configuration hash, batch size, number of processes...). A mismatch names the differing fields.
        checksums: record and verify the SHA-256 of every file (catches same-size corruption; costs one read
            of the checkpoint per save and per resume). Sizes are always checked.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 2, fingerprint: dict[str, Any] | None = None,
                 checksums: bool = True):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"`keep_last` must be a positive integer, got {keep_last!r}.")
        self.root = Path(root)
        self.keep_last = keep_last
        self.fingerprint = json.loads(json.dumps(fingerprint or {}, default=str))
        self.checksums = checksums
        self._verified: dict[Path, tuple[int, int] | None] = {}
        # Checkpoints that failed to load in `load_latest` (with their marker's stamp then): unusable, pruned
        # like the ones `verify` rejects, as long as the folder is the one that failed.
        self._failed_to_load: dict[Path, tuple[tuple[int, int] | None, CheckpointError]] = {}

    # ------------------------------------------------------------------ writing
    def save(self, accelerator, step: int, write_state: Callable[[Path], None],
             metadata: dict[str, Any] | None = None) -> Path:
        """Save checkpoint `step-{step}`: `write_state(folder)` writes the state files (it runs on every
        process, each writing its own files); then the marker, then the rename. Every process must call this."""
        tmp = self.root / f".tmp-step-{step}"
        final = self.root / f"step-{step}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        write_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._write_marker(tmp, step, metadata or {})
            _fsync_tree(tmp)
            if final.exists():  # a checkpoint of the same step from before a resume: swap it out
                stale = self.root / f".tmp-step-{step}.old"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(tmp, final)
                shutil.rmtree(stale)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self._verified[final] = self._marker_stamp(final)  # its sums were just computed from these files
            self._failed_to_load.pop(final, None)  # a new checkpoint of a step whose old one failed to load
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def _write_marker(self, directory: Path, step: int, metadata: dict[str, Any]) -> None:
        files = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            entry = {"size": path.stat().st_size}
            if self.checksums:
                entry["sha256"] = _sha256(path)
            files[path.relative_to(directory).as_posix()] = entry
        marker = {"format": FORMAT_VERSION, "step": step, "time": time.time(), "fingerprint": self.fingerprint,
                  "files": files, "metadata": metadata}
        tmp_marker = directory / f".{MARKER}.tmp"
        with open(tmp_marker, "w") as handle:
            json.dump(marker, handle, indent=1, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_marker, directory / MARKER)

    def prune(self) -> list[Path]:
        """Keep the newest `keep_last` usable checkpoints; delete older ones and unusable ones (each named in a
        warning with its reason). Returns what was deleted."""
        kept, doomed = 0, []
        for path in self.checkpoint_dirs():
            if kept >= self.keep_last:
                doomed.append(path)
                continue
            try:
                stamp, error = self._failed_to_load.get(path, (None, None))
                if error is not None and stamp == self._marker_stamp(path):
                    raise error
                self._verify_cached(path)
                kept += 1
            except CheckpointError as error:
                logger.warning("Deleting unusable checkpoint: %s", error)
                doomed.append(path)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
            self._verified.pop(path, None)
            self._failed_to_load.pop(path, None)
        return doomed

    @staticmethod
    def _marker_stamp(path: Path) -> tuple[int, int] | None:
        try:
            stat = (path / MARKER).stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _verify_cached(self, path: Path) -> None:
        """`verify`, skipped for a checkpoint this manager already verified (or wrote) and whose marker is unchanged."""
        stamp = self._marker_stamp(path)
        if stamp is not None and self._verified.get(path) == stamp:
            return
        self.verify(path)
        self._verified[path] = stamp

    def remove_temporary(self) -> list[Path]:
        """Delete `.tmp-step-*` folders left by an interrupted save (call before training, main process)."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.is_dir() and path.name.startswith(".tmp-step-"):
                    logger.warning("Removing the unfinished checkpoint %s left by an interrupted save.", path)
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    # ------------------------------------------------------------------ reading
    def checkpoint_dirs(self) -> list[Path]:
        """`step-N` folders, newest first (temporary folders are never listed)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return [path for _, path in sorted(found, reverse=True)]

    def verify(self, path: str | os.PathLike) -> Checkpoint:
        """Return the checkpoint at `path` if it is complete, intact and compatible; else raise
        `CheckpointError` naming the folder and the reason."""
        path = Path(path)
        marker_path = path / MARKER
        if not marker_path.is_file():
            raise CheckpointError(f"Checkpoint {path} is incomplete: it has no {MARKER} "
                                  "(the save was interrupted before it finished).")
        try:
            marker = json.loads(marker_path.read_text())
            step, files = int(marker["step"]), marker["files"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"Checkpoint {path} is corrupt: unreadable {MARKER} ({error}).") from error
        if marker.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint {path} has format {marker.get('format')!r}, not {FORMAT_VERSION}: it was "
                                  "written by another hf_sfdlm version (format 1 holds pickles, which are never "
                                  "loaded). Start a new run (`overwrite=True` / --overwrite).")
        if (m := _STEP_DIR.match(path.name)) and int(m.group(1)) != step:
            raise CheckpointError(f"Checkpoint {path} is corrupt: its {MARKER} says step {step}.")
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"Checkpoint {path} is truncated: file {name} is missing.")
            size = file.stat().st_size
            if size != expected["size"]:
                raise CheckpointError(f"Checkpoint {path} is truncated or corrupt: {name} has {size} bytes, "
                                      f"{expected['size']} were written.")
            if "sha256" in expected and _sha256(file) != expected["sha256"]:
                raise CheckpointError(f"Checkpoint {path} is corrupt: {name} does not match its SHA-256.")
        differences = self._fingerprint_differences(marker.get("fingerprint", {}))
        if differences:
            raise CheckpointError(f"Checkpoint {path} is incompatible with this run: " + "; ".join(differences) + ".")
        return Checkpoint(path=path, step=step, marker=marker)

    def _fingerprint_differences(self, saved: dict[str, Any]) -> list[str]:
        keys = sorted(set(saved) | set(self.fingerprint))
        return [f"{key} is {saved.get(key)!r} in the checkpoint but {self.fingerprint.get(key)!r} in this run"
                for key in keys if saved.get(key) != self.fingerprint.get(key)]

    def latest(self) -> tuple[Checkpoint | None, list[CheckpointError]]:
        """The newest usable checkpoint (or None) and the errors of the newer ones that were skipped."""
        rejected = []
        for path in self.checkpoint_dirs():
            try:
                return self.verify(path), rejected
            except CheckpointError as error:
                rejected.append(error)
        return None, rejected

    def load_latest(self, read_state: Callable[[Path], int | None]) -> Checkpoint | None:
        """Verify the newest checkpoint, call `read_state(folder)` to load it, and return it; on failure warn
        and try the next older one. `read_state` may return the step its loaded training state records: a
        step other than the marker's (a marker that says 1000 over a state of step 24) makes the checkpoint
        unusable like any other corruption, since every later resume would silently restart from the
        state's step. Returns None when there is no checkpoint at all; raises `CheckpointError` when
        checkpoints exist but none can be used."""
        rejected: list[CheckpointError] = []
        for path in self.checkpoint_dirs():
            try:
                checkpoint = self.verify(path)
                loaded_step = read_state(path)
                if loaded_step is not None and loaded_step != checkpoint.step:
                    raise CheckpointError(f"Checkpoint {path} is corrupt: its {MARKER} says step {checkpoint.step} "
                                          f"but its training state is at step {loaded_step}.")
            except CheckpointError as error:
                rejected.append(error)
                self._failed_to_load[path] = (self._marker_stamp(path), error)
                logger.warning("Skipping checkpoint: %s", error)
                continue
            except Exception as error:  # a file that passed the size check but does not load
                wrapped = CheckpointError(f"Checkpoint {path} is corrupt: loading it failed with "
                                          f"{type(error).__name__}: {error}")
                rejected.append(wrapped)
                self._failed_to_load[path] = (self._marker_stamp(path), wrapped)
                logger.warning("Skipping checkpoint: %s", wrapped)
                continue
            if rejected:
                logger.warning("Resuming from %s, the newest usable checkpoint.", path)
            self._verified[path] = self._marker_stamp(path)
            return checkpoint
        if rejected:
            raise CheckpointError(f"No usable checkpoint in {self.root}:\n  " + "\n  ".join(map(str, rejected)))
        return None

    # ------------------------------------------------------------------ the end of a run
    def mark_finished(self, step: int, result: dict[str, Any]) -> None:
        """Record that the run finished at `step` with its final model saved (main process)."""
        record = {"step": step, "fingerprint": self.fingerprint, "result": result}
        tmp = self.root / f".{FINISHED}.tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as handle:
            json.dump(record, handle, indent=1, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / FINISHED)
        _fsync_dir(self.root)

    def finished(self) -> dict[str, Any] | None:
        """The record of `mark_finished` if this run (same fingerprint) finished, else None."""
        try:
            record = json.loads((self.root / FINISHED).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("fingerprint") != self.fingerprint:
            return None
        return record

    def clear_finished(self) -> None:
        (self.root / FINISHED).unlink(missing_ok=True)


def run_traces(output_dir: str | os.PathLike) -> list[str]:
    """What in `output_dir` shows that a training run already used it: checkpoints (complete or being
    written), the finished marker, logged metrics. Empty for a fresh folder."""
    output_dir = Path(output_dir)
    root = output_dir / "checkpoints"
    traces = []
    if root.is_dir():
        traces += sorted(p.name for p in root.iterdir() if _STEP_DIR.match(p.name) or _TMP_DIR.match(p.name)
                         or p.name == FINISHED)
    metrics = output_dir / "logs" / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        traces.append("logs/metrics.jsonl")
    return [f"checkpoints/{t}" if not t.startswith("logs/") else t for t in traces]


def check_output_dir(output_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse to start a new run in a folder another run used, unless `resume` (continue it: the checkpoints
    must then match this run's fingerprint) or `overwrite` (delete its checkpoints and logs first)."""
    if resume and overwrite:
        raise ValueError("`resume` and `overwrite` exclude each other: resume continues the run in the output "
                         "folder, overwrite deletes it.")
    if resume or overwrite:
        return
    traces = run_traces(output_dir)
    if traces:
        shown = ", ".join(traces[:4]) + (f" and {len(traces) - 4} more" if len(traces) > 4 else "")
        raise ValueError(f"The output folder {str(output_dir)!r} holds another run ({shown}). Pass --resume "
                         "(`resume=True`) to continue that run, --overwrite (`overwrite=True`) to delete its "
                         "checkpoints and logs and start afresh, or choose another output folder.")


def clear_run(output_dir: str | os.PathLike, also: tuple[str, ...] = ()) -> list[Path]:
    """Delete what a previous run left in `output_dir` that a new run would mix with: checkpoints, logs,
    `best/`, unfinished saves and the folders named in `also` (the model files themselves are replaced by
    the new run's final save)."""
    output_dir = Path(output_dir)
    doomed = [output_dir / name for name in ("checkpoints", "logs", "best", *also)]
    doomed += sorted(output_dir.glob(".tmp-save-*")) if output_dir.is_dir() else []
    removed = [path for path in doomed if path.exists()]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed

__all__ = ["Checkpoint", "CheckpointError", "CheckpointManager", "FINISHED", "MARKER", "check_output_dir", "clear_run",
           "fingerprint_hash", "run_traces"]
