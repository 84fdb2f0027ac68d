"""The `block` grid of benchmarks/sampling_speed.py: a smoke run at a tiny shape and its roofline bound, checked
by hand. No timing is asserted (timings on a shared CPU mean nothing in a test)."""

import functools
import json
import math
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
sys.path.insert(0, BENCHMARKS)
sampling_speed = pytest.importorskip("sampling_speed")

MACHINE = dict(bandwidth_gbs=10.0, peak_gflops=100.0)  # 1e10 B/s, 1e11 flop/s


def test_bound_matches_the_hand_computed_roofline():
    sizes = dict(body=1_000_000, head=500_000, layers=2, hidden=8)
    # Block, L = 32, b = 16, batch 1, 2 steps per block: 2 blocks x 3 body passes over 16 positions, each
    # max(4e6 B / 1e10, 2e6 x 16 flop / 1e11) = max(4e-4, 3.2e-4) = 4e-4 s (bandwidth); 2 blocks x 2 head
    # passes over 8 positions, each max(2e6 / 1e10, 1e6 x 8 / 1e11) = 2e-4 s. Attention (the Transformer's
    # cache): block j reads 8 x 2 layers x 16 (j + 1) x 8 bytes per pass, 3 passes.
    attention = sum(3 * max(8 * 2 * 16 * (j + 1) * 8 / 1e10, 4 * 2 * 16 * 16 * (j + 1) * 8 / 1e11) for j in range(2))
    block = sampling_speed.time_bound("block", sizes, 32, 1, MACHINE, steps=2, block_size=16)
    assert block["seconds"] == pytest.approx(6 * 4e-4 + 4 * 2e-4 + attention, rel=1e-12)
    assert block["limits"] == {"body": "bandwidth", "head": "bandwidth", "attention": "bandwidth"}
    assert block["body_weight_reads_per_token"] == pytest.approx(3 / 16)
    assert block["body_token_passes_per_token"] == 3.0
    # AR, same shape: 32 tokens, each one pass of one position through body and head (weights read once),
    # plus attention to a cache of c = 1..32 tokens: 8 x 2 x c x 8 bytes.
    ar = sampling_speed.time_bound("ar", sizes, 32, 1, MACHINE)
    expected_ar = 32 * (4e-4 + 2e-4) + 128 * sum(range(1, 33)) / 1e10
    assert ar["seconds"] == pytest.approx(expected_ar, rel=1e-12)
    assert ar["body_weight_reads_per_token"] == 1.0 and ar["body_token_passes_per_token"] == 1.0
    # Batch 16: the block's body pass covers 256 positions, 2e6 x 256 / 1e11 = 5.12e-3 s > 4e-4: compute.
    wide = sampling_speed.time_bound("block", dict(sizes, layers=0), 32, 16, MACHINE, steps=2, block_size=16)
    assert wide["limits"]["body"] == "compute"
    assert wide["seconds_by_part"]["body"] == pytest.approx(6 * 5.12e-3, rel=1e-12)
    # Full canvas, 6 steps over 32 positions: body 6 x max(4e-4, 2e6 x 32 / 1e11 = 6.4e-4); head at 32 / 6
    # positions a step.
    full = sampling_speed.time_bound("full", dict(sizes, layers=0), 32, 1, MACHINE, steps=6)
    assert full["seconds"] == pytest.approx(6 * 6.4e-4 + 6 * max(2e-4, 1e6 * 32 / 6 / 1e11), rel=1e-12)
    assert sampling_speed.full_canvas_steps(1024, 16, 2) == 192


@pytest.mark.parametrize("kwargs, message", [(dict(kind="lstm"), "kind"), (dict(steps=0), "steps"),
                                             (dict(block_size=5), "block_size")])
def test_bound_rejects_bad_arguments(kwargs, message):
    arguments = dict(kind="block", sizes=dict(body=1, head=1), length=32, batch=1, machine=MACHINE, steps=2,
                     block_size=16)
    with pytest.raises(ValueError, match=message):
        sampling_speed.time_bound(**{**arguments, **kwargs})


@pytest.mark.parametrize("kwargs, message", [(dict(length=40), "length"), (dict(steps=[]), "steps"),
                                             (dict(steps=[2, 0]), "steps"), (dict(rounds=0), "rounds")])
def test_block_point_rejects_bad_shapes(kwargs, message):
    arguments = dict(size="toy", vocab=2048, batch=1, steps=[2], rounds=1, full_timed_steps=None)
    with pytest.raises(ValueError, match=message):
        sampling_speed.block_point(**{**arguments, **kwargs})


