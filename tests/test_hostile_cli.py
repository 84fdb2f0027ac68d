"""Hostile and mistaken command lines end in one line, `sfdlm <command>: error: ...`, exit status 2 and no
traceback: pickle weights, devices this machine lacks, seeds that do not fit, a Hub that cannot be reached,
bad UTF-8 (file and line named), --json paths checked before any work, mistyped local-looking model paths,
files that would be overwritten, and literal "[MASK]" text read as text in eval as in training.

Most cases call `hf_sfdlm.cli.main` in process (the same error path as the console script, far cheaper);
one runs the real entry point in a subprocess."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from test_cli import assert_one_line_error, word_model  # noqa: F401  (fixture)

from hf_sfdlm.cli import main


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """Run the CLI in process; assert exit 2 and exactly one error line holding every fragment."""
    assert main(argv) == 2, argv
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"sfdlm {argv[0]}: error: ")]
    assert len(errors) == 1, captured.err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def closed_port() -> int:
    """A local port nobody listens on: connecting is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------------ item 7
@pytest.fixture
def pickle_folders(word_model, tmp_path):
    """A model folder and an adapter folder whose weights are pickles (the file torch would unpickle)."""
    model = tmp_path / "pickled-model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (word_model / name).is_file():
            (model / name).write_bytes((word_model / name).read_bytes())
    torch.save({"anything": torch.zeros(1)}, model / "pytorch_model.bin")
    adapter = tmp_path / "pickled-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(word_model),
                                                             "peft_type": "LORA"}))
    torch.save({"anything": torch.zeros(1)}, adapter / "adapter_model.bin")
    return model, adapter


def test_pickle_weights_are_refused_in_one_line_by_every_loading_command(pickle_folders, tmp_path, capsys,
                                                                          monkeypatch):
    model, adapter = pickle_folders
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("the dog runs .\n")
    for folder in (model, adapter):
        name = repr(str(folder))
        refused(capsys, ["generate", "--model", str(folder), "--prompt", "the dog", "--no-live"], name, "pickle")
        refused(capsys, ["infill", "--model", str(folder), "--text", "the [MASK] runs", "--no-live"], name, "pickle")
        refused(capsys, ["eval", str(folder), "--text-file", str(text), "--tokenizer", str(model)], name, "pickle")
    refused(capsys, ["finetune", "--model", str(model), "--data", str(text), "--output-dir", "o"], "pytorch_model.bin")


def test_devices_this_machine_lacks_and_seeds_that_do_not_fit(word_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("the dog runs .\n")
    generate = ["generate", "--model", str(word_model), "--prompt", "the dog", "--no-live", "--max-new-tokens", "4"]
    evaluate = ["eval", str(word_model), "--text-file", str(text), "--no-progress"]
    for argv in (generate, evaluate):
        refused(capsys, [*argv, "--device", "bogus"], "--device 'bogus' is not a torch device")
        refused(capsys, [*argv, "--seed", str(2**70)], "--seed must be an integer in [0, 2**32 - 1]")
        refused(capsys, [*argv, "--seed", "-3"], "--seed must be an integer")
        if not torch.cuda.is_available():
            refused(capsys, [*argv, "--device", "cuda"], "no cuda device")
            refused(capsys, [*argv, "--device", "cuda:3"], "no cuda device")
    if torch.cuda.is_available():
        refused(capsys, [*generate, "--device", f"cuda:{torch.cuda.device_count()}"], "numbered 0 to")
    assert main([*generate, "--device", "cpu", "--seed", str(2**32 - 1)]) == 0  # the edges are fine


def test_push_without_network_is_one_line_naming_the_endpoint(word_model, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    folder = tmp_path / "model"
    folder.mkdir()
    for path in word_model.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    refused(capsys, ["push", "--model", str(folder), "--repo-id", "org/tiny", "--token", "hf_not_a_token"],
            f"could not reach the Hub at {endpoint}", "Nothing was uploaded")


def test_bad_utf8_names_file_and_line_and_json_is_checked_before_any_work(word_model, tmp_path, capsys,
                                                                          monkeypatch):
    import hf_sfdlm.evaluation

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the dog runs .\nthe cat \xff sits .\n")
    refused(capsys, ["eval", str(word_model), "--text-file", str(bad), "--no-progress"],
            repr(str(bad)), "is not UTF-8 text: line 2, byte 9")

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the --json path was checked")

    monkeypatch.setattr(hf_sfdlm.evaluation, "load_model", no_work)
    good = tmp_path / "good.txt"
    good.write_text("the dog runs .\n")
    evaluate = ["eval", str(word_model), "--text-file", str(good), "--no-progress"]
    refused(capsys, [*evaluate, "--json", "missing/out.json"], "the folder", "missing'", "does not exist")
    refused(capsys, [*evaluate, "--json", str(tmp_path)], "is a folder")
    (tmp_path / "out.json").write_text("{}")
    refused(capsys, [*evaluate, "--json", "out.json"], "exists; pass --overwrite")
    assert (tmp_path / "out.json").read_text() == "{}"


def test_the_real_entry_point_prints_one_line_for_a_pickle_folder(pickle_folders, tmp_path):
    """The same as above, through `python -m hf_sfdlm.cli` in a fresh process (no in-process shortcuts)."""
    model, _ = pickle_folders
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFDLM_DEBUG": ""}
    result = subprocess.run([sys.executable, "-m", "hf_sfdlm.cli", "generate", "--model", str(model), "--prompt",
                             "the dog", "--device", "cpu", "--no-live"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert_one_line_error(result, "generate", "pytorch_model.bin", "never loads")
