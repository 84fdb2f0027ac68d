"""Shared plumbing for the benchmark scripts: machine record, JSON output, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_record() -> dict:
    """What ran the benchmark: enough to tell two JSON files' machines apart."""
    import transformers

    record = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        record["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return record


def write_json(name: str, payload: dict, directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_record(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def median_seconds(function, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `function()` over `repeats` runs after `warmup` runs (CUDA-synchronised)."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
