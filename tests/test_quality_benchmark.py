"""The quality benchmark's likelihood code, checked on predictors whose exact likelihood is known."""

import gzip
import importlib.util
import json
import math
import os
import random
import shutil
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from hf_sfdlm import SFDLMForDiffusionLM

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)
quality = pytest.importorskip("quality")
ngram = pytest.importorskip("ngram")


def _load_report():
    spec = importlib.util.spec_from_file_location("bench_report", os.path.join(BENCHMARKS, "report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_setting(tmp_path, setting: str) -> str:
    """Tiny train/valid/test files in the format of ../shared/data's PTB (word) or PTB-char (char) copies."""
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "<unk>", "N"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))) for _ in range(300)]
    root = tmp_path / setting
    for split, path in quality.SETTINGS[setting]["splits"].items():
        chosen = lines[:100] if split == "train" else lines[100:300]
        file = root / path
        file.parent.mkdir(parents=True, exist_ok=True)
        if setting == "ptb-char":  # characters separated by spaces, '_' between words, a leading space
            text = "".join(" " + " ".join(line.replace(" ", "_")) + " \n" for line in chosen)
            with gzip.open(file, "wt", encoding="utf-8") as handle:
                handle.write(text)
        else:
            file.write_text("".join(f" {line} \n" for line in chosen))
    return str(root)


def _preset(block_size: int) -> dict:
    return dict(quality.PRESETS["cpu"]["ptb-word"], hidden_size=16, fourier_intermediate_size=32, ssm_state_size=4,
                num_heads=2, block_size=block_size, eval_samples=64, eval_batch_size=8)


@pytest.mark.parametrize("setting", ["ptb-word", "ptb-char"])
def test_uniform_predictors_score_exactly_log_vocabulary(tmp_path, setting):
    """A GPT-2 whose logits are all zero is exactly uniform: NLL = tokens * log V, to the last digit; an
    absorbing SFDLM whose head is zero has p_hat uniform over V, and its NELBO's expectation is the same
    tokens * log V (each position pays log V once over its masking time), within the Monte Carlo error."""
    vocab, data = quality.load_setting(setting, _write_setting(tmp_path, setting))
    assert data["test"][-1] == vocab.eos_id and vocab.symbols[vocab.eos_id] == quality.EOS
    v = len(vocab)
    blocks = quality.blocks_of(data["test"], 16)
    preset = _preset(16)
    tokens = len(data["test"])

    gpt2 = quality.build_model("gpt2-ar", quality.MODELS["gpt2-ar"], preset, v, 16).eval()
    torch.nn.init.zeros_(gpt2.transformer.wte.weight)  # tied head: every logit is 0
    exact = quality.nll(gpt2, blocks, preset, vocab.eos_id, seed=0)
    assert exact["tokens"] == tokens and exact["total_nll_stderr"] == 0.0
    assert exact["total_nll"] == pytest.approx(tokens * math.log(v), rel=1e-12)
    result = quality.figures(exact, quality.SETTINGS[setting]["unit"])
    if setting == "ptb-word":
        assert result["perplexity"] == pytest.approx(v, rel=1e-12)
    else:
        assert result["bits_per_character"] == pytest.approx(math.log2(v), rel=1e-12)

    sfdlm = quality.build_model("sfdlm-absorbing", quality.MODELS["sfdlm-absorbing"], preset, v, 16).eval()
    assert isinstance(sfdlm, SFDLMForDiffusionLM)
    torch.nn.init.zeros_(sfdlm.lm_head.weight)
    bound = quality.nll(sfdlm, blocks, preset, vocab.eos_id, seed=0)
    assert abs(bound["total_nll"] - tokens * math.log(v)) < 4 * bound["total_nll_stderr"] + 1e-6 * tokens


def test_closed_vocabulary_refuses_unknown_symbols(tmp_path):
    vocab = quality.SymbolVocabulary(["a", "b", quality.EOS])
    with pytest.raises(ValueError, match="outside the training vocabulary"):
        vocab.encode(["a", "zebra"], "test")


def test_unigram_is_exact_frequencies():
    train = [0, 0, 1, 2, 2, 2]
    model = ngram.UnigramModel(train, vocab_size=4, alpha=1.0)
    expected = -sum(math.log((train.count(w) + 1) / (len(train) + 4)) for w in [0, 3, 2])
    assert model.score([0, 3, 2]) == pytest.approx(expected, rel=1e-12)


