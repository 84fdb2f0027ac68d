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


def save_report(path: str, report: dict) -> None:
    """Write a benchmark's JSON report to `path` (its folder created), as the scripts with an `--output` do."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {path}")


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


class PeakTensorMemory:
    """Context manager: peak bytes of the tensor storages that operators create while it is active
    (activations, temporaries, gradients), each storage counted from its creation until it is freed.

    A TorchDispatchMode sees every operator output, forward and backward; a finaliser on each storage
    subtracts it when freed. Unlike the process's resident set it is unaffected by the allocator keeping
    freed memory, by other models in the process and by other users of the machine.
    """

    def __init__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live = self.peak = 0
        self._seen: set[int] = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for tensor in tree_flatten(out)[0]:
                    if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                        storage = tensor.untyped_storage()
                        key, size = storage.data_ptr(), storage.nbytes()
                        if size and key not in tracker._seen:
                            tracker._seen.add(key)
                            tracker.live += size
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(storage, tracker._free, key, size)
                return out

        self._mode = Mode()

    def _free(self, key: int, size: int) -> None:
        if key in self._seen:
            self._seen.discard(key)
            self.live -= size

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20


def as_after_an_optimiser_step(model: torch.nn.Module) -> None:
    """Bump every parameter's version counter as an optimiser step's in-place update does, without changing
    a value, so caches keyed on unchanged parameters (the SSM kernel's) miss as they would in training:
    a benchmark that repeats forward+backward with no step in between would otherwise time cache hits."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.view(-1)[:1].add_(0)
