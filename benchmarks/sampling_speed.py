"""Sampling speed: SFDLM's iterative denoising against GPT-2 sampling with its KV cache, side by side.

For each point of the grid (vocabulary V, canvas length L, batch B, autocast dtype) every contender runs
once per round, in a rotated order, for `--repeats` rounds after one warm-up round that is discarded, all
in this one process:

    gpt2-kv             GPT2LMHeadModel of about SFDLM's parameter count (same width and vocabulary),
                        `generate(use_cache=True, do_sample=True)`, L tokens one at a time
    sfdlm-absorbing@S   SFDLM, absorbing process, not noise-conditioned, sampler "ancestral", S steps: the
                        unmasking set is drawn first and the LM head runs only where tokens unmask; a row
                        where nothing unmasks makes no forward pass
    sfdlm-uniform@S     SFDLM, uniform process (the paper's), noise-conditioned, sampler "uniform": S
                        ancestral steps over every position, then Duo's one argmax pass (S + 1 passes)
    backbone@32         the limit: 32 passes of the SFDLM backbone over the whole batch, no LM head, no
                        sampling (the floor of any 32-step sampler)

Each record gives the median time over the rounds with its min and max, generated tokens/s, and the
speed-up over GPT-2 (median over rounds of GPT-2's time / the contender's time in the same round, with the
min and max of those per-round ratios). Weights are random: speed does not depend on them (every model
generates the full length: no EOS). Writes benchmarks/results/sampling_speed_<grid>_<device>.json and
.png after every point, so a stopped run keeps what it measured.

    python benchmarks/sampling_speed.py --quick --threads 1          # a few minutes
    python benchmarks/sampling_speed.py --grid full --threads 1      # ~50 min on a loaded 2-core machine
    python benchmarks/sampling_speed.py --grid precision --threads 1 # CPU bf16 vs float32, same rounds
    python benchmarks/sampling_speed.py --grid targets --threads 1   # the target shapes, ~15 min quiet
    python benchmarks/sampling_speed.py --grid block --threads 1     # block diffusion, L = 1,024, ~35 min

The `block` grid (issue "Block diffusion", must-show "Speed") has its own contenders and records; see
`block_contenders` and `time_bound` below. L = 1,024 generated tokens, batch 1 and 16, at the toy size and at a
realistic size (hidden 512, about 40-60M parameters, V = 10,000 and 50,257):

    gpt2-kv                 as above, parameter-matched to the block SFDLM model
    sfdlm-block16@S         block SFDLM (absorbing, b = 16), S denoising steps per block then one commit pass
    sfdlm-full@N            full-canvas SFDLM (absorbing) at the same nominal tokens per forward pass as the
                            block setting it is paired with: N = L (S + 1) / b steps over the whole canvas;
                            where running N steps costs too much, the first k forward passes of that N-step run
                            are timed and scaled to the run's expected passes (`expected_row_passes`; the
                            record says "extrapolated": true and keeps the measured times)
    transformer-block16@S   the Transformer denoiser in block mode with its KV cache, parameter-matched

Each record carries the roofline time bound of its contender on this machine (bandwidth and fp32 matmul
peak measured in this process, at this thread count, before every point) and the speed-up over GPT-2 that
the bound predicts, beside the measured one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2LMHeadModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_sfdlm  # noqa: E402
from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM  # noqa: E402
from hf_sfdlm.baselines import (TransformerDenoiserForDiffusionLM, count_parameters, matched_gpt2_config,  # noqa: E402
                                matched_transformer_denoiser_config)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GPT2_VOCAB = 50_257
MODEL = dict(hidden_size=128, fourier_intermediate_size=256, stage_depths=[1, 1])  # ~0.84M + embeddings
BACKBONE_PASSES = 32


def point(vocab, length, batch, dtype, steps, uniform_steps=None, also_bf16=False):
    """A grid point; `also_bf16` adds SFDLM absorbing and the backbone under bf16 autocast as contenders of a
    float32 point (bf16 against float32 in the same rounds)."""
    return dict(vocab=vocab, length=length, batch=batch, dtype=dtype, steps=steps,
                uniform_steps=steps if uniform_steps is None else uniform_steps, also_bf16=also_bf16)


GRIDS = {
    "quick": [point(2048, 256, 1, "float32", [8, 32]), point(2048, 256, 16, "float32", [32]),
              point(GPT2_VOCAB, 256, 1, "float32", [32])],
    # The grid, cut for one loaded CPU thread, the target shapes first: 128 steps at batch 1 only,
    # bf16 at 32 steps (not at L=1024, B=16), the GPT-2 vocabulary at the two target shapes; uniform not at
    # L=1024, B=16 nor at the GPT-2 vocabulary (its head and softmax over every position cost minutes there).
    "full": [
        point(2048, 256, 16, "float32", [8, 32]),
        point(2048, 1024, 1, "float32", [8, 32, 128], uniform_steps=[8, 32]),
        point(GPT2_VOCAB, 256, 16, "float32", [32], uniform_steps=[]),
        point(GPT2_VOCAB, 1024, 1, "float32", [32], uniform_steps=[]),
        point(2048, 256, 1, "float32", [8, 32, 128]),
        point(2048, 256, 16, "bfloat16", [32]),
        point(2048, 1024, 1, "bfloat16", [32]),
        point(2048, 256, 1, "bfloat16", [32]),
        point(2048, 1024, 16, "float32", [8, 32], uniform_steps=[]),
    ],
    # The target shapes only (batch 16 at L=256, batch 1 at L=1024, the GPT-2 vocabulary, bf16 at
    # batch 16), with both processes (uniform at the GPT-2 vocabulary at L=1024, B=1 only: at B=16 its head
    # over every position costs minutes per round): a re-measurement in ~15 minutes of one CPU thread.
    "targets": [
        point(2048, 256, 16, "float32", [8, 32, 128], uniform_steps=[8, 32]),
        point(2048, 1024, 1, "float32", [32]),
        point(GPT2_VOCAB, 256, 16, "float32", [32], uniform_steps=[]),
        point(GPT2_VOCAB, 1024, 1, "float32", [32]),
        point(2048, 256, 16, "bfloat16", [32]),
    ],
    # CPU bf16 autocast against float32, side by side in the same rounds (absorbing, 32 steps).
    "precision": [point(2048, length, batch, "float32", [32], uniform_steps=[], also_bf16=True)
                  for length, batch in ((256, 1), (256, 16), (1024, 1))],
}


def sfdlm_model(vocab: int, process: str, max_length: int) -> SFDLMForDiffusionLM:
    config = SFDLMConfig(vocab_size=vocab, **MODEL, pool_factors=[2] * (len(MODEL["stage_depths"]) - 1),
                         process=process, mask_token_id=vocab - 1 if process == "absorbing" else None,
                         noise_schedule="loglinear", num_timesteps=None,
                         time_conditioning=process == "uniform", max_position_embeddings=max_length)
    return SFDLMForDiffusionLM(config).eval()


class Models:
    """The three models of one vocabulary (built once, reused by every point of that vocabulary)."""

    def __init__(self, vocab: int, max_length: int, device: torch.device):
        self.absorbing = sfdlm_model(vocab, "absorbing", max_length).to(device)
        self.uniform = sfdlm_model(vocab, "uniform", max_length).to(device)
        target = count_parameters(self.uniform)
        self.gpt2 = GPT2LMHeadModel(matched_gpt2_config(target, vocab, MODEL["hidden_size"], max_length)).to(device).eval()
        self.vocab = vocab
        self.parameters = {name: count_parameters(getattr(self, name)) for name in ("absorbing", "uniform", "gpt2")}


def contenders(models: Models, p: dict, device: torch.device) -> dict:
    """name -> a function that runs it once and returns (forward passes per row, head positions per row)."""
    runs = dtype_contenders(models, p, device, p["dtype"])
    if p.get("also_bf16"):
        bf16 = dtype_contenders(models, p, device, "bfloat16")
        runs.update({name.replace("@", "-bf16@"): run for name, run in bf16.items()
                     if name.startswith(("sfdlm-absorbing", "backbone"))})
    return runs


def dtype_contenders(models: Models, p: dict, device: torch.device, dtype_name: str) -> dict:
    length, batch, dtype = p["length"], p["batch"], getattr(torch, dtype_name)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    compute_dtype = None if dtype == torch.float32 else dtype_name

    def gpt2():
        bos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        with torch.no_grad(), autocast:
            models.gpt2.generate(bos, max_new_tokens=length, min_new_tokens=length, do_sample=True, top_k=0,
                                 use_cache=True, pad_token_id=models.vocab - 1, eos_token_id=None)
        return float(length), float(length)

    def sfdlm(model, steps):
        def run():
            out = model.generate(None, max_new_tokens=length, num_return_sequences=batch, steps=steps,
                                 compute_dtype=compute_dtype, return_dict_in_generate=True,
                                 generator=torch.Generator().manual_seed(0))
            assert out.sequences.shape == (batch, length)
            return float(out.num_forward_passes.float().mean()), None
        return run

    ids = torch.randint(0, models.vocab - 1, (batch, length), device=device)

    def backbone():
        with torch.no_grad(), autocast:
            for _ in range(BACKBONE_PASSES):
                models.absorbing.model(ids)
        return float(BACKBONE_PASSES), 0.0

    runs = {"gpt2-kv": gpt2}
    runs.update({f"sfdlm-absorbing@{s}": sfdlm(models.absorbing, s) for s in p["steps"]})
    runs.update({f"sfdlm-uniform@{s}": sfdlm(models.uniform, s) for s in p["uniform_steps"]})
    runs[f"backbone@{BACKBONE_PASSES}"] = backbone
    return runs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runs: dict, repeats: int, device: torch.device) -> dict:
    """Per contender: wall times of `repeats` interleaved rounds (one warm-up round first, discarded)."""
    names = list(runs)
    times = {name: [] for name in names}
    passes = {}
    for round_index in range(repeats + 1):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            passes[name] = runs[name]()
            synchronize(device)
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: dict(times=times[name], passes=passes[name][0]) for name in names}


def records_for(p: dict, measured: dict) -> list[dict]:
    tokens = p["length"] * p["batch"]
    gpt2 = measured["gpt2-kv"]["times"]
    out = []
    for name, m in measured.items():
        model, _, steps = name.partition("@")
        ratios = [g / t for g, t in zip(gpt2, m["times"])]
        median = statistics.median(m["times"])
        out.append(dict(vocab=p["vocab"], length=p["length"], batch=p["batch"], dtype=p["dtype"], model=model,
                        steps=int(steps) if steps else None, seconds_median=median, seconds_min=min(m["times"]),
                        seconds_max=max(m["times"]), tokens_per_second=tokens / median,
                        speedup_vs_gpt2=statistics.median(ratios), speedup_min=min(ratios), speedup_max=max(ratios),
                        forward_passes_per_row=m["passes"], rounds=len(m["times"])))
    return out


def headline(records: list[dict]) -> dict:
    """The issue's targets: SFDLM's speed-up over GPT-2 + KV cache at 32 steps (median of rounds)."""
    out = {}
    for r in records:
        if r["steps"] == BACKBONE_PASSES and r["model"] != "gpt2-kv":
            out[f"{r['model']} V={r['vocab']} L={r['length']} B={r['batch']} {r['dtype']}"] = round(r["speedup_vs_gpt2"], 2)
    return out


# ---------------------------------------------------------------------------------------------------- block grid
BLOCK_SIZE = 16
# Model sizes of the block grid, per vocabulary. "realistic": hidden 512 and about 42M parameters at both
# vocabularies (the backbone is smaller at V = 50,257, whose tied embedding alone is 25.7M).
BLOCK_SIZES = {
    "toy": {2048: MODEL},
    "realistic": {10_000: dict(hidden_size=512, stage_depths=[3, 3], fourier_intermediate_size=1664),
                  GPT2_VOCAB: dict(hidden_size=512, stage_depths=[2, 2], fourier_intermediate_size=1024)},
}
# The machine probe: a sum over a float32 tensor of this many MiB (bytes read per second) and a square fp32
# matmul of this size (flops per second), each the median of `repeats` runs.
PROBE = dict(read_mib=256, matmul=1024, repeats=5)


def block_point(size: str, vocab: int, batch: int, steps: list[int], rounds: int, full_timed_steps: int | None,
                length: int = 1024, warmup_length: int = 2 * BLOCK_SIZE) -> dict:
    """A point of the block grid. `steps`: denoising steps per block; `rounds`: timed rounds (after one
    warm-up round at `warmup_length` tokens); `full_timed_steps`: None runs the full-canvas contender to the
    end, k stops it after its first k forward passes (one per step that unmasks something) and extrapolates."""
    if length < 1 or length % BLOCK_SIZE or warmup_length < 1 or warmup_length % BLOCK_SIZE:
        raise ValueError(f"`length` ({length}) and `warmup_length` ({warmup_length}) must be positive multiples of the "
                         f"block size {BLOCK_SIZE}.")
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"`steps` must be a non-empty list of positive integers, got {steps!r}.")
    if rounds < 1 or (full_timed_steps is not None and full_timed_steps < 1):
        raise ValueError(f"`rounds` ({rounds}) and `full_timed_steps` ({full_timed_steps}) must be >= 1 (or None).")
    return dict(size=size, vocab=vocab, length=length, batch=batch, dtype="float32", block_size=BLOCK_SIZE,
                steps=steps, rounds=rounds, full_timed_steps=full_timed_steps, warmup_length=warmup_length)


# Cut for ~35 minutes of one CPU thread beside two other single-thread jobs: the target shapes (batch 1) first,
# batch 16 at the realistic size with 2 steps per block only (each of its contenders costs about a minute a run).
GRIDS["block"] = [
    block_point("toy", 2048, 1, [2, 4, 8], rounds=3, full_timed_steps=None),
    block_point("realistic", GPT2_VOCAB, 1, [2, 4, 8], rounds=2, full_timed_steps=2),
    block_point("realistic", 10_000, 1, [2, 4, 8], rounds=2, full_timed_steps=2),
    block_point("toy", 2048, 16, [2, 4, 8], rounds=3, full_timed_steps=8),
    block_point("realistic", GPT2_VOCAB, 16, [2], rounds=1, full_timed_steps=1),
    block_point("realistic", 10_000, 16, [2], rounds=1, full_timed_steps=1),
]


def full_canvas_steps(length: int, block_size: int, steps_per_block: int) -> int:
    """Steps of the full-canvas run with the block setting's nominal tokens per forward pass, b / (S + 1)."""
    return -(-length * (steps_per_block + 1) // block_size)


def measure_machine(device: torch.device) -> dict:
    """This process's memory read bandwidth (GB/s, a sum over a large float32 tensor) and fp32 matmul rate
    (GFLOP/s, a square matmul), at the current thread count: the two roofs of `time_bound`."""
    x = torch.randn(PROBE["read_mib"] * 2 ** 18, device=device)
    a, b = (torch.randn(PROBE["matmul"], PROBE["matmul"], device=device) for _ in range(2))

    def rate(work, amount):
        work()
        seconds = []
        for _ in range(PROBE["repeats"]):
            synchronize(device)
            start = time.perf_counter()
            work()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        return amount / statistics.median(seconds) / 1e9

    return dict(bandwidth_gbs=rate(x.sum, 4 * x.numel()), peak_gflops=rate(lambda: a @ b, 2 * PROBE["matmul"] ** 3),
                threads=torch.get_num_threads(), probe=dict(PROBE))


def pass_time(params: int, positions: float, machine: dict, flop_params: float | None = None) -> tuple[float, float, float]:
    """(seconds, bytes, flops) of one pass of `positions` positions (all rows together) through `params` float32
    weights: the weights are read once (4 bytes each) and every position costs 2 flops per weight (per weight
    of `flop_params` where a position does not meet every weight, as in SFDLM's U-Net; default `params`)."""
    flop_params = params if flop_params is None else flop_params
    bytes_read, flops = 4.0 * params, 2.0 * flop_params * positions
    return max(bytes_read / (machine["bandwidth_gbs"] * 1e9), flops / (machine["peak_gflops"] * 1e9)), bytes_read, flops


def attention_time(sizes: dict, context: int, queries: int, batch: int, machine: dict) -> tuple[float, float, float]:
    """(seconds, bytes, flops) of attention to a cache of `context` float32 keys and values per row, in every
    layer: reads 2 x context x hidden numbers, computes 4 x queries x context x hidden flops."""
    bytes_read = 8.0 * sizes["layers"] * context * sizes["hidden"] * batch
    flops = 4.0 * sizes["layers"] * queries * context * sizes["hidden"] * batch
    return max(bytes_read / (machine["bandwidth_gbs"] * 1e9), flops / (machine["peak_gflops"] * 1e9)), bytes_read, flops


def time_bound(kind: str, sizes: dict, length: int, batch: int, machine: dict, steps: int | None = None,
               block_size: int | None = None) -> dict:
    """Roofline time of generating `length` tokens in each of `batch` rows: every pass costs
    max(bytes / bandwidth, flops / peak), summed over the passes (a lower bound up to the flop count, which
    takes 2 flops per weight per position).

    `sizes`: body (matmul weights besides the tied embedding/head), head (vocab x hidden), optionally
    body_flops_block / body_flops_full (the body's matmul flops per position / 2 of a block pass / a full-canvas
    pass, where they differ from body) and, for a model with a KV cache, layers (attention layers) and hidden.
    Per generated token of a row:

    - "ar" (GPT-2 + KV cache): one pass of one position per row through body and head, and attention to the
      row's cache (context 1..length): the weights are read once per token, one token-pass of compute.
    - "block" (b = `block_size`, S = `steps`): per block S denoising passes and one commit pass over b
      positions per row: the body's weights are read (S + 1) / b times per token and do S + 1 token-passes;
      the head runs at the unmasking positions only (absorbing), S passes of b / S positions a block, one
      token-pass per token. With `layers` (the Transformer denoiser) each pass also attends to the cache.
    - "full" (N = `steps` over the whole canvas): N passes over `length` positions per row through the body,
      the head at the length / N positions that unmask per step.

    Returns seconds, bytes, flops, the limit of each part ("bandwidth" or "compute") and the issue's per-token
    quantities (body weight reads and token-passes per generated token).
    """
    if kind not in ("ar", "block", "full"):
        raise ValueError(f"`kind` must be 'ar', 'block' or 'full', got {kind!r}.")
    if kind != "ar" and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"`steps` must be a positive integer for kind {kind!r}, got {steps!r}.")
    if kind == "block" and (not isinstance(block_size, int) or block_size < 1 or length % block_size):
        raise ValueError(f"`block_size` must be a positive divisor of length={length}, got {block_size!r}.")
    parts = {"body": [0.0, 0.0, 0.0], "head": [0.0, 0.0, 0.0], "attention": [0.0, 0.0, 0.0]}

    def add(part, cost, times=1):
        for i in range(3):
            parts[part][i] += times * cost[i]

    if kind == "ar":
        add("body", pass_time(sizes["body"], batch, machine), length)
        add("head", pass_time(sizes["head"], batch, machine), length)
        for context in range(1, length + 1):
            add("attention", attention_time(sizes, context, 1, batch, machine))
        reads, token_passes = 1.0, 1.0
    elif kind == "block":
        blocks = length // block_size
        add("body", pass_time(sizes["body"], batch * block_size, machine, sizes.get("body_flops_block")),
            blocks * (steps + 1))
        add("head", pass_time(sizes["head"], batch * block_size / steps, machine), blocks * steps)
        if sizes.get("layers"):
            for j in range(blocks):
                add("attention", attention_time(sizes, (j + 1) * block_size, block_size, batch, machine), steps + 1)
        reads, token_passes = (steps + 1) / block_size, float(steps + 1)
    else:
        add("body", pass_time(sizes["body"], batch * length, machine, sizes.get("body_flops_full")), steps)
        add("head", pass_time(sizes["head"], batch * length / steps, machine), steps)
        reads, token_passes = steps / length, float(steps)
    used = {name: p for name, p in parts.items() if p[0] > 0}
    limits = {name: ("bandwidth" if p[1] / (machine["bandwidth_gbs"] * 1e9) >= p[2] / (machine["peak_gflops"] * 1e9)
                     else "compute") for name, p in used.items()}
    dominant = max(used, key=lambda name: used[name][0])
    return dict(seconds=sum(p[0] for p in used.values()), bytes=sum(p[1] for p in used.values()),
                flops=sum(p[2] for p in used.values()), seconds_by_part={name: p[0] for name, p in used.items()},
                limits=limits, limit=limits[dominant], dominant_part=dominant,
                body_weight_reads_per_token=reads, body_token_passes_per_token=token_passes)


