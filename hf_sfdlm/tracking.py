"""Experiment tracking: `JSONLinesTracker`, an accelerate tracker writing `logs/metrics.jsonl`, and
`read_metrics` to read such a file back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker


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


def flatten_config(values: dict, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, non-scalar values as strings (what trackers store)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


__all__ = ["JSONLinesTracker", "flatten_config", "read_metrics"]
