"""Forward+backward time and peak memory against sequence length: SFDLM vs a Transformer encoder.

Both models have the same width and number of blocks; the Transformer is transformers' `BertModel`
with SDPA attention. Each (model, length) point runs in a fresh subprocess so its peak memory (peak
RSS on CPU, `max_memory_allocated` on GPU) is its own; the two models alternate at every length.

    python benchmarks/forward_scaling.py                      # CPU: 256 .. 16K
    python benchmarks/forward_scaling.py --device cuda --max-length 65536 --dtype bfloat16

Writes benchmarks/results/forward_scaling[_<device>].json and a log-log PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, median_seconds, write_json  # noqa: E402


def build(kind: str, hidden: int, blocks: int, max_length: int):
    if kind == "sfdlm":
        from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM

        # a U-Net of `blocks` blocks without pooling: down (b/3), bottleneck (b/3), up (b/3)
        third = max(1, blocks // 3)
        config = SFDLMConfig(vocab_size=1024, hidden_size=hidden, stage_depths=[third, third],
                             fourier_intermediate_size=4 * hidden, ssm_state_size=32,
                             max_position_embeddings=max_length)
        return SFDLMForDiffusionLM(config).model
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1024, hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=hidden // 64,
                        intermediate_size=4 * hidden, max_position_embeddings=max_length)
    return BertModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)


def measure_point(kind: str, length: int, args) -> dict:
    """Run inside a fresh process: time forward+backward at one length and record its peak memory."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(kind, args.hidden, args.blocks, args.max_length).to(device)
    ids = torch.randint(0, 1024, (args.batch, length), device=device)
    timesteps = torch.rand(args.batch, device=device)
    dtype = getattr(torch, args.dtype)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(ids, timesteps=timesteps) if kind == "sfdlm" else model(ids)
        out.last_hidden_state.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, repeats=args.repeats, warmup=1)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux; the growth during the steps is the activations' peak
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    return {"model": kind, "length": length, "seconds": seconds, "tokens_per_second": args.batch * length / seconds,
            "peak_memory_mib": peak, "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--min-length", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-after-seconds", type=float, default=120.0,
                        help="stop growing a model's length once one point took longer than this")
    parser.add_argument("--tag", default="", help="suffix of the output files, to keep several runs")
    parser.add_argument("--point", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args)))
        return

    lengths, length = [], args.min_length
    while length <= args.max_length:
        lengths.append(length)
        length *= 2
    points, stopped = [], set()
    for length in lengths:
        for kind in ("sfdlm", "transformer"):  # alternate so drift on a shared machine hits both
            if kind in stopped:
                continue
            command = [sys.executable, __file__, "--point", kind, str(length)] + [
                f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                if name not in ("point", "tag") and value is not None]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"{kind} at {length}: failed ({result.stderr.strip().splitlines()[-1:]})", flush=True)
                stopped.add(kind)
                continue
            point = json.loads(result.stdout.strip().splitlines()[-1])
            points.append(point)
            print(f"{kind:12s} L={length:6d}  {point['seconds'] * 1e3:9.1f} ms  {point['peak_memory_mib']:8.1f} MiB",
                  flush=True)
            if point["seconds"] > args.skip_after_seconds:
                stopped.add(kind)

    ratios = []
    for length in lengths:
        pair = {p["model"]: p for p in points if p["length"] == length}
        if len(pair) == 2:
            ratios.append({"length": length,
                           "transformer_over_sfdlm_time": pair["transformer"]["seconds"] / pair["sfdlm"]["seconds"],
                           "transformer_over_sfdlm_memory":
                               pair["transformer"]["peak_memory_mib"] / max(pair["sfdlm"]["peak_memory_mib"], 1e-9)})
    suffix = ("" if args.device == "cpu" else f"_{args.device}") + (f"_{args.tag}" if args.tag else "")
    settings = {k: v for k, v in vars(args).items() if k != "point"}
    command = "python " + " ".join(["benchmarks/forward_scaling.py"] + sys.argv[1:])
    path = write_json(f"forward_scaling{suffix}", {"command": command, "settings": settings, "points": points,
                                                   "ratios": ratios})
    plot(points, RESULTS_DIR / f"forward_scaling{suffix}.png", args)
    print(f"wrote {path}")


def plot(points, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for kind, label in (("sfdlm", "SFDLM (SSM + Fourier MLP)"), ("transformer", "Transformer (BERT, SDPA)")):
        series = sorted((p for p in points if p["model"] == kind), key=lambda p: p["length"])
        if not series:
            continue
        lengths = [p["length"] for p in series]
        left.loglog(lengths, [p["seconds"] for p in series], "o-", label=label, base=2)
        right.loglog(lengths, [max(p["peak_memory_mib"], 1e-3) for p in series], "o-", label=label, base=2)
    left.set(xlabel="sequence length", ylabel="forward+backward seconds", title="time")
    right.set(xlabel="sequence length", ylabel="peak memory growth (MiB)", title="memory")
    for axis in (left, right):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"{args.device}, {args.dtype}, hidden {args.hidden}, {args.blocks} blocks, batch {args.batch}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