def matmul_weights_per_position(backbone, vocab: int, positions: int) -> float:
    """Matmul flops of one forward of `backbone` over one row of `positions` tokens, / 2 / positions (counted by
    torch's FlopCounterMode): the weights a position meets. Below the parameter count for SFDLM, whose pooled
    stage runs on fewer positions and whose Fourier MLP runs on the positions / 2 + 1 frequencies."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, vocab - 1, (1, positions), device=next(backbone.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(ids)
    return counter.get_total_flops() / (2 * positions)


def _sizes(model, vocab: int, hidden: int, layers: int = 0, lookup: int = 0) -> dict:
    """Body and head weights of a model with a tied vocab x hidden embedding (`lookup`: other table weights,
    such as GPT-2's positions, read by lookup, not by a matmul)."""
    total = count_parameters(model)
    return dict(total=total, body=total - vocab * hidden - lookup, head=vocab * hidden, layers=layers, hidden=hidden)


class BlockModels:
    """The four models of one (size, vocabulary) point of the block grid, random weights, no EOS."""

    def __init__(self, size: str, vocab: int, max_length: int, device: torch.device):
        if vocab not in BLOCK_SIZES.get(size, {}):
            raise ValueError(f"No {size!r} model of vocabulary {vocab} in BLOCK_SIZES (sizes and vocabularies: "
                             f"{ {name: sorted(specs) for name, specs in BLOCK_SIZES.items()} }).")
        spec = BLOCK_SIZES[size][vocab]
        hidden = spec["hidden_size"]
        common = dict(vocab_size=vocab, **spec, pool_factors=[2] * (len(spec["stage_depths"]) - 1),
                      process="absorbing", mask_token_id=vocab - 1, noise_schedule="loglinear", num_timesteps=None,
                      time_conditioning=False, max_position_embeddings=max_length)
        self.block = SFDLMForDiffusionLM(SFDLMConfig(block_size=BLOCK_SIZE, **common)).to(device).eval()
        self.full = SFDLMForDiffusionLM(SFDLMConfig(**common)).to(device).eval()
        self.full.load_state_dict(self.block.state_dict())  # the same weights (speed does not depend on them)
        target = count_parameters(self.block)
        gpt2_config = matched_gpt2_config(target, vocab, hidden, max_length)
        self.gpt2 = GPT2LMHeadModel(gpt2_config).to(device).eval()
        denoiser_config = matched_transformer_denoiser_config(
            target, vocab, hidden, max_length, block_size=BLOCK_SIZE, process="absorbing", mask_token_id=vocab - 1,
            noise_schedule="loglinear", num_timesteps=None, time_conditioning=False)
        self.transformer = TransformerDenoiserForDiffusionLM(denoiser_config).to(device).eval()
        self.vocab, self.spec = vocab, spec
        self.sizes = {
            "sfdlm": dict(_sizes(self.block, vocab, hidden),
                          body_flops_block=matmul_weights_per_position(self.block.model, vocab, BLOCK_SIZE),
                          body_flops_full=matmul_weights_per_position(self.full.model, vocab, max_length)),
            "gpt2": _sizes(self.gpt2, vocab, hidden, gpt2_config.n_layer, lookup=gpt2_config.n_positions * hidden),
            "transformer": _sizes(self.transformer, vocab, hidden, denoiser_config.num_hidden_layers),
        }
        for name, model in (("sfdlm", self.block), ("transformer", self.transformer)):
            eos = getattr(model.generation_config, "eos_token_id", None)
            if eos is not None:
                raise RuntimeError(f"The {name} model has eos_token_id={eos}: rows could stop early.")


class _StopTiming(Exception):
    """Raised inside `generate` when a truncated full-canvas run has made the forward passes it times."""


def expected_row_passes(length: int, steps: int, batch: int) -> float:
    """Expected forward passes, summed over `batch` rows, of the absorbing ancestral sampler on a fully masked
    canvas of `length` with `steps` steps of the uniform grid and the log-linear schedule (alpha = 1 - t):
    each position unmasks at a uniformly drawn step, and a row makes a pass at a step only if something of it
    unmasks there, so batch x N (1 - (1 - 1/N)^L)."""
    return batch * steps * (1.0 - (1.0 - 1.0 / steps) ** length)


@contextlib.contextmanager
def _truncated(model, passes_timed: int | None, counts: dict):
    """A context in which `model.generate` stops (by `_StopTiming`, swallowed here) before its forward pass
    number `passes_timed` + 1 (None: no limit); `counts` gets the passes and row-passes made."""
    counts.update(passes=0, rows=0)
    if passes_timed is None:
        yield
        return
    original = model.denoise

    def denoise(canvas, *args, **kwargs):
        if counts["passes"] == passes_timed:
            raise _StopTiming
        counts["passes"] += 1
        counts["rows"] += canvas.shape[0]
        return original(canvas, *args, **kwargs)

    model.denoise = denoise
    try:
        yield
    except _StopTiming:
        pass
    finally:
        del model.denoise


def block_contenders(models: BlockModels, p: dict, length: int, device: torch.device,
                     full_timed_steps: int | None) -> dict:
    """name -> a function that runs it once (generating `length` tokens per row) and returns what it did:
    forward passes per row, tokens per forward pass, generated tokens per row (the fewest of any row) and,
    for a truncated full-canvas run, the steps timed and the factor its time is multiplied by."""
    batch, size = p["batch"], p["block_size"]

    def gpt2():
        bos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        with torch.no_grad():
            out = models.gpt2.generate(bos, max_new_tokens=length, min_new_tokens=length, do_sample=True, top_k=0,
                                       use_cache=True, pad_token_id=models.vocab - 1, eos_token_id=None)
        return dict(passes=float(length), tokens_per_forward=1.0, generated=out.shape[1] - 1)

    def diffusion(model, steps, timed=None):
        def run():
            counts = {}
            with _truncated(model, timed, counts):
                out = model.generate(None, max_new_tokens=length, num_return_sequences=batch, steps=steps,
                                     return_dict_in_generate=True, generator=torch.Generator().manual_seed(0))
                assert out.sequences.shape == (batch, length)
                generated = (out.tokens_per_forward * out.num_forward_passes).round().long()
                return dict(passes=float(out.num_forward_passes.float().mean()),
                            tokens_per_forward=float(out.tokens_per_forward.float().mean()), generated=int(generated.min()))
            expected = expected_row_passes(length, steps, batch)
            return dict(passes=None, tokens_per_forward=None, generated=None, passes_timed=counts["passes"],
                        row_passes_timed=counts["rows"], expected_passes_per_row=expected / batch,
                        factor=expected / counts["rows"])
        return run

    runs = {"gpt2-kv": gpt2}
    for s in p["steps"]:
        runs[f"sfdlm-block{size}@{s}"] = diffusion(models.block, s)
    for s in p["steps"]:
        runs[f"transformer-block{size}@{s}"] = diffusion(models.transformer, s)
    for s in p["steps"]:
        full = full_canvas_steps(length, size, s)
        timed = full_timed_steps if full_timed_steps is not None and full_timed_steps < full else None
        runs[f"sfdlm-full@{full}"] = diffusion(models.full, full, timed)
    return runs


def measure_block(runs: dict, warmup: dict, rounds: int, device: torch.device) -> dict:
    """`measure` with a separate warm-up (each contender once at a short length, discarded) and extrapolated
    times: a truncated run's time is multiplied by its factor (the measured time is kept as well)."""
    for run in warmup.values():
        run()
    names = list(runs)
    out = {name: dict(times=[], measured=[], info=None) for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            info = runs[name]()
            synchronize(device)
            seconds = time.perf_counter() - start
            out[name]["measured"].append(seconds)
            out[name]["times"].append(seconds * info.get("factor", 1.0))
            out[name]["info"] = info
    return out


def _ratios(numerator: list, denominator: list) -> dict:
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))