def test_kneser_ney_is_a_normalised_distribution_and_resets_history_at_blocks():
    rng = random.Random(1)
    train = [rng.randrange(6) for _ in range(400)]
    model = ngram.KneserNeyModel(train, vocab_size=7, order=3)  # id 6 never occurs in training
    for history in ([], [1], [2, 3], [6, 6], [0, 1, 2, 3]):
        assert sum(model.prob(history, w) for w in range(7)) == pytest.approx(1.0, abs=1e-12)
        assert model.prob(history, 6) > 0
    assert 0 < model.discounts[3] < 1
    test = [rng.randrange(6) for _ in range(30)]
    by_block = sum(model.score(test[i:i + 10]) for i in range(0, 30, 10))
    assert model.score(test, reset_every=10) == pytest.approx(by_block, rel=1e-12)
    assert model.score(test) != pytest.approx(by_block, rel=1e-6)  # the stream's history does matter
    # a smoothed trigram fits its own training text far better than the unigram does
    assert model.score(train) < ngram.UnigramModel(train, 7).score(train)


def test_report_merges_seeds_with_mean_and_spread(tmp_path):
    def run(name, kind, seed, value):
        return {"name": name, "kind": kind, "seed": seed, "lr": 0.003, "parameters": 100, "tokens_seen": 640,
                "train_seconds": 2.0, "tokens_per_second": 320.0,
                "test": {"perplexity": value, "perplexity_stderr": 0.0 if kind == "ar" else 1.0}}
    base = {"benchmark": "quality", "preset": "cpu", "setting": "ptb-word", "unit": "word",
            "settings": {"steps": 10, "batch_size": 2, "block_size": 32, "lrs": [0.003]},
            "data": {"vocabulary": 10000, "train": 929589, "test": 82430}, "anchors": {"Kneser-Ney 5-gram": 141.2}}
    for seed, (ar, diffusion) in enumerate([(100.0, 200.0), (110.0, 220.0)]):
        payload = dict(base, command=f"python benchmarks/quality.py --seeds {seed}", seeds=[seed],
                       baselines=[{"name": "unigram", "conditioning": "test stream", "perplexity": 640.0}] if seed == 0 else [],
                       runs=[run("gpt2-ar", "ar", seed, ar), run("sfdlm-absorbing", "sfdlm", seed, diffusion)])
        (tmp_path / f"quality_cpu_ptb-word_seeds{seed}.json").write_text(json.dumps(payload))
    text = _load_report().render(tmp_path)
    assert text.count("## quality: ptb-word") == 1
    assert "Command: `python benchmarks/quality.py --seeds 0`" in text and "--seeds 1`" in text
    assert "| sfdlm-absorbing | bound | 2 | 210 ± 14.14 | 1 |" in text and "| 2x |" in text
    assert "| gpt2-ar | exact | 2 | 105 ± 7.071 |" in text
    assert "unigram (test stream)" in text and "published: Kneser-Ney 5-gram" in text
    # the merged figure (every seed of the setting) is drawn and then linked from the section
    spec = importlib.util.spec_from_file_location("bench_quality_plot", os.path.join(BENCHMARKS, "quality_plot.py"))
    quality_plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality_plot)
    assert quality_plot.main(["--results", str(tmp_path)]) == 0
    assert (tmp_path / "quality_cpu_ptb-word.png").stat().st_size > 0
    assert "![quality ptb-word](results/quality_cpu_ptb-word.png)" in _load_report().render(tmp_path)



def test_report_names_each_sample_count_when_invocations_differ():
    report = _load_report()
    def data(samples, *names):
        return {"settings": {"eval_samples": samples},
                "runs": [{"name": name, "kind": "ar" if name == "gpt2-ar" else "sfdlm"} for name in names]}
    assert report._eval_samples([data(8, "gpt2-ar", "sfdlm-absorbing"), data(8, "mdlm-transformer")]) == \
        "8 t samples per test block"
    # the AR row's invocation (its count means nothing) is not a second count
    assert report._eval_samples([data(8, "gpt2-ar"), data(24, "sfdlm-uniform")]) == "24 t samples per test block"
    assert report._eval_samples([data(8, "sedd-absorbing"), data(24, "sfdlm-uniform", "sfdlm-uniform no-ssm")]) == \
        "t samples per test block: 8 (sedd-absorbing); 24 (sfdlm-uniform, sfdlm-uniform no-ssm)"

