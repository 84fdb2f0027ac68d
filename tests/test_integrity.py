"""Corrupt or odd model files fail early and name themselves (`hf_sfdlm.integrity`), through the loaders."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.cli import main as cli_main
from hf_sfdlm.hub import load_pretrained, load_tokenizer
from hf_sfdlm.integrity import (CHECKSUMS_FILE, IntegrityError, check_folder, check_safetensors, read_json,
                                verify_checksums)
from hf_sfdlm.lora import apply_lora, save_adapter
from hf_sfdlm.synthetic import word_level_tokenizer

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).to(torch.bfloat16),
    "c": torch.arange(4, dtype=torch.int64).reshape(2, 2),
    "d": torch.tensor([True, False, True]),
    "empty": torch.zeros(0, 4),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
}


def save_model(folder: Path) -> SFDLMForDiffusionLM:
    tokenizer = word_level_tokenizer()
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=len(tokenizer), process="absorbing",
                                            mask_token_id=tokenizer.mask_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


# ------------------------------------------------------------------------------------------ safetensors
def test_a_valid_file_parses_as_the_safetensors_library_reads_it(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    header = check_safetensors(path)
    with safe_open(path, framework="pt") as handle:
        assert set(header) == set(handle.keys())
        for name in handle.keys():
            assert header[name]["shape"] == list(handle.get_slice(name).get_shape())
            assert header[name]["dtype"] == handle.get_slice(name).get_dtype()


def test_every_truncation_and_any_trailing_bytes_are_refused(tmp_path):
    source = tmp_path / "w.safetensors"
    save_file(TENSORS, source)
    data = source.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for length in range(len(data)):  # brute force: every prefix of the file
        cut.write_bytes(data[:length])
        with pytest.raises(IntegrityError) as error:
            check_safetensors(cut)
        assert str(error.value).startswith(str(cut))
        with pytest.raises(SafetensorError):  # the library agrees that none of these is a valid file
            safe_open(cut, framework="pt")
    cut.write_bytes(data + b"\0")
    with pytest.raises(IntegrityError, match="trailing bytes"):
        check_safetensors(cut)


def _with_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "not its size"),
    ({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed header entry"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6, "overlapping or gapped"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "overlapping or gapped"),
])
def test_headers_that_do_not_describe_the_data_are_refused(tmp_path, header, data, message):
    path = tmp_path / "w.safetensors"
    _with_header(path, header, data)
    with pytest.raises(IntegrityError, match=message):
        check_safetensors(path)


def test_a_garbled_header_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"\xff{not json" + b"\0" * 8)
    with pytest.raises(IntegrityError, match="header is not valid JSON"):
        check_safetensors(path)
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(IntegrityError, match="header claims"):
        check_safetensors(path)


# ------------------------------------------------------------------------------------------ checksums
def test_save_pretrained_records_the_weights_sha256(tmp_path):
    save_model(tmp_path)
    record = json.loads((tmp_path / CHECKSUMS_FILE).read_text())
    assert record == {"algorithm": "sha256", "files": {
        "model.safetensors": hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()}}
    assert verify_checksums(tmp_path) == ["model.safetensors"]


def _flip_a_data_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit inside the last tensor: same size, valid header
    path.write_bytes(bytes(data))


def test_same_size_garbled_weights_are_caught_by_the_checksum_and_only_by_it(tmp_path):
    model = save_model(tmp_path)
    _flip_a_data_byte(tmp_path / "model.safetensors")
    with pytest.raises(IntegrityError, match=r"model\.safetensors: SHA-256 .* does not match"):
        load_pretrained(tmp_path)
    # Without the checksum the garbled file is structurally valid: it loads, with different weights.
    (tmp_path / CHECKSUMS_FILE).unlink()
    check_folder(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_an_adapter_records_and_checks_its_weights_too(tmp_path):
    base = save_model(tmp_path / "base")
    base.name_or_path = str(tmp_path / "base")
    adapter_dir = tmp_path / "adapter"
    save_adapter(apply_lora(base, r=2), adapter_dir)
    assert verify_checksums(adapter_dir) == ["adapter_model.safetensors"]
    load_pretrained(adapter_dir)
    _flip_a_data_byte(adapter_dir / "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match=r"adapter_model\.safetensors: SHA-256"):
        load_pretrained(adapter_dir)


def test_a_malformed_checksums_file_or_a_missing_listed_file_is_refused(tmp_path):
    save_model(tmp_path)
    (tmp_path / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "md5", "files": {}}))
    with pytest.raises(IntegrityError, match="checksums.json: expected"):
        check_folder(tmp_path)
    (tmp_path / CHECKSUMS_FILE).write_text(json.dumps({"algorithm": "sha256", "files": {"gone.safetensors": "0"}}))
    with pytest.raises(IntegrityError, match="gone.safetensors: listed in checksums.json but missing"):
        check_folder(tmp_path)


# ------------------------------------------------------------------------------------------ JSON and tokenizer files
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json"])
def test_a_truncated_json_file_is_refused_by_name_not_replaced_by_defaults(tmp_path, name):
    save_model(tmp_path)
    _truncate(tmp_path / name)
    with pytest.raises(IntegrityError) as error:
        load_pretrained(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / name}: not valid JSON")


def test_a_truncated_tokenizer_json_names_the_file(tmp_path, capsys):
    save_model(tmp_path)
    _truncate(tmp_path / "tokenizer.json")
    with pytest.raises(IntegrityError) as error:
        load_tokenizer(tmp_path)
    assert str(error.value).startswith(f"{tmp_path / 'tokenizer.json'}: not valid JSON")
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(tmp_path), "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err.startswith(f"sfdlm generate: error: {tmp_path / 'tokenizer.json'}: not valid JSON")


def test_a_tokenizer_json_that_is_json_but_no_tokenizer_is_refused(tmp_path):
    save_model(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(IntegrityError, match="tokenizer.json: the tokenizers library cannot load it"):
        load_tokenizer(tmp_path)


def test_bad_utf8_non_objects_and_missing_shards_are_named(tmp_path):
    save_model(tmp_path)
    (tmp_path / "generation_config.json").write_bytes(b'{"steps": "\xff"}')
    with pytest.raises(IntegrityError, match="generation_config.json: not UTF-8"):
        check_folder(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(IntegrityError, match="generation_config.json: expected a JSON object, got list"):
        read_json(tmp_path / "generation_config.json")
    (tmp_path / "generation_config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-2.safetensors"}}))
    with pytest.raises(IntegrityError, match=r"index.json: names weight shard\(s\) \['model-2.safetensors'\]"):
        check_folder(tmp_path)
