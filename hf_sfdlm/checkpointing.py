"""Fault-tolerant training checkpoints on top of `accelerator.save_state`.

Layout under `root` (usually `<output_dir>/checkpoints`):

    .tmp-step-120/     being written; never read, removed at the next start
    step-100/          accelerate state (model, optimizer, scheduler, RNG, registered objects) + complete.json

A checkpoint is written into `.tmp-step-N`, its `complete.json` marker (step, compatibility fingerprint,
size and SHA-256 of every file) is written last and synced, and only then is the folder renamed to
`step-N` (an atomic rename). A process killed at any moment therefore leaves either the previous set of
checkpoints or the new complete one. On resume the newest `step-N` whose marker exists, parses, matches
the files on disk and matches the run's fingerprint is loaded; every newer one that fails is reported
with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MARKER = "complete.json"
FORMAT_VERSION = 1
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

    # ------------------------------------------------------------------ writing
    def save(self, accelerator, step: int, metadata: dict[str, Any] | None = None) -> Path:
        """Save the accelerator's full state as `step-{step}`; every process must call this."""
        tmp = self.root / f".tmp-step-{step}"
        final = self.root / f"step-{step}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
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
        """Delete all but the newest `keep_last` complete checkpoints, and leftover temporary folders of
        steps at or below the newest complete one. Returns what was deleted."""
        complete = [path for path in self.checkpoint_dirs() if (path / MARKER).exists()]
        doomed = complete[self.keep_last:]
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)
        return doomed

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

    def load_latest(self, accelerator) -> Checkpoint | None:
        """Load the newest usable checkpoint into `accelerator` (model, optimizer, scheduler, RNG, registered
        objects) and return it; warn about each newer one that was skipped. Returns None when there is no
        checkpoint at all; raises `CheckpointError` when checkpoints exist but none can be used."""
        rejected: list[CheckpointError] = []
        for path in self.checkpoint_dirs():
            try:
                checkpoint = self.verify(path)
                accelerator.load_state(str(path))
            except CheckpointError as error:
                rejected.append(error)
                logger.warning("Skipping checkpoint: %s", error)
                continue
            except Exception as error:  # a file that passed the size check but does not load
                wrapped = CheckpointError(f"Checkpoint {path} is corrupt: loading it failed with "
                                          f"{type(error).__name__}: {error}")
                rejected.append(wrapped)
                logger.warning("Skipping checkpoint: %s", wrapped)
                continue
            if rejected:
                logger.warning("Resuming from %s, the newest usable checkpoint.", path)
            return checkpoint
        if rejected:
            raise CheckpointError(f"No usable checkpoint in {self.root}:\n  " + "\n  ".join(map(str, rejected)))
        return None


__all__ = ["Checkpoint", "CheckpointError", "CheckpointManager", "MARKER", "fingerprint_hash"]
