"""The `sfdlm` command line as a user meets it: the real entry point, in a subprocess, for each everyday
mistake (one line, exit status 2, no traceback), Ctrl-C during training (exit 130, the resume command, an
exact resume), a mistyped local folder (fails at once, no network), help texts and parsing."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from hf_sfdlm import SFDLMForDiffusionLM
from hf_sfdlm.cli import SUBCOMMANDS, build_parser, main

SFDLM = shutil.which("sfdlm") or os.path.join(os.path.dirname(sys.executable), "sfdlm")
# A tiny run of the embedded default (synthetic corpus), small enough for a test.
TINY_RUN = ["data.synthetic_sentences=600", "data.block_size=32", "training.batch_size=8", "training.eval_every=0",
            "training.eval_max_sequences=8", "training.checkpoint_every=5", "model.hidden_size=32",
            "model.stage_depths=[1,1]", "model.fourier_intermediate_size=64", "model.ssm_state_size=4",
            "training.log_with=[]", "--num-samples", "0"]


def sfdlm(*args, cwd, env=None, **kwargs) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "SFDLM_DEBUG": "", **(env or {})}
    return subprocess.run([SFDLM, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    """A saved tiny absorbing SFDLM with the synthetic corpus's word-level tokenizer."""
    from hf_sfdlm.synthetic import word_level_tokenizer

    folder = tmp_path_factory.mktemp("cli") / "sfdlm-tiny"
    tokenizer = word_level_tokenizer()
    model = SFDLMForDiffusionLM(tiny_config(vocab_size=len(tokenizer), process="absorbing",
                                            mask_token_id=tokenizer.mask_token_id,
                                            eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def assert_one_line_error(result, command: str, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line.strip() for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
    errors = [line for line in lines if line.startswith(f"sfdlm {command}: error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


# ---------------------------------------------------------------------------------------------- mistakes
MISTAKES = {
    "missing model folder": (["generate", "--model", "outputs/sfdlm-tny", "--prompt", "the dog"],
                             "generate", ["'outputs/sfdlm-tny': no such folder", "did you mean 'outputs/sfdlm-tiny'"]),
    "negative max-new-tokens": (["generate", "--model", "{model}", "--max-new-tokens", "-5"],
                                "generate", ["--max-new-tokens must be a positive integer, got -5"]),
    "zero steps": (["generate", "--model", "{model}", "--steps", "0"], "generate", ["--steps", "0"]),
    "unknown sampler": (["generate", "--model", "{model}", "--sampler", "bogus"],
                        "generate", ["--sampler 'bogus' is not one of", "ancestral"]),
    "sampler that does not fit the model": (["generate", "--model", "{model}", "--sampler", "uniform",
                                             "--no-live"], "generate", ["sampler='uniform'", "absorbing"]),
    "missing eval file": (["eval", "{model}", "--text-file", "missing.txt"],
                          "eval", ["--text-file 'missing.txt' does not exist"]),
    "missing data file": (["train", "--data", "missing.txt"], "train", ["missing.txt"]),
    "empty data file": (["train", "--data", "empty.txt", *TINY_RUN], "train", ["empty.txt"]),
    "argparse error": (["infill", "--model", "{model}"], "infill",
                       ["the following arguments are required: --text", "sfdlm infill --help"]),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_prints_one_line_and_exits_2(mistake, word_model, tmp_path):
    argv, command, fragments = MISTAKES[mistake]
    (tmp_path / "outputs" / "sfdlm-tiny").mkdir(parents=True)
    (tmp_path / "empty.txt").write_text("\n\n")
    result = sfdlm(*[arg.replace("{model}", str(word_model)) for arg in argv], cwd=tmp_path)
    assert_one_line_error(result, command, *fragments)


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--max-steps", "0"], "max_steps"),
    (["train", "training.bogus=1"], "bogus"),
    (["finetune", "--model", "org/m", "--data", "d.txt", "--lora-r", "many"], "invalid int value: 'many'"),
    (["eval", "org/m", "--text-file", "t.txt", "--nelbo-samples", "0"], "--nelbo-samples must be a positive"),
])
def test_more_mistakes_in_process(argv, fragment, tmp_path, capsys, monkeypatch):
    """The same error path, in process (cheaper than a subprocess each)."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"sfdlm {argv[0]}: error: ") and fragment in error[0], error


def test_debug_shows_the_traceback(tmp_path):
    result = sfdlm("eval", "--debug", str(tmp_path), "--text-file", "missing.txt", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert result.stderr.rstrip().endswith("sfdlm eval: error: --text-file 'missing.txt' does not exist.")


def test_a_mistyped_local_path_fails_at_once_without_network(tmp_path):
    """No Hub retries for a folder that does not exist: the error comes before torch, transformers or any
    connection (the Hub endpoint is a local socket that records connection attempts)."""
    (tmp_path / "outputs" / "sfdlm-tiny").mkdir(parents=True)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}"}
        start = time.perf_counter()
        result = sfdlm("generate", "--model", "outputs/sfdlm-tny", "--prompt", "the dog", cwd=tmp_path, env=env)
        elapsed = time.perf_counter() - start
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    assert_one_line_error(result, "generate", "'outputs/sfdlm-tny': no such folder")
    assert elapsed < 2.0, f"took {elapsed:.1f} s"
    probe = ("import sys; from hf_sfdlm.cli import main; code = main(['finetune', '--model', 'outputs/sfdlm-tny', "
             "'--data', 'x.txt']); print(code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.stdout.split() == ["2", "False", "False"], out.stderr


def test_help_is_fast_and_lists_every_command(tmp_path):
    result = sfdlm("--help", cwd=tmp_path)
    assert result.returncode == 0 and all(name in result.stdout for name in SUBCOMMANDS)
    probe = "import sys; from hf_sfdlm.cli import build_parser; build_parser(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_during_training_exits_130_and_resume_is_exact(tmp_path):
    run = ["train", "--output-dir", "run", "--max-steps", "60", *TINY_RUN]
    process = subprocess.Popen([SFDLM, *run], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    checkpoint = tmp_path / "run" / "checkpoints" / "step-5"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    hint = [line for line in re.split(r"[\r\n]", stderr) if line.strip()][-1]
    assert "interrupted (Ctrl-C); nothing new was saved" in hint, stderr
    assert hint.endswith("--resume") and "sfdlm train --output-dir run --max-steps 60" in hint
    assert not (tmp_path / "run" / "model.safetensors").exists()

    resumed = shlex.split(re.search(r"sfdlm (train .*)$", hint).group(1))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(resumed) == 0
        reference = ["train", "--output-dir", "reference", "--max-steps", "60", *TINY_RUN]
        assert main(reference) == 0
    finally:
        os.chdir(cwd)
    weights = load_file(tmp_path / "run" / "model.safetensors")
    expected = load_file(tmp_path / "reference" / "model.safetensors")
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)
    report = json.loads((tmp_path / "run" / "train_report.json").read_text())
    assert report["steps"] == 60


# ---------------------------------------------------------------------------------------------- parsing and help
def test_overrides_are_accepted_anywhere():
    from hf_sfdlm.cli import parse_args

    parser = build_parser(["train"])
    args = parse_args(parser, ["train", "training.seed=3", "--max-steps", "4", "model.process=uniform", "--resume"])
    assert args.overrides == ["training.seed=3", "model.process=uniform"] and args.max_steps == 4 and args.resume
    parser = build_parser(["finetune"])
    args = parse_args(parser, ["finetune", "training.seed=1", "--model", "m", "training.lr_scheduler=constant",
                               "--data", "d.txt", "training.max_steps=3"])
    assert args.overrides == ["training.seed=1", "training.lr_scheduler=constant", "training.max_steps=3"]


@pytest.mark.parametrize("command", sorted(set(SUBCOMMANDS)))
def test_every_option_documents_its_default(command):
    parser = build_parser([command])
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.dest in ("help",) or not action.option_strings:
            continue
        text = action.help or ""
        assert text, f"{command} {action.option_strings} has no help"
        if action.nargs != 0 and not action.required:  # an option that takes a value
            assert "default" in text, f"{command} {action.option_strings}: {text!r} states no default"


def test_one_meaning_per_option_name():
    """An option name means the same thing in every command (no `--num-samples` that is printed samples in
    one command and Monte Carlo draws in another)."""
    meanings: dict[str, set[str]] = {}
    for command in SUBCOMMANDS:
        parser = build_parser([command])
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            for name in action.option_strings:
                meanings.setdefault(name, set()).add(action.dest)
    assert "--nelbo-samples" in meanings and all(len(dests) == 1 for dests in meanings.values()), meanings


def test_static_lists_match_the_library():
    from hf_sfdlm.commands import finetune, generate
    from hf_sfdlm.generation_sfdlm import CONFIDENCE_MEASURES, SAMPLERS
    from hf_sfdlm.train_config import FINETUNE_DEFAULTS, FINETUNE_FORMATS

    assert set(generate.BUILTIN_SAMPLERS) == set(SAMPLERS)
    assert tuple(generate.CONFIDENCE_MEASURES) == tuple(CONFIDENCE_MEASURES)
    assert finetune.FORMATS == tuple(FINETUNE_FORMATS) and finetune.DEFAULT_MAX_STEPS == FINETUNE_DEFAULTS["max_steps"]


# ---------------------------------------------------------------------------------------------- vocabulary
def test_generate_shows_unknown_words_and_never_special_tokens(word_model, capsys):
    assert main(["generate", "--model", str(word_model), "--prompt", "the zyzzyva dog", "--steps", "4",
                 "--max-new-tokens", "6", "--no-live"]) == 0
    captured = capsys.readouterr()
    assert "not in the tokenizer's vocabulary" in captured.err and "'zyzzyva'" in captured.err
    assert captured.out.startswith("the [UNK] dog")
    assert not any(token in captured.out for token in ("[PAD]", "[EOS]", "[MASK]"))


def test_eval_reports_the_unknown_share_and_warns(word_model, tmp_path, capsys):
    text = tmp_path / "foreign.txt"
    text.write_text("the quick zyzzyva jumps over the lazy dog\n" * 4)
    assert main(["eval", str(word_model), "--text-file", str(text), "--block-size", "8", "--nelbo-samples", "2",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    share = re.search(r"unknown tokens: (\d+) \(([\d.]+)% of the text's tokens\)", captured.out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(word_model)
    unknown = tokenizer(text.read_text().split("\n")[0])["input_ids"].count(tokenizer.unk_token_id)
    assert unknown >= 1 and share and int(share.group(1)) == 4 * unknown
    assert "the tokenizer does not cover this text" in captured.err