def test_block_grid_smoke(tmp_path, monkeypatch):
    """Every contender runs once at a tiny shape; the records carry the bound, tokens per forward pass and
    the ratios, and the block SFDLM model really generates the requested tokens in every row."""
    tiny = dict(hidden_size=16, stage_depths=[1, 1], fourier_intermediate_size=16)
    monkeypatch.setitem(sampling_speed.BLOCK_SIZES, "toy", {64: tiny})
    monkeypatch.setattr(sampling_speed, "PROBE", dict(read_mib=1, matmul=32, repeats=1))
    points = [sampling_speed.block_point("toy", 64, 2, [2], rounds=1, full_timed_steps=2, length=32, warmup_length=16),
              sampling_speed.block_point("toy", 64, 1, [1], rounds=1, full_timed_steps=None, length=32,
                                         warmup_length=16)]
    monkeypatch.setitem(sampling_speed.GRIDS, "block", points)
    for name in ("matched_gpt2_config", "matched_transformer_denoiser_config"):  # fewer depths to try: faster
        monkeypatch.setattr(sampling_speed, name, functools.partial(getattr(sampling_speed, name), max_layers=2))
    plots = []  # matplotlib costs seconds; the plot is drawn by `--grid full` runs, here only its call is checked
    monkeypatch.setattr(sampling_speed, "plot_block", lambda report, path: plots.append(path))
    calls = []
    original = sampling_speed.SFDLMForDiffusionLM.generate

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((self.config.block_size, kwargs, out))
        return out

    monkeypatch.setattr(sampling_speed.SFDLMForDiffusionLM, "generate", spy)
    path = tmp_path / "block.json"
    report = sampling_speed.main(["--grid", "block", "--threads", "1", "--output", str(path)])
    saved = json.loads(path.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert plots == [str(tmp_path / "block.png")] * 2  # after every point
    assert any("two other single-thread" in note for note in saved["notes"])
    assert any("gen" in note.lower() and "quality.py --study blocks" in note for note in saved["notes"])
    models = {(r["batch"], r["model"], r["steps"]) for r in saved["results"]}
    assert models == {(2, "gpt2-kv", None), (2, "sfdlm-block16", 2), (2, "transformer-block16", 2), (2, "sfdlm-full", 6),
                      (1, "gpt2-kv", None), (1, "sfdlm-block16", 1), (1, "transformer-block16", 1), (1, "sfdlm-full", 4)}
    for r in saved["results"]:
        assert r["bound"]["seconds"] > 0 and r["bound"]["limit"] in ("bandwidth", "compute")
        assert math.isfinite(r["speedup_vs_gpt2"]) and math.isfinite(r["predicted_speedup_vs_gpt2"])
        assert r["measured_over_predicted"] == pytest.approx(r["speedup_vs_gpt2"] / r["predicted_speedup_vs_gpt2"])
        assert r["machine"]["bandwidth_gbs"] > 0 and r["machine"]["peak_gflops"] > 0
        if "block" in r["model"]:
            assert r["generated_tokens_per_row"] == 32
            assert r["tokens_per_forward"] == pytest.approx(32 / r["forward_passes_per_row"])
            assert r["tokens_per_forward_nominal"] == pytest.approx(16 / (r["steps"] + 1))
            assert r["speedup_vs_full_canvas"]["model"] == f"sfdlm-full@{2 * (r['steps'] + 1)}"
        if r["model"] == "sfdlm-full":
            truncated = r["batch"] == 2  # 6 steps, the first 2 timed
            assert r["extrapolated"] is truncated
            if truncated:  # 2 passes of 2 rows timed, scaled to the expected 2 x 6 (1 - (5/6)^32) row-passes
                assert r["passes_timed"] == 2 and r["row_passes_timed"] == 4
                assert r["expected_passes_per_row"] == pytest.approx(6 * (1 - (5 / 6) ** 32))
                assert r["seconds_median"] == pytest.approx(r["seconds_measured"][0] * 2 * r["expected_passes_per_row"] / 4)
                assert r["forward_passes_per_row"] is None and "extrapolation" in r
            else:
                assert r["generated_tokens_per_row"] == 32
    # The block model's own outputs at the timed length (not the warm-up's): every row has all 32 tokens, no
    # mask left, from 2 blocks of at most steps + 1 passes each.
    timed = [(kwargs, out) for size, kwargs, out in calls if size == 16 and kwargs["max_new_tokens"] == 32]
    assert len(timed) == 2
    for kwargs, out in timed:
        batch, steps = kwargs["num_return_sequences"], kwargs["steps"]
        assert out.sequences.shape == (batch, 32)
        assert not (out.sequences == 63).any()
        assert (out.num_forward_passes <= 2 * (steps + 1)).all() and (out.num_forward_passes >= 2 * 2).all()
    # The truncated full-canvas run stopped after its 2 timed steps: it returned nothing (no output recorded).
    assert [kwargs["steps"] for size, kwargs, _ in calls if size is None and kwargs["max_new_tokens"] == 32] == [4]


def test_expected_passes_match_the_sampler():
    """The extrapolation's pass count, batch x N (1 - (1 - 1/N)^L), against the real absorbing ancestral sampler
    (64 independent rows of a random-weight model, L = 64, N = 32: mean passes 27.8, per-row sd about 1.3)."""
    import torch

    from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM

    torch.manual_seed(0)
    model = SFDLMForDiffusionLM(SFDLMConfig(vocab_size=16, hidden_size=8, stage_depths=[1], fourier_intermediate_size=8,
                                            process="absorbing", mask_token_id=15, noise_schedule="loglinear",
                                            num_timesteps=None, time_conditioning=False)).eval()
    out = model.generate(None, max_new_tokens=64, num_return_sequences=64, steps=32, return_dict_in_generate=True,
                         generator=torch.Generator().manual_seed(0))
    expected = sampling_speed.expected_row_passes(64, 32, 1)
    assert expected == pytest.approx(32 * (1 - (31 / 32) ** 64))
    assert float(out.num_forward_passes.float().mean()) == pytest.approx(expected, abs=1.0)  # ~6 standard errors
    assert sampling_speed.expected_row_passes(64, 32, 64) == pytest.approx(64 * expected)
