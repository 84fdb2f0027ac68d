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


# ------------------------------------------------------------------------------------------ item 8
def test_a_mistyped_local_looking_path_says_no_local_folder_as_well_as_the_hub_message(tmp_path, capsys,
                                                                                        monkeypatch):
    """`outputs/` does not exist here, so `outputs/sfdlm-tny` is tried as a Hub id; the error says both."""
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("the dog runs .\n")
    local = repr(str(tmp_path / "outputs" / "sfdlm-tny"))
    for argv in (["generate", "--model", "outputs/sfdlm-tny", "--prompt", "the dog", "--no-live"],
                 ["eval", "outputs/sfdlm-tny", "--text-file", str(text)],
                 ["finetune", "--model", "outputs/sfdlm-tny", "--data", str(text), "--output-dir", "o"]):
        refused(capsys, argv, "'outputs/sfdlm-tny' is not a local folder", f"nothing at {local}",
                "could not be loaded from the Hub")
    (tmp_path / "outputs").mkdir()  # with the parent folder present: a local path, with a suggestion
    (tmp_path / "outputs" / "sfdlm-tiny").mkdir()
    refused(capsys, ["generate", "--model", "outputs/sfdlm-tny", "--prompt", "x"], "no such folder",
            "did you mean 'outputs/sfdlm-tiny'")


def test_eval_reads_a_literal_mask_as_text_exactly_as_training_does(word_model, tmp_path, capsys):
    from hf_sfdlm.data import encode_plain_text
    from hf_sfdlm.evaluation import tokenize_lines
    from hf_sfdlm.hub import load_tokenizer

    tokenizer = load_tokenizer(word_model)
    lines = ["the [MASK] dog runs .\n", "a cat [EOS] sits .\n"]
    ids = tokenize_lines("".join(lines), tokenizer)
    assert ids == [i for doc in encode_plain_text(tokenizer, lines) for i in doc]  # the training encoding
    assert tokenizer.mask_token_id not in ids and tokenizer.eos_token_id not in ids
    assert ids.count(tokenizer.unk_token_id) == 2  # the word-level vocabulary reads them as unknown words
    text = tmp_path / "masked.txt"
    text.write_text("".join(lines))
    out = tmp_path / "r.json"
    out.write_text("old")
    assert main(["eval", str(word_model), "--text-file", str(text), "--no-progress", "--nelbo-samples", "2",
                 "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["num_tokens"] == len(ids)  # --overwrite replaced the old file


def test_train_tokenizer_refuses_to_overwrite_without_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the dog runs .\nthe cat sits .\n" * 20)
    argv = ["train-tokenizer", "--data", str(corpus), "--vocab-size", "300", "--output-dir", "tok"]
    assert main(argv) == 0
    before = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    refused(capsys, argv, "already holds a tokenizer (tokenizer.json", "--overwrite")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    corpus.write_text("x")
    refused(capsys, [*argv[:-1], str(corpus)], "is a file")


@pytest.mark.parametrize("record, message", [
    ('{"text": null}', "line 3: 'text' is null, not a string"),
    ('{"text": 5}', "line 3: 'text' is a number (5), not a string"),
    ('{"text": {"a": 1}}', "line 3: 'text' is an object"),
    ('{"body": "a cat ."}', "line 3: no 'text' field"),
])
def test_jsonl_records_whose_text_is_not_a_string_are_refused_naming_the_line(record, message, tmp_path):
    from hf_sfdlm.data import DataConfig, load_text_dataset

    data = tmp_path / "d.jsonl"
    data.write_text(f'{{"text": "the dog runs ."}}\n{{"text": "a cat ."}}\n{record}\n{{"text": "x ."}}\n')
    with pytest.raises(ValueError, match="d.jsonl', " + message.replace("(", r"\(").replace(")", r"\)")):
        load_text_dataset(DataConfig(dataset=str(data)))


def test_a_json_array_record_and_the_cli_name_the_bad_record(tmp_path, capsys, monkeypatch):
    from hf_sfdlm.data import DataConfig, load_text_dataset

    monkeypatch.chdir(tmp_path)
    array = tmp_path / "a.json"
    array.write_text('[\n {"text": "the dog runs ."},\n {"text": 7}\n]\n')
    with pytest.raises(ValueError, match=r"record 2: 'text' is a number \(7\)"):
        load_text_dataset(DataConfig(dataset=str(array)))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the dog runs ."}\n{"text": null}\n')
    refused(capsys, ["train", "--data", str(data), "training.max_steps=1", "--num-samples", "0"],
            "line 2: 'text' is null")
    good = tmp_path / "g.jsonl"
    good.write_text('{"text": "the dog runs ."}\n{"text": "a cat sits ."}\n')
    assert len(load_text_dataset(DataConfig(dataset=str(good)))["train"]) == 2