def block_records_for(p: dict, measured: dict, models: BlockModels, machine: dict) -> list[dict]:
    """One record per contender: times, ratios (per round) to GPT-2 + KV and, for the block contenders, to the
    full canvas at the same tokens per forward pass; the roofline bound and the speed-up it predicts."""
    length, batch, size = p["length"], p["batch"], p["block_size"]
    gpt2_times = measured["gpt2-kv"]["times"]
    gpt2_bound = time_bound("ar", models.sizes["gpt2"], length, batch, machine)
    records = []
    for name, m in measured.items():
        model, _, steps = name.partition("@")
        steps = int(steps) if steps else None
        if model == "gpt2-kv":
            bound, family = gpt2_bound, "gpt2"
        elif model.startswith("sfdlm-full"):
            bound, family = time_bound("full", models.sizes["sfdlm"], length, batch, machine, steps), "sfdlm"
        else:
            family = "sfdlm" if model.startswith("sfdlm") else "transformer"
            bound = time_bound("block", models.sizes[family], length, batch, machine, steps, size)
        info, median = m["info"], statistics.median(m["times"])
        vs_gpt2 = _ratios(gpt2_times, m["times"])
        predicted = gpt2_bound["seconds"] / bound["seconds"]
        record = dict(size=p["size"], vocab=p["vocab"], length=length, batch=batch, dtype=p["dtype"], model=model,
                      steps=steps, block_size=size if "block" in model else None, parameters=models.sizes[family]["total"],
                      seconds_median=median, seconds_min=min(m["times"]), seconds_max=max(m["times"]),
                      tokens_per_second=length * batch / median, speedup_vs_gpt2=vs_gpt2["median"],
                      speedup_min=vs_gpt2["min"], speedup_max=vs_gpt2["max"], rounds=len(m["times"]),
                      forward_passes_per_row=info["passes"], tokens_per_forward=info["tokens_per_forward"],
                      generated_tokens_per_row=info["generated"], extrapolated="factor" in info,
                      bound=bound, predicted_speedup_vs_gpt2=predicted,
                      measured_over_predicted=vs_gpt2["median"] / predicted,
                      measured_over_bound_time=bound["seconds"] / median)
        if model.startswith("sfdlm-full"):
            record["tokens_per_forward_nominal"] = length / steps
        if record["extrapolated"]:
            record.update(passes_timed=info["passes_timed"], row_passes_timed=info["row_passes_timed"],
                          expected_passes_per_row=info["expected_passes_per_row"], seconds_measured=m["measured"],
                          seconds_per_pass=[t / info["passes_timed"] for t in m["measured"]],
                          extrapolation=f"time of the first {info['passes_timed']} forward passes of the {steps}-step "
                                        f"run x {info['factor']:.4g} (expected row-passes of the whole run / "
                                        "row-passes timed)")
        if "block" in model:
            full = f"sfdlm-full@{full_canvas_steps(length, size, steps)}"
            record["tokens_per_forward_nominal"] = size / (steps + 1)
            record["speedup_vs_full_canvas"] = dict(model=full, **_ratios(measured[full]["times"], m["times"]),
                                                    extrapolated="factor" in measured[full]["info"])
        records.append(record)
    return records


