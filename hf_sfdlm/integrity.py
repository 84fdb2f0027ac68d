"""Integrity checks for the files of a saved model or adapter folder: fail early, and name the file.

`check_folder(folder)` runs every check below on a folder before anything is loaded from it:

* every `*.safetensors` file: the 8-byte header length, the JSON header, each tensor's dtype, shape and
  byte range (`end - begin == numel * itemsize`, ranges contiguous from 0), and the file size equal to
  header + data. A truncated or padded file, or a garbled header, is refused.
* `checksums.json` (written at save time by `write_checksums`, which `SFDLMForDiffusionLM.save_pretrained`,
  `hf_sfdlm.lora.save_adapter` and `DiffusionTrainer.save_model` call): the SHA-256 of every weight file it lists must match. This is
  the only check that catches same-size garbling of the tensor data; without a `checksums.json`, such
  weights pass these checks (a NaN/inf they produce is caught by the forward pass `hub.verify_model`
  runs before a push, other values are not detectable from the file alone).
* every `*.json` file (`config.json`, `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`,
  `adapter_config.json`, ...): valid UTF-8 JSON holding an object, so a truncated `generation_config.json`
  is refused instead of silently replaced by defaults; `config.json` must name its `model_type`.
* `tokenizer.json` is also parsed by the `tokenizers` library (when installed); `*.txt` vocab/merges
  files must be UTF-8.

Every failure is an `IntegrityError` (a `ValueError`) whose message starts with the file's path.
This module only uses the standard library (plus `tokenizers` if present), because it is also copied
next to the weights as part of the remote code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

CHECKSUMS_FILE = "checksums.json"
CHECKSUM_ALGORITHM = "sha256"
# Bytes per element of every safetensors dtype.
SAFETENSORS_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces


class IntegrityError(ValueError):
    """A file of a model folder is corrupt or malformed; `path` names it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


def check_safetensors(path: str | os.PathLike) -> dict[str, dict]:
    """Parse a safetensors file's header and check it against the file; returns `{tensor name: entry}`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise IntegrityError(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length.")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(size - 8, _MAX_HEADER_BYTES):
            raise IntegrityError(path, f"the header claims {header_size} bytes but the file has {size} bytes "
                                       "(truncated, or not a safetensors file).")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IntegrityError(path, f"the safetensors header is not valid JSON ({error}).") from None
    if not isinstance(header, dict):
        raise IntegrityError(path, "the safetensors header is not a JSON object.")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    spans = []
    for name, entry in tensors.items():
        try:
            itemsize = SAFETENSORS_DTYPE_SIZES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(path, f"tensor {name!r} has a malformed header entry {entry!r}.") from None
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * itemsize:
            raise IntegrityError(path, f"tensor {name!r} ({entry['dtype']}, shape {shape}) declares bytes "
                                       f"{begin}..{end}, which is not its size.")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise IntegrityError(path, f"tensor {name!r} starts at byte {begin} of the data, expected {position} "
                                       "(overlapping or gapped tensors).")
        position = end
    expected = 8 + header_size + position
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise IntegrityError(path, f"the header declares {expected} bytes in all but the file has {size}: {what}.")
    return tensors


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: str | os.PathLike, pattern: str = "*.safetensors") -> Path:
    """Record the SHA-256 of the folder's weight files (top level, `pattern`) in `checksums.json`."""
    folder = Path(folder)
    files = {path.name: file_sha256(path) for path in sorted(folder.glob(pattern)) if path.is_file()}
    target = folder / CHECKSUMS_FILE
    target.write_text(json.dumps({"algorithm": CHECKSUM_ALGORITHM, "files": files}, indent=1, sort_keys=True) + "\n",
                      encoding="utf-8")
    return target


def verify_checksums(folder: str | os.PathLike) -> list[str]:
    """Check every file `checksums.json` lists; returns the verified names ([] when there is no checksums.json)."""
    folder = Path(folder)
    record_path = folder / CHECKSUMS_FILE
    if not record_path.exists():
        return []
    record = read_json(record_path)
    files = record.get("files")
    if record.get("algorithm") != CHECKSUM_ALGORITHM or not isinstance(files, dict) \
            or not all(isinstance(v, str) for v in files.values()):
        raise IntegrityError(record_path, f"expected {{'algorithm': 'sha256', 'files': {{name: hex digest}}}}, "
                                          f"got {str(record)[:200]}.")
    for name, expected in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise IntegrityError(path, f"listed in {CHECKSUMS_FILE} but missing from the folder.")
        actual = file_sha256(path)
        if actual != expected:
            raise IntegrityError(path, f"SHA-256 {actual} does not match {expected} recorded in {CHECKSUMS_FILE}: "
                                       "the file changed after it was saved (corrupt, or replaced; if the change "
                                       f"is intended, save the model again or delete {CHECKSUMS_FILE}).")
    return sorted(files)


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`, or `IntegrityError` naming the file (bad UTF-8, truncated, not an object)."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise IntegrityError(path, f"not UTF-8 text ({error}).") from None
    except json.JSONDecodeError as error:
        raise IntegrityError(path, f"not valid JSON ({error}; truncated or corrupt).") from None
    if not isinstance(value, dict):
        raise IntegrityError(path, f"expected a JSON object, got {type(value).__name__}.")
    return value


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """The tokenizer files of `folder` parse: JSON files as JSON objects, `tokenizer.json` by `tokenizers`,
    `*.txt` (vocab, merges) as UTF-8."""
    folder = Path(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json"):
        if (folder / name).is_file():
            read_json(folder / name)
    fast = folder / "tokenizer.json"
    if fast.is_file():
        read_json(fast)
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - tokenizers comes with transformers
            Tokenizer = None
        if Tokenizer is not None:
            try:
                Tokenizer.from_file(str(fast))
            except Exception as error:  # tokenizers raises a bare Exception
                raise IntegrityError(fast, f"the tokenizers library cannot load it ({error}).") from None
    for path in sorted(folder.glob("*.txt")):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise IntegrityError(path, f"not UTF-8 text ({error}).") from None


def check_folder(folder: str | os.PathLike) -> None:
    """Run every check of this module on a model or adapter folder (see the module docstring)."""
    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        if path.is_file():
            read_json(path)
    if (folder / "config.json").is_file() and not isinstance(read_json(folder / "config.json").get("model_type"), str):
        raise IntegrityError(folder / "config.json", "has no `model_type` string.")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set((read_json(index).get("weight_map") or {}).values())
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise IntegrityError(index, f"names weight shard(s) {missing} missing from the folder.")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)
    verify_checksums(folder)
    check_tokenizer_files(folder)


__all__ = [
    "CHECKSUMS_FILE",
    "IntegrityError",
    "check_folder",
    "check_safetensors",
    "check_tokenizer_files",
    "file_sha256",
    "read_json",
    "verify_checksums",
    "write_checksums",
]
