"""Sampling speed: SFDLM's iterative denoising against GPT-2 sampling with its KV cache.

For every canvas length L, batch size B and number of denoising steps, measures generated tokens per
second and network forward passes per row of

    sfdlm-uniform     SFDLM, uniform process (the paper's), noise-conditioned, sampler "uniform" (Duo's
                      greedy last step): one forward pass of the whole canvas per step
    sfdlm-absorbing   SFDLM, absorbing process, not noise-conditioned, sampler "ancestral" with MDLM's
                      cache (a step that changes nothing costs no forward pass)
    gpt2-kv           GPT2LMHeadModel of about the same parameter count, `generate(use_cache=True)`,
                      multinomial sampling, L tokens one at a time

side by side in one process (GPT-2 is timed before and after each SFDLM sweep of a shape; the faster
of the two is used), and the ratio of SFDLM's to GPT-2's tokens/s. Weights are random: speed does not
depend on them (all models generate the full length: no EOS). Writes
benchmarks/results/sampling_speed_<grid>_<device>.json and .png.

    python benchmarks/sampling_speed.py                       # quick CPU grid, a few minutes on 2 cores
    python benchmarks/sampling_speed.py --grid full           # steps 8..1024, L 256/1024, B 1/16 (GPU)
    python benchmarks/sampling_speed.py --grid full --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

FULL_STEPS = [8, 16, 32, 64, 128, 256, 512, 1024]
GRIDS = {
    # ~1.1M-parameter models over a 2048-id vocabulary; (length, batch, steps) points sized so the sweep
    # takes a few minutes on 2 shared CPU cores.
    "quick": dict(hidden_size=128, fourier_intermediate_size=256, stage_depths=[1, 1], vocab_size=2048,
                  points=[(256, 1, [8, 32, 128]), (256, 16, [8, 32]), (1024, 1, [8, 32])]),
    # the full grid (steps 8..1024, L 256/1024, B 1/16): ~7M parameters, 4096 ids; for a GPU.
    "full": dict(hidden_size=256, fourier_intermediate_size=512, stage_depths=[2, 2], vocab_size=4096,
                 points=[(length, batch, FULL_STEPS) for length in (256, 1024) for batch in (1, 16)]),
}


def sfdlm_model(grid: dict, process: str, max_length: int) -> SFDLMForDiffusionLM:
    config = SFDLMConfig(vocab_size=grid["vocab_size"], hidden_size=grid["hidden_size"],
                         fourier_intermediate_size=grid["fourier_intermediate_size"],
                         stage_depths=grid["stage_depths"], pool_factors=[2] * (len(grid["stage_depths"]) - 1),
                         process=process, mask_token_id=grid["vocab_size"] - 1 if process == "absorbing" else None,
                         noise_schedule="loglinear", num_timesteps=None,
                         time_conditioning=process == "uniform", max_position_embeddings=max_length)
    return SFDLMForDiffusionLM(config).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` runs and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def run(args: argparse.Namespace) -> dict:
    grid = dict(GRIDS[args.grid])
    if args.steps:
        grid["points"] = [(length, batch, args.steps) for length, batch, _ in grid["points"]]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    max_length = max(length for length, _, _ in grid["points"])
    models = {name: sfdlm_model(grid, process, max_length).to(device)
              for name, process in (("sfdlm-uniform", "uniform"), ("sfdlm-absorbing", "absorbing"))}
    target = count_parameters(models["sfdlm-uniform"])
    gpt2 = GPT2LMHeadModel(matched_gpt2_config(target, grid["vocab_size"], grid["hidden_size"], max_length)).to(device).eval()
    parameters = {name: count_parameters(model) for name, model in {**models, "gpt2-kv": gpt2}.items()}
    print(f"parameters: {parameters}; device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}",
          flush=True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def gpt2_run(length, batch):
        bos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        with torch.no_grad(), autocast:
            return gpt2.generate(bos, max_new_tokens=length, min_new_tokens=length, do_sample=True, top_k=0,
                                 use_cache=True, pad_token_id=grid["vocab_size"] - 1, eos_token_id=None)

    def sfdlm_run(model, length, batch, steps):
        with autocast:
            return model.generate(None, max_new_tokens=length, num_return_sequences=batch, steps=steps,
                                  return_dict_in_generate=True, generator=torch.Generator().manual_seed(0))

    records = []
    started = time.perf_counter()
    gpt2_run(8, 1)  # warm-up: first calls allocate and dispatch slowly
    for model in models.values():
        sfdlm_run(model, 8, 1, 2)
    for length, batch, steps_list in grid["points"]:
        tokens = length * batch
        gpt2_times = [timed(lambda: gpt2_run(length, batch), device, args.repeats)[0]]
        for steps in steps_list:
            for name, model in models.items():
                seconds, out = timed(lambda: sfdlm_run(model, length, batch, steps), device, args.repeats)
                assert out.sequences.shape == (batch, length)
                records.append(dict(model=name, length=length, batch=batch, steps=steps, seconds=seconds,
                                    tokens_per_second=tokens / seconds,
                                    forward_passes=float(out.num_forward_passes.float().mean())))
                print(f"L={length:5d} B={batch:3d} steps={steps:5d} {name:16s} {seconds:8.3f}s "
                      f"{tokens / seconds:10.1f} tok/s  passes/row {records[-1]['forward_passes']:.1f}", flush=True)
        gpt2_times.append(timed(lambda: gpt2_run(length, batch), device, args.repeats)[0])
        seconds = min(gpt2_times)
        records.append(dict(model="gpt2-kv", length=length, batch=batch, steps=None, seconds=seconds,
                            tokens_per_second=tokens / seconds, forward_passes=float(length),
                            seconds_before_after=gpt2_times))
        print(f"L={length:5d} B={batch:3d} {'':11s} gpt2-kv          {seconds:8.3f}s {tokens / seconds:10.1f} tok/s "
              f"(before/after: {gpt2_times[0]:.2f}s / {gpt2_times[1]:.2f}s)", flush=True)
        for record in records:
            if record["length"] == length and record["batch"] == batch and record["model"] != "gpt2-kv":
                record["speedup_vs_gpt2"] = record["tokens_per_second"] * seconds / tokens

    return dict(
        benchmark="sampling_speed",
        command="python benchmarks/sampling_speed.py " + " ".join(sys.argv[1:]),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
                     torch_threads=torch.get_num_threads(), device=str(device),
                     device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
                     load_average=os.getloadavg() if hasattr(os, "getloadavg") else None),
        versions=dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                      hf_sfdlm=hf_sfdlm.__version__),
        config=dict(grid=args.grid, dtype=args.dtype, repeats=args.repeats, parameters=parameters,
                    sfdlm=models["sfdlm-uniform"].config.to_diff_dict(), gpt2=gpt2.config.to_diff_dict(), **grid),
        wall_seconds=time.perf_counter() - started,
        results=records,
        headline=headline(records),
    )


def headline(records: list[dict]) -> dict:
    """SFDLM's speedup over GPT-2 with its KV cache at 16-32 steps (the SEDD paper's comparison)."""
    out = {}
    for record in records:
        if record["model"] != "gpt2-kv" and record["steps"] in (16, 32):
            key = f"{record['model']} L={record['length']} B={record['batch']} steps={record['steps']}"
            out[key] = round(record["speedup_vs_gpt2"], 2)
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["results"]
    shapes = sorted({(r["length"], r["batch"]) for r in records})
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7), squeeze=False)
    styles = {"sfdlm-uniform": "o-", "sfdlm-absorbing": "s--"}
    for col, (length, batch) in enumerate(shapes):
        top, bottom = axes[0, col], axes[1, col]
        ar = next(r for r in records if r["model"] == "gpt2-kv" and (r["length"], r["batch"]) == (length, batch))
        for name, style in styles.items():
            rows = sorted((r for r in records if r["model"] == name and (r["length"], r["batch"]) == (length, batch)),
                          key=lambda r: r["steps"])
            steps = [r["steps"] for r in rows]
            top.plot(steps, [r["tokens_per_second"] for r in rows], style, label=name)
            bottom.plot(steps, [r["forward_passes"] for r in rows], style, label=name)
        top.axhline(ar["tokens_per_second"], color="k", linestyle=":", label="gpt2-kv")
        bottom.axhline(ar["forward_passes"], color="k", linestyle=":", label="gpt2-kv (L passes)")
        top.set_title(f"L={length}, batch={batch}")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("denoising steps")
            ax.grid(alpha=0.3)
        top.set_ylabel("generated tokens / s")
        bottom.set_ylabel("forward passes per row")
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"Sampling speed on {machine['device']} ({machine['device_name']}, {machine['torch_threads']} threads), "
                 f"{report['config']['dtype']}; params {report['config']['parameters']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="quick",
                        help="quick: CPU-sized (default); full: steps 8..1024, L 256/1024, B 1/16")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="override the grid's steps")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="autocast dtype (bfloat16 on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point (the best is kept)")
    parser.add_argument("--output", default=None, help="JSON path (the PNG goes next to it)")
    args = parser.parse_args(argv)
    report = run(args)
    os.makedirs(RESULTS, exist_ok=True)
    path = args.output or os.path.join(RESULTS, f"sampling_speed_{args.grid}_{report['machine']['device'].split(':')[0]}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, path.replace(".json", ".png"))
    print(f"wrote {path} ({report['wall_seconds']:.0f}s); speedup vs gpt2-kv at 16-32 steps: {report['headline']}")
    return report


if __name__ == "__main__":
    main()