def block_headline(records: list[dict]) -> dict:
    """The issue's targets, per shape: block SFDLM (2 steps per block) against GPT-2 + KV and every block
    setting against the full canvas at the same tokens per forward pass (medians of per-round ratios)."""
    out = {}
    for r in records:
        if r["model"].startswith("sfdlm-block"):
            key = f"{r['size']} V={r['vocab']} B={r['batch']} {r['steps']} steps/block"
            out[key] = dict(vs_gpt2=round(r["speedup_vs_gpt2"], 2), bound_vs_gpt2=round(r["predicted_speedup_vs_gpt2"], 2),
                            vs_full_canvas=round(r["speedup_vs_full_canvas"]["median"], 1))
    return out


BLOCK_NOTES = [
    "Weights are random: speed does not depend on them; no model has an EOS id, so every row generates all L "
    "tokens (generated_tokens_per_row is checked from each run's output).",
    "CPU timings were taken with one thread beside two other single-thread benchmark jobs on a 2-core machine: "
    "only the ratios from the same interleaved rounds are meaningful, absolute times are depressed by the load.",
    "bound: roofline time of each contender from this process's bandwidth and fp32 matmul rate (measured before "
    "each point, `machine`): max(bytes / bandwidth, flops / peak) per pass, summed; every pass reads all its "
    "weights (4 bytes each); flops are 2 per weight per position for GPT-2 and the Transformer (plus attention "
    "to the KV cache, bandwidth-bound), and for SFDLM the matmul flops per position counted by torch's "
    "FlopCounterMode on one block / one full canvas (config.models: body_flops_block/full, about half the "
    "body's parameters: the pooled stage and the Fourier MLP's frequencies); FFTs and elementwise work are "
    "not counted. The head (vocab x hidden, tied) runs once per generated token in the absorbing samplers (at "
    "the unmasking positions) and once per token-step in GPT-2. predicted_speedup_vs_gpt2 = GPT-2's bound / "
    "the contender's bound; measured_over_bound_time = bound seconds / measured seconds.",
    "sfdlm-full@N: full-canvas SFDLM with N = L (S + 1) / b steps, the nominal tokens per forward pass of the "
    "block setting with S steps per block. Where \"extrapolated\" is true, running all N steps cost too much: "
    "the run was stopped after its first passes_timed forward passes (seconds_measured, seconds_per_pass) and "
    "its time multiplied by the expected row-passes of the whole run over the row-passes timed. The expectation, "
    "batch x N (1 - (1 - 1/N)^L) (each position unmasks at a uniform step of the log-linear schedule's grid; a "
    "row with nothing to unmask makes no pass), matches the passes counted in the non-extrapolated toy runs.",
    "Generative perplexity is not measured here (random weights make it meaningless): gen-PPL at each "
    "steps-per-block setting comes from the quality benchmark's trained models (`benchmarks/quality.py --study "
    "blocks`, whose generation table has b = 16 at 2 and 8 steps per block at the toy size).",
]


