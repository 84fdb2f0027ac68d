"""Training state as safetensors + JSON: nothing here writes or reads a pickle.

`torch.save` / `torch.load(weights_only=False)` (what accelerate uses for objects registered with
`register_for_checkpointing`) runs any code a planted file asks for. The trainer's state is stored instead
as plain data:

    save_tree / load_tree       a nested structure of dicts, lists, tuples, numbers, strings, booleans, None and
                                tensors (an optimizer's, scheduler's or grad scaler's `state_dict`, the run's
                                position): `<name>.json` holds the structure, `<name>.safetensors` the tensors
    save_module / load_module   an `nn.Module`'s state (the model, the EMA) in `<name>.safetensors`
    rng_state / set_rng_state   Python, NumPy, torch CPU and accelerator RNG states, in the same format

Loading only parses JSON and safetensors headers and copies tensor bytes, so a corrupt or hostile file can
make loading fail but never runs code.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}  # JSON has no inf/nan
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):  # keys keep their type (optimizer states are keyed by int)
        return {_DICT: [[_encode(k, tensors, path), _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # a NumPy array or scalar
        return _encode(value.tolist(), tensors, path)
    raise TypeError(f"Cannot store {path or 'the value'} of type {type(value).__name__} as plain data "
                    "(tensors, numbers, strings, booleans, None, lists, tuples and dicts only).")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ValueError(f"Malformed state entry {value!r}.")
    (tag, content), = value.items()
    if tag == _TENSOR:
        return tensors[content]
    if tag == _FLOAT:
        return float(content)
    if tag == _TUPLE:
        return tuple(_decode(v, tensors) for v in content)
    if tag == _DICT:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in content}
    raise ValueError(f"Malformed state entry with tag {tag!r}.")


def save_tree(value: Any, directory: str | os.PathLike, name: str) -> None:
    """Write `value` as `<directory>/<name>.json` (+ `<name>.safetensors` when it holds tensors)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(value, tensors, name)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps({"format": 1, "value": encoded}))


def load_tree(directory: str | os.PathLike, name: str) -> Any:
    """Read what `save_tree` wrote (tensors on CPU)."""
    directory = Path(directory)
    document = json.loads((directory / f"{name}.json").read_text())
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return _decode(document["value"], tensors)


def save_module(module: nn.Module, directory: str | os.PathLike, name: str) -> None:
    """`<directory>/<name>.safetensors` with the module's state (tied weights stored once)."""
    save_model(module, str(Path(directory) / f"{name}.safetensors"))


def load_module(module: nn.Module, directory: str | os.PathLike, name: str) -> None:
    """Load what `save_module` wrote into `module` (every key must match)."""
    device = next(iter(module.state_dict().values())).device if module.state_dict() else "cpu"
    missing, unexpected = load_model(module, str(Path(directory) / f"{name}.safetensors"), strict=False,
                                     device=str(device))
    if missing or unexpected:
        raise ValueError(f"{name}.safetensors does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}.")


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The RNG states that affect training: Python's, NumPy's, torch's CPU one and that of `device`'s type."""
    import numpy as np

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(legacy=False),
                             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["load_module", "load_tree", "rng_state", "save_module", "save_tree", "set_rng_state"]
