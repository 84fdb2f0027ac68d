"""The quality benchmark's learning-rate sweep reports each candidate's error and whether its choice is
resolved; the report gives every row's per-seed ratio to the AR model."""

import json

import pytest
import torch

from test_quality_benchmark import _load_report, _preset, _write_setting, quality


def quality_json(seed, runs, sweeps=None):
    return {"benchmark": "quality", "preset": "cpu", "setting": "ptb-word", "unit": "word",
            "command": f"python benchmarks/quality.py --seeds {seed}", "seeds": [seed],
            "settings": {"steps": 10, "batch_size": 2, "block_size": 32, "lrs": [0.001, 0.003]},
            "data": {"vocabulary": 10000, "train": 1000, "test": 100}, "baselines": [], "runs": runs,
            "sweeps": sweeps or {}}


def run(name, kind, seed, value):
    return {"name": name, "kind": kind, "seed": seed, "lr": 0.003, "parameters": 100, "tokens_seen": 640,
            "train_seconds": 2.0, "tokens_per_second": 320.0,
            "test": {"perplexity": value, "perplexity_stderr": 0.0 if kind == "ar" else 1.0}}


def test_report_gives_the_per_seed_ratio_to_the_ar_model(tmp_path):
    # seeds move both rows together: the ratio of means is 1.55, the per-seed ratios are 1.5 and 1.6
    for seed, (ar, diffusion, other) in enumerate([(100.0, 150.0, 300.0), (200.0, 320.0, 500.0)]):
        runs = [run("gpt2-ar", "ar", seed, ar), run("sfdlm-absorbing", "sfdlm", seed, diffusion)]
        runs += [run("mdlm-transformer", "transformer", 5, other)] if seed == 0 else []  # no AR run of seed 5
        (tmp_path / f"quality_cpu_ptb-word_seeds{seed}.json").write_text(json.dumps(quality_json(seed, runs)))
    text = _load_report().render(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| sfdlm-absorbing |"))
    assert "| 235 ± 120.2 |" in row  # mean ± std over seeds
    assert row.endswith("| 1.57x | 1.55 ± 0.07071x |")
    assert next(line for line in text.splitlines() if line.startswith("| mdlm-transformer |")).endswith("|  |")


def test_report_shows_sweep_errors_and_flags_an_unresolved_choice(tmp_path):
    sweeps = {"sfdlm-absorbing": {"lrs": {"0.001": 6.5891, "0.003": 6.5877}, "stderr": {"0.001": 0.004, "0.003": 0.004},
                                  "lead_of_best": {"0.001": {"nats_per_token": 0.0014, "stderr": 0.003}},
                                  "resolved": False, "best_lr": 0.003},
              "gpt2-ar": {"lrs": {"0.001": 6.45, "0.003": 6.526}, "best_lr": 0.001}}  # an older JSON's sweep
    (tmp_path / "quality_cpu_ptb-word_seeds0.json").write_text(
        json.dumps(quality_json(0, [run("gpt2-ar", "ar", 0, 100.0)], sweeps)))
    text = _load_report().render(tmp_path)
    assert "| sfdlm-absorbing | 6.589 ± 0.004 | **6.588 ± 0.004** | **unresolved** (lead 0.0014 ± 0.003) |" in text
    assert "| gpt2-ar | **6.45** | 6.526 | not recorded |" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2-ar", "sfdlm-absorbing"])
def test_sweep_reports_each_candidate_with_its_error_and_a_verdict(tmp_path, name):
    torch.set_num_threads(1)
    vocab, data = quality.load_setting("ptb-word", _write_setting(tmp_path, "ptb-word"))
    preset = dict(_preset(8), lrs=[1e-4, 3e-2], sweep_steps=3, eval_samples=4)
    sweep = quality.sweep(name, quality.MODELS[name], "ptb-word", data, preset, len(vocab), vocab.eos_id)
    assert sweep["validation_blocks"] == len(quality.blocks_of(data["valid"], 8))  # the whole validation split
    assert set(sweep["lrs"]) == set(sweep["stderr"]) == {"0.0001", "0.03"}
    if name == "gpt2-ar":
        assert all(error == 0 for error in sweep["stderr"].values())  # exact likelihoods
    else:
        assert all(error > 0 for error in sweep["stderr"].values())
    (other, lead), = sweep["lead_of_best"].items()
    assert lead["nats_per_token"] == pytest.approx(sweep["lrs"][other] - sweep["lrs"][f"{sweep['best_lr']:g}"])
    assert lead["stderr"] > 0
    assert sweep["resolved"] == (lead["nats_per_token"] > 2 * lead["stderr"])