def plot_block(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["results"]
    keys = list(dict.fromkeys((r["size"], r["vocab"], r["batch"]) for r in records))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = [r for r in records if (r["size"], r["vocab"], r["batch"]) == key]
        for prefix, marker in (("sfdlm-block", "s"), ("transformer-block", "o"), ("sfdlm-full", "^")):
            series = sorted((r for r in rows if r["model"].startswith(prefix)), key=lambda r: r["seconds_median"])
            if not series:
                continue
            x = [r["steps"] if "block" in r["model"] else r["steps"] * BLOCK_SIZE // r["length"] - 1 for r in series]
            line = ax.errorbar(x, [r["speedup_vs_gpt2"] for r in series],
                               yerr=[[r["speedup_vs_gpt2"] - r["speedup_min"] for r in series],
                                     [r["speedup_max"] - r["speedup_vs_gpt2"] for r in series]],
                               fmt=marker, label=prefix, capsize=2)
            ax.scatter(x, [r["predicted_speedup_vs_gpt2"] for r in series], marker="_", s=200,
                       color=line[0].get_color(), label=f"{prefix} bound")
        ax.axhline(1.0, color="gray", linestyle=":", label="GPT-2 + KV cache")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("steps per block (full canvas: same tokens/forward)")
        ax.set_title(f"{key[0]}, V={key[1]}, B={key[2]}, L={rows[0]['length']}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("speed-up over GPT-2 + KV cache")
    axes[0, 0].legend(fontsize=5)
    fig.suptitle(f"Block diffusion sampling speed, {report['machine']['device']} ({report['machine']['torch_threads']} "
                 "thread(s)); markers: median of interleaved rounds (bars min-max), dashes: roofline bound", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_block_grid(grid: list[dict], report: dict, path: str, device: torch.device, rounds: int | None) -> dict:
    """Run the block grid's points, writing the JSON and PNG after every point."""
    started = time.perf_counter()
    report["notes"] = BLOCK_NOTES
    report["config"].update(block_sizes=BLOCK_SIZES, block_size=BLOCK_SIZE, models={})
    report["machine_probes"] = []
    max_length = max(p["length"] for p in grid)
    models = {}
    for p in grid:
        key = (p["size"], p["vocab"])
        if key not in models:
            models.clear()  # one point's models at a time
            models[key] = BlockModels(p["size"], p["vocab"], max_length, device)
            entry = {name: dict(s) for name, s in models[key].sizes.items()}
            report["config"]["models"][f"{p['size']} V={p['vocab']}"] = entry
            print(f"{p['size']} V={p['vocab']}: parameters " + ", ".join(
                f"{name} {s['total'] / 1e6:.2f}M (body {s['body'] / 1e6:.2f}M, head {s['head'] / 1e6:.2f}M)"
                for name, s in entry.items()), flush=True)
        machine = measure_machine(device)
        report["machine_probes"].append(dict(point=dict(p), **machine))
        print(f"machine: {machine['bandwidth_gbs']:.1f} GB/s read, {machine['peak_gflops']:.1f} GFLOP/s fp32 matmul "
              f"({machine['threads']} thread(s))", flush=True)
        runs = block_contenders(models[key], p, p["length"], device, p["full_timed_steps"])
        warmup = block_contenders(models[key], p, p["warmup_length"], device, 1)
        measured = measure_block(runs, warmup, rounds or p["rounds"], device)
        records = block_records_for(p, measured, models[key], machine)
        for r in records:
            r["machine"] = machine
            extra = f"  x{r['speedup_vs_full_canvas']['median']:.1f} vs full" if "speedup_vs_full_canvas" in r else ""
            print(f"{r['size']:9s} V={r['vocab']:6d} B={r['batch']:3d} {r['model']:20s} steps={r['steps'] or '':>4} "
                  f"{r['seconds_median']:8.2f}s{' (extrapolated)' if r['extrapolated'] else ''} "
                  f"x{r['speedup_vs_gpt2']:.2f} [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] vs gpt2-kv, "
                  f"bound x{r['predicted_speedup_vs_gpt2']:.2f} ({r['bound']['limit']}-bound, "
                  f"{r['bound']['seconds']:.2f}s){extra}", flush=True)
        report["results"] += records
        report["wall_seconds"] = time.perf_counter() - started
        report["headline"] = block_headline(report["results"])
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        plot_block(report, path.replace(".json", ".png"))
    print(f"wrote {path} ({report['wall_seconds']:.0f}s)")
    return report


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["results"]
    keys = sorted({(r["vocab"], r["length"], r["batch"], r["dtype"]) for r in records})
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        rows = [r for r in records if (r["vocab"], r["length"], r["batch"], r["dtype"]) == key]
        for model, style in (("sfdlm-absorbing", "s-"), ("sfdlm-uniform", "o-")):
            series = sorted((r for r in rows if r["model"] == model), key=lambda r: r["steps"])
            ax.errorbar([r["steps"] for r in series], [r["speedup_vs_gpt2"] for r in series],
                        yerr=[[r["speedup_vs_gpt2"] - r["speedup_min"] for r in series],
                              [r["speedup_max"] - r["speedup_vs_gpt2"] for r in series]], fmt=style, label=model,
                        capsize=2)
        limit = next(r for r in rows if r["model"] == "backbone")
        ax.scatter([BACKBONE_PASSES], [limit["speedup_vs_gpt2"]], marker="*", color="k", zorder=3,
                   label=f"backbone only ({BACKBONE_PASSES} passes)")
        ax.axhline(1.0, color="gray", linestyle=":", label="GPT-2 + KV cache")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("denoising steps")
        ax.set_title(f"V={key[0]}, L={key[1]}, B={key[2]}, {key[3]}", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("speed-up over GPT-2 + KV cache")
    axes[0, 0].legend(fontsize=6)
    machine = report["machine"]
    fig.suptitle(f"Sampling speed, {machine['device']} ({machine['torch_threads']} threads); median of "
                 f"{report['config']['repeats']} interleaved rounds, bars min-max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="quick")
    parser.add_argument("--quick", action="store_const", const="quick", dest="grid", help="same as --grid quick")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per point after one warm-up round (default 5; the block grid: each point's own)")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="run only these points of the grid (indices, in this order)")
    parser.add_argument("--tag", default=None, help="suffix of the output file names")
    parser.add_argument("--output", default=None, help="JSON path (the PNG goes next to it)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    repeats = 5 if args.repeats is None else args.repeats
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = GRIDS[args.grid] if args.only is None else [GRIDS[args.grid][i] for i in args.only]
    os.makedirs(RESULTS, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    path = args.output or os.path.join(RESULTS, f"sampling_speed_{args.grid}_{device.type}{tag}.json")
    max_length = max(p["length"] for p in grid)
    report = dict(
        benchmark="sampling_speed",
        command="python benchmarks/sampling_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
                     torch_threads=torch.get_num_threads(), device=str(device),
                     device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                     load_average_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=transformers.__version__, hf_sfdlm=hf_sfdlm.__version__),
        config=dict(grid=args.grid, repeats=repeats if args.grid != "block" else args.repeats, model=MODEL,
                    points=grid, parameters={}),
        results=[],
    )
    if args.grid == "block":
        return run_block_grid(grid, report, path, device, args.repeats)
    started = time.perf_counter()
    models: dict[int, Models] = {}
    for p in grid:
        if p["vocab"] not in models:
            models.clear()  # one vocabulary's models at a time
            models[p["vocab"]] = Models(p["vocab"], max_length, device)
            report["config"]["parameters"][str(p["vocab"])] = models[p["vocab"]].parameters
        measured = measure(contenders(models[p["vocab"]], p, device), repeats, device)
        records = records_for(p, measured)
        report["results"] += records
        for r in records:
            print(f"V={r['vocab']:6d} L={r['length']:5d} B={r['batch']:3d} {r['dtype']:9s} {r['model']:16s} "
                  f"steps={r['steps'] or '':>4} {r['seconds_median']:8.3f}s [{r['seconds_min']:.3f}-{r['seconds_max']:.3f}] "
                  f"x{r['speedup_vs_gpt2']:.2f} [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] "
                  f"passes/row {r['forward_passes_per_row']:.1f}", flush=True)
        report["wall_seconds"] = time.perf_counter() - started
        report["headline"] = headline(report["results"])
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        plot(report, path.replace(".json", ".png"))
    print(f"wrote {path} ({report['wall_seconds']:.0f}s); speed-up over gpt2-kv at 32 steps: {report['headline']}")
    return report


if __name__ == "__main__":
    main()