@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_a_tiny_corpus(tmp_path):
    """Baselines, two models, length generalisation, generation, JSON, plot and report, in seconds."""
    data_dir = _write_setting(tmp_path, "ptb-word")
    out = tmp_path / "q.json"
    assert quality.main(["--setting", "ptb-word", "--models", "gpt2-ar", "sfdlm-uniform", "--steps", "2",
                         "--lr", "1e-3", "--threads", "1", "--data-dir", data_dir, "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["name"] for r in record["runs"]] == ["gpt2-ar", "sfdlm-uniform"]
    assert {b["name"] for b in record["baselines"]} == {"unigram (add-one)", "interpolated Kneser-Ney 5-gram"}
    assert [g["factor"] for g in record["runs"][1]["length_generalisation"]] == [1, 4, 16]
    assert {(g["model"], g["steps"]) for g in record["generation"]} >= {("sfdlm-uniform", 8), ("sfdlm-uniform", 128)}
    assert (tmp_path / "q.png").exists()
    assert "## quality: ptb-word" in _load_report().render(tmp_path)


@pytest.mark.slow
def test_seeds_in_a_second_process_reuse_the_first_ones_sweeps(tmp_path):
    """Sweeps run before any training and land in the JSON; a later invocation with `--lr-from` trains at
    those rates without sweeping (an ablation at sfdlm-uniform's), and `--no-extras` skips length
    generalisation and generation."""
    data_dir = _write_setting(tmp_path, "ptb-word")
    first, second = tmp_path / "seed0.json", tmp_path / "seed1.json"
    common = ["--setting", "ptb-word", "--steps", "4", "--threads", "1", "--data-dir", data_dir]
    assert quality.main(common + ["--seeds", "0", "--models", "sfdlm-uniform", "--output", str(first)]) == 0
    swept = json.loads(first.read_text())["sweeps"]
    assert set(swept) == {"sfdlm-uniform"} and len(swept["sfdlm-uniform"]["lrs"]) == 3
    assert quality.main(common + ["--seeds", "1", "--no-extras", "--lr-from", str(first),
                                  "--models", "sfdlm-uniform no-ssm", "--output", str(second)]) == 0
    record = json.loads(second.read_text())
    assert [(r["name"], r["seed"], r["lr"]) for r in record["runs"]] == [
        ("sfdlm-uniform no-ssm", 1, swept["sfdlm-uniform"]["best_lr"])]
    assert "length_generalisation" not in record["runs"][0] and record["generation"] == []
    with pytest.raises(SystemExit, match="no sweep for 'gpt2-ar'"):
        quality.main(common + ["--seeds", "1", "--lr-from", str(first), "--models", "gpt2-ar",
                               "--output", str(tmp_path / "x.json")])


def test_block_models_get_their_own_section_and_the_gap_they_close(tmp_path):
    """A `--study` keeps its rows apart from the main section; a block model ("<model> b<size>") is paired per
    seed with its full-canvas model and gpt2-ar: (full - block) / (full - AR), computed here by hand."""
    report = _load_report()
    assert report.gap_closed(full=300.0, block=260.0, ar=200.0) == pytest.approx(0.4)

    def run(name, kind, seed, value):
        return {"name": name, "kind": kind, "seed": seed, "lr": 0.003, "parameters": 100, "tokens_seen": 640,
                "train_seconds": 2.0, "tokens_per_second": 320.0, "test": {"perplexity": value}}
    base = {"benchmark": "quality", "preset": "cpu", "setting": "ptb-word", "unit": "word", "settings": {},
            "data": {"vocabulary": 10, "train": 100, "test": 50}, "anchors": {}, "baselines": []}
    figures = {0: (200.0, 300.0, 260.0), 1: (220.0, 320.0, 300.0)}  # AR, full canvas, b = 4 per seed
    for seed, (ar, full, block) in figures.items():
        runs = [run("gpt2-ar", "ar", seed, ar), run("sfdlm-absorbing", "sfdlm", seed, full),
                run("sfdlm-absorbing b4", "sfdlm", seed, block)]
        (tmp_path / f"quality_cpu_ptb-word_blocks_seeds{seed}.json").write_text(
            json.dumps(dict(base, study="blocks", seeds=[seed], runs=runs)))
    (tmp_path / "quality_cpu_ptb-word_seeds0.json").write_text(
        json.dumps(dict(base, seeds=[0], runs=[run("gpt2-ar", "ar", 0, 1.0)])))
    text = report.render(tmp_path)
    assert text.count("## quality: ptb-word, preset cpu (") == 1 and text.count("## quality: ptb-word, preset cpu, study blocks (") == 1
    closed = [100 * (300 - 260) / (300 - 200), 100 * (320 - 300) / (320 - 220)]  # 40 % and 20 %
    spread = math.sqrt(sum((c - 30.0) ** 2 for c in closed))  # two seeds: n - 1 = 1
    ratios = [260 / 300, 300 / 320]
    line = next(line for line in text.splitlines() if line.startswith("| sfdlm-absorbing b4 | sfdlm-absorbing |"))
    assert f"| {30:.4g} ± {spread:.4g} % |" in line
    assert f"| {sum(ratios) / 2:.4g} ± {abs(ratios[0] - ratios[1]) / math.sqrt(2):.4g}x |" in line


@pytest.mark.slow
def test_block_models_train_at_their_full_canvas_models_rate(tmp_path):
    """`--lr-from` several JSONs merges their sweeps; a block model trains at its full-canvas model's rate, its
    generation spends the same number of denoising steps spread over its blocks, and `--study` names the file."""
    data_dir = _write_setting(tmp_path, "ptb-word")
    sweeps = [{"sfdlm-absorbing": {"best_lr": 2e-3, "lrs": {}}, "gpt2-ar": {"best_lr": 1e-3, "lrs": {}}},
              {"mdlm-transformer": {"best_lr": 5e-4, "lrs": {}}}]
    paths = []
    for i, swept in enumerate(sweeps):
        paths.append(tmp_path / f"sweep{i}.json")
        paths[-1].write_text(json.dumps({"sweeps": swept}))
    preset = dict(quality.PRESETS["cpu"]["ptb-word"], hidden_size=16, fourier_intermediate_size=32, ssm_state_size=4,
                  num_heads=2, block_size=16, gen_samples=2, gen_steps=[8], length_factors=[], eval_batch_size=64)
    quality.PRESETS["tiny-test"] = {"ptb-word": preset}
    try:
        assert quality.main(["--preset", "tiny-test", "--models", "gpt2-ar", "sfdlm-absorbing b4", "mdlm-transformer b4",
                             "--steps", "2", "--threads", "1", "--data-dir", data_dir, "--study", "blocks",
                             "--lr-from", *map(str, paths), "--eval-samples", "4", "--output", str(tmp_path / "q.json")]) == 0
    finally:
        del quality.PRESETS["tiny-test"]
    record = json.loads((tmp_path / "q.json").read_text())
    assert record["study"] == "blocks" and record["settings"]["eval_samples"] == 4
    assert [(r["name"], r["lr"], r["config"].get("block_size")) for r in record["runs"]] == [
        ("gpt2-ar", 1e-3, None), ("sfdlm-absorbing b4", 2e-3, 4), ("mdlm-transformer b4", 5e-4, 4)]
    # 8 steps over 16 tokens in blocks of 4: 2 steps in each of the 4 blocks
    assert {(g["model"], g["steps"], g["steps_per_block"]) for g in record["generation"]
            if g["model"] != "gpt2-ar"} == {("sfdlm-absorbing b4", 8, 2), ("mdlm-transformer b4", 8, 2)}


@pytest.mark.slow
def test_saved_models_are_rescored_without_training_and_refused_when_trained_otherwise(tmp_path, monkeypatch):
    """`--models-dir`: the first invocation trains and saves; the second, with more t samples, loads the same
    weights (training is not called: the figures of the exact AR row are equal to the digit, the curve is the
    saved one) and scores again; a saved model trained for another number of steps is refused by name, and a
    half-written save (a `.tmp` folder left by a kill) is never loaded."""
    data_dir = _write_setting(tmp_path, "ptb-word")
    models = tmp_path / "models"
    common = ["--setting", "ptb-word", "--models", "gpt2-ar", "sfdlm-absorbing", "--lr", "1e-3", "--threads", "1",
              "--no-extras", "--data-dir", data_dir, "--models-dir", str(models)]
    assert quality.main(common + ["--steps", "3", "--eval-samples", "2", "--output", str(tmp_path / "a.json")]) == 0
    saved = sorted(p.name for p in (models / "cpu_ptb-word").iterdir())
    assert saved == ["gpt2-ar_seed0", "sfdlm-absorbing_seed0"]

    def no_training(*args, **kwargs):
        raise AssertionError("a saved model was trained again")
    monkeypatch.setattr(quality, "train", no_training)
    assert quality.main(common + ["--steps", "3", "--eval-samples", "4", "--output", str(tmp_path / "b.json")]) == 0
    first, second = (json.loads((tmp_path / f"{x}.json").read_text())["runs"] for x in "ab")
    assert [r.get("loaded_from") for r in second] == ["gpt2-ar_seed0", "sfdlm-absorbing_seed0"]
    assert second[0]["test"]["perplexity"] == first[0]["test"]["perplexity"]
    assert [r["curve"] for r in second] == [r["curve"] for r in first]
    assert second[1]["test"]["perplexity"] != first[1]["test"]["perplexity"]  # 4 samples instead of 2

    with pytest.raises(ValueError, match=r"'steps': 'saved 3, wanted 5'"):
        quality.main(common + ["--steps", "5", "--output", str(tmp_path / "c.json")])
    shutil.move(models / "cpu_ptb-word" / "gpt2-ar_seed0", models / "cpu_ptb-word" / "gpt2-ar_seed0.tmp")
    with pytest.raises(AssertionError, match="trained again"):  # the partial save is not taken for a model
        quality.main(common + ["--steps", "3", "--output", str(tmp_path / "d.json")])
