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
from hf_sfdlm.baselines import count_parameters, matched_gpt2_config  # noqa: E402

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
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per point after one warm-up round")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="run only these points of the grid (indices, in this order)")
    parser.add_argument("--tag", default=None, help="suffix of the output file names")
    parser.add_argument("--output", default=None, help="JSON path (the PNG goes next to it)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
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
        config=dict(grid=args.grid, repeats=args.repeats, model=MODEL, points=grid, parameters={}),
        results=[],
    )
    started = time.perf_counter()
    models: dict[int, Models] = {}
    for p in grid:
        if p["vocab"] not in models:
            models.clear()  # one vocabulary's models at a time
            models[p["vocab"]] = Models(p["vocab"], max_length, device)
            report["config"]["parameters"][str(p["vocab"])] = models[p["vocab"]].parameters
        measured = measure(contenders(models[p["vocab"]], p, device), args.repeats, device)
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
