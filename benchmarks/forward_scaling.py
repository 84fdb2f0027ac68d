"""Forward and forward+backward time, peak memory and achieved FLOP/s against sequence length.

Contenders (benchmarks/contenders.py, parameter-matched, dropout 0, flash SDPA): the SFDLM backbone
(also with per-block activation checkpointing, `sfdlm+ckpt`), a BERT encoder and an MDLM-style DiT.
Rows: float32 and bf16 autocast; "train" = forward+backward in train mode, "eval" = forward only in
eval mode under `torch.inference_mode()`.

Protocol. One worker process per (length, dtype) holds every contender. It measures the machine's float32
matmul peak (a 2048^3 matmul, best of 3) right there, runs one warm-up step per model and mode
(discarded), then `--repeats` rounds, each timing one step of every model, the order rotating between
rounds, then one memory step per model (below; it also records the bytes autograd saves for the backward
pass, via `saved_tensors_hooks`: the activation memory per token); medians and [min, max] are reported.
After each forward+backward every parameter's version is bumped, untimed, as an optimiser step's update
would, so the SSM's kernel cache misses as in training. Times are the process's CPU time
(`time.process_time`, one intra-op thread): the machine is shared by several users on 2 cores, where wall
time measures the neighbours as much as the model (the median wall time is recorded too, as
`wall_seconds`). Peak memory of a step is the peak of the tensor memory alive during it (activations,
temporaries and gradients; `common.PeakTensorMemory`, a dispatch mode that follows every operator's output
until it is freed), so each model's figure is its own whatever the allocator or the other models in the
process hold. Beside it, `resident_growth_mib` counts what the process really holds: in a fresh spawned
process per model and point, after one warm-up step, the peak resident set during one step minus the
resident set before it (Linux's resettable high-water mark; allocator slack, FFT plans and library buffers
that the tensor counter cannot see included; `--no-resident` skips it). FLOPs are counted on a meta-device
copy (torch's FlopCounterMode for matmuls and attention, plus 2.5 n log2 n per real FFT of size n);
achieved FLOP/s = FLOPs / median time.

Budget: a contender is skipped at a length when its forward+backward at the previous length, scaled by
the length ratio squared (Transformers) or to the power 1.2 (SFDLM), would exceed --max-step-seconds.
From --long-from on, one repeat is timed, the warm-up runs at 4096 tokens (a full-length warm-up
would double the cost of the longest points) and memory is measured during the timed step. Every thread count is 1 (`--threads`).

    python benchmarks/forward_scaling.py                    # CPU, 256 .. 64K (the committed run)
    python benchmarks/forward_scaling.py --lengths 256 1024 --repeats 2 --tag quick

Writes benchmarks/results/forward_scaling[_<tag>].json and a log-log PNG beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import contenders  # noqa: E402
from common import PeakTensorMemory, as_after_an_optimiser_step, write_json  # noqa: E402

GROWTH = {"sfdlm": 1.2, "sfdlm+ckpt": 1.2, "bert": 2.0, "dit": 2.0}
LABELS = {"sfdlm": "SFDLM", "sfdlm+ckpt": "SFDLM + activation checkpointing", "bert": "BERT (SDPA flash)",
          "dit": "DiT / MDLM (SDPA flash, rotary)"}


# ---------------------------------------------------------------------------------------------- worker
def matmul_peak_gflops(dtype=torch.float32, size: int = 2048, tries: int = 3) -> float:
    """Best float32 GFLOP/s of a size^3 matmul, in CPU time, as the model steps are measured."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(tries):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * size**3 / best / 1e9


def _proc_status_mib(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident set now; VmHWM: its peak since the last reset), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def _resident_growth_worker(queue, name: str, mode: str, settings: dict) -> None:
    """In a fresh process: build one contender, run one warm-up step (at most 4096 tokens, as the timed
    workers do: it loads code paths, thread pools, FFT plans and primes the allocator), reset the kernel's
    resident-set high-water mark (Linux `/proc/self/clear_refs`), then report the peak resident set during
    one step at the real length minus the resident set just before it, in MiB: what one more training (or
    inference) step makes the process hold, including what the tensor counter cannot see (allocator slack,
    library buffers). Gradient buffers are allocated by the warm-up and kept, as in training."""
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(0)
    length, dtype = settings["length"], getattr(torch, settings["dtype"])
    kind = name.split("+")[0]
    model = contenders.build(kind, settings["hidden"], settings["blocks"], max(length, 4096)).train(mode == "train")
    if name.endswith("+ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, contenders.VOCAB, (settings["batch"], length))
    timesteps = torch.rand(settings["batch"])

    def step(tokens: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if mode == "eval":
                with torch.inference_mode():
                    contenders.forward(kind, model, tokens, timesteps)
            else:
                contenders.forward(kind, model, tokens, timesteps).float().square().mean().backward()
                model.zero_grad(set_to_none=False)  # gradient buffers stay, as in training

    step(ids[:, :4096])
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    before = _proc_status_mib("VmRSS")
    step(ids)
    queue.put(_proc_status_mib("VmHWM") - before)


def resident_growth_mib(name: str, mode: str, args) -> float | None:
    """`_resident_growth_worker` in a spawned process (None where it fails: out of memory, not Linux)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    settings = {key: getattr(args, key) for key in ("length", "dtype", "hidden", "blocks", "batch", "threads")}
    worker = context.Process(target=_resident_growth_worker, args=(queue, name, mode, settings))
    worker.start()
    worker.join()
    return queue.get() if worker.exitcode == 0 and not queue.empty() else None


def run_worker(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    length, dtype = args.length, getattr(torch, args.dtype)
    torch.manual_seed(0)
    models = {}
    for name in args.models:
        model = contenders.build(name.split("+")[0], args.hidden, args.blocks, max(length, 4096))
        if name.endswith("+ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        models[name] = model
    ids = torch.randint(0, contenders.VOCAB, (args.batch, length))
    timesteps = torch.rand(args.batch)
    long = length >= args.long_from
    repeats = 1 if long else args.repeats
    peak = matmul_peak_gflops()

    def step(name: str, mode: str, tokens: torch.Tensor = ids, saved: dict | None = None) -> tuple[float, float]:
        """(CPU seconds, wall seconds) of one step."""
        model, kind = models[name], name.split("+")[0]
        start, wall = time.process_time(), time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if mode == "eval":
                with torch.inference_mode():
                    contenders.forward(kind, model, tokens, timesteps)
            else:
                hooks = (torch.autograd.graph.saved_tensors_hooks(_recorder(saved), lambda t: t)
                         if saved is not None else contextlib.nullcontext())
                with hooks:
                    out = contenders.forward(kind, model, tokens, timesteps)
                out.float().square().mean().backward()
                model.zero_grad(set_to_none=True)
        seconds = time.process_time() - start, time.perf_counter() - wall
        if mode == "train":
            as_after_an_optimiser_step(model)  # untimed: the next step recomputes what a training step would
        return seconds

    points = []
    for mode in args.modes:
        if mode == "eval" and length > args.eval_max_length:
            continue
        names = [n for n in models if not (mode == "eval" and n.endswith("+ckpt"))]
        for name in names:
            models[name].train(mode == "train")
        for name in names:  # warm-up, discarded
            step(name, mode, ids[:, :4096] if long else ids)
        times, walls = {n: [] for n in names}, {n: [] for n in names}
        memory, saved_bytes = {}, {}
        for round_ in range(repeats):
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                with PeakTensorMemory() if long else contextlib.nullcontext() as tracker:
                    cpu, wall = step(name, mode)  # long: the one timed step also measures memory
                times[name].append(cpu)
                walls[name].append(wall)
                if long:
                    memory[name] = tracker.peak_mib
        if not long:  # memory pass: one more step per model, autograd's saved tensors recorded too
            for name in names:
                saved = {} if mode == "train" and not name.endswith("+ckpt") else None
                with PeakTensorMemory() as tracker:
                    step(name, mode, ids, saved)
                memory[name] = tracker.peak_mib
                if saved is not None:
                    saved_bytes[name] = sum(saved.values())
        resident = {name: resident_growth_mib(name, mode, args) for name in names} if args.resident else {}
        for name in names:
            kind = name.split("+")[0]
            flops = contenders.count_flops(kind, models[name], args.batch, length, backward=mode == "train")
            median = statistics.median(times[name])
            point = {"model": name, "length": length, "dtype": args.dtype, "mode": mode,
                     "seconds": median, "seconds_min": min(times[name]), "seconds_max": max(times[name]),
                     "repeats": len(times[name]), "wall_seconds": statistics.median(walls[name]), "tokens_per_second": args.batch * length / median,
                     "peak_memory_mib": memory[name], "resident_growth_mib": resident.get(name),
                     "flops": flops["total"], "fft_flops": flops["fft"],
                     "achieved_gflops": flops["total"] / median / 1e9, "matmul_peak_gflops": peak,
                     "fraction_of_peak": flops["total"] / median / 1e9 / peak,
                     "parameters": contenders.count_parameters(models[name]),
                     "architecture": contenders.describe(kind, models[name])}
            if name in saved_bytes:
                point["saved_activation_kib_per_token"] = saved_bytes[name] / 1024 / (args.batch * length)
            points.append(point)
    return points


def _recorder(saved: dict):
    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()  # views of one storage count once
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor
    return pack


# ---------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[256, 1024, 4096, 16384, 65536])
    parser.add_argument("--models", nargs="+", default=["sfdlm", "sfdlm+ckpt", "bert", "dit"],
                        choices=list(LABELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--bf16-max-length", type=int, default=1024, help="bf16 rows up to this length")
    parser.add_argument("--eval-max-length", type=int, default=16384, help="forward-only rows up to this length")
    parser.add_argument("--ckpt-max-length", type=int, default=4096, help="sfdlm+ckpt up to this length")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--long-from", type=int, default=16384,
                        help="from this length on: one timed repeat, warm-up at 4096 tokens")
    parser.add_argument("--max-step-seconds", type=float, default=150.0,
                        help="skip a model at a length where its predicted forward+backward CPU time exceeds this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resident", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure resident-memory growth, one fresh process per model and point")
    parser.add_argument("--tag", default="")
    parser.add_argument("--resummarise", type=Path, help="recompute the summary of a written JSON and exit")
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)  # internal: one worker
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.resummarise:
        resummarise(args.resummarise)
        return 0
    if args.length:
        print("POINTS " + json.dumps(run_worker(args)), flush=True)
        return 0

    torch.set_num_threads(args.threads)  # as the workers, so the JSON's machine record says so
    started = time.time()
    points, skipped = [], []
    last_train = {}  # model -> (length, seconds) of its last float32 forward+backward
    for length in sorted(args.lengths):
        for dtype in args.dtypes:
            if dtype == "bfloat16" and length > args.bf16_max_length:
                continue
            models = []
            for name in args.models:
                if name.endswith("+ckpt") and length > args.ckpt_max_length:
                    continue
                if name in last_train:
                    previous, seconds = last_train[name]
                    predicted = seconds * (length / previous) ** GROWTH[name]
                    if predicted > args.max_step_seconds:
                        skipped.append({"model": name, "length": length, "dtype": dtype,
                                        "predicted_seconds": predicted})
                        continue
                models.append(name)
            if not models:
                continue
            command = [sys.executable, __file__, "--length", str(length), "--dtype", dtype, "--models", *models,
                       "--modes", *args.modes] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                  if k in ("hidden", "blocks", "batch", "repeats", "long_from",
                                                           "threads", "eval_max_length")]
            command.append("--resident" if args.resident else "--no-resident")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                       MKL_NUM_THREADS=str(args.threads))
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("POINTS ")]
            if done.returncode != 0 or not lines:
                print(f"L={length} {dtype}: worker failed ({done.returncode}): {done.stderr[-2000:]}", flush=True)
                skipped += [{"model": m, "length": length, "dtype": dtype, "failed": done.returncode} for m in models]
                continue
            for point in json.loads(lines[-1][len("POINTS "):]):
                points.append(point)
                if point["dtype"] == "float32" and point["mode"] == "train":
                    last_train[point["model"]] = (length, point["seconds"])
                print(f"{point['model']:11s} L={length:6d} {dtype:8s} {point['mode']:5s} "
                      f"{point['seconds'] * 1e3:10.1f} ms [{point['seconds_min'] * 1e3:.0f}-"
                      f"{point['seconds_max'] * 1e3:.0f}] x{point['repeats']}  "
                      f"{point['peak_memory_mib']:8.1f} MiB (RSS +{float('nan') if point.get('resident_growth_mib') is None else point['resident_growth_mib']:.0f})  "
                      f"{point['achieved_gflops']:6.1f} GFLOP/s "
                      f"({100 * point['fraction_of_peak']:.0f}% of {point['matmul_peak_gflops']:.0f})", flush=True)
            save(points, skipped, args, argv, started)

    path = save(points, skipped, args, argv, started)
    print(f"wrote {path} in {round(time.time() - started)} s")
    return 0


def save(points: list[dict], skipped: list[dict], args, argv, started: float) -> Path:
    """Write the JSON and PNG (after every worker, so an interrupted run keeps what it measured)."""
    summary = summarise(points)
    name = "forward_scaling" + (f"_{args.tag}" if args.tag else "")
    command = "python " + " ".join(["benchmarks/forward_scaling.py"] + (sys.argv[1:] if argv is None else argv))
    payload = {"command": command, "headline": headline(summary, points), "settings": vars(args),
               "seconds": round(time.time() - started), "summary": summary, "skipped": skipped,
               "points": points}
    path = write_json(name, payload)
    plot(points, path.with_suffix(".png"), args)
    return path


def resummarise(path: Path) -> None:
    """Recompute a written JSON's summary and headline from its points (after a change to this script's
    reporting, without re-measuring)."""
    import json as json_module

    payload = json_module.loads(path.read_text())
    payload["summary"] = summarise(payload["points"])
    payload["headline"] = headline(payload["summary"], payload["points"])
    path.write_text(json_module.dumps(payload, indent=2) + "\n")


def summarise(points: list[dict]) -> list[dict]:
    """Per (dtype, mode, length): each contender's time and memory as a multiple of SFDLM's."""
    rows = []
    keys = sorted({(p["dtype"], p["mode"], p["length"]) for p in points})
    for dtype, mode, length in keys:
        here = {p["model"]: p for p in points if (p["dtype"], p["mode"], p["length"]) == (dtype, mode, length)}
        if "sfdlm" not in here:
            continue
        base = here["sfdlm"]
        row = {"dtype": dtype, "mode": mode, "length": length, "sfdlm_ms": base["seconds"] * 1e3,
               "sfdlm_mib": base["peak_memory_mib"], "sfdlm_pct_of_peak": 100 * base["fraction_of_peak"]}
        if base.get("resident_growth_mib") is not None:
            row["sfdlm_resident_growth_mib"] = base["resident_growth_mib"]
        for name in ("bert", "dit"):
            if name in here:
                row[f"{name}_time_over_sfdlm"] = here[name]["seconds"] / base["seconds"]
                row[f"{name}_mib_over_sfdlm"] = here[name]["peak_memory_mib"] / max(base["peak_memory_mib"], 1e-9)
                if here[name].get("resident_growth_mib") is not None and base.get("resident_growth_mib"):
                    row[f"{name}_resident_growth_mib"] = here[name]["resident_growth_mib"]
                    row[f"{name}_resident_over_sfdlm"] = here[name]["resident_growth_mib"] / base["resident_growth_mib"]
        for name, point in here.items():
            if "saved_activation_kib_per_token" in point:
                row[f"{name}_saved_kib_per_token"] = point["saved_activation_kib_per_token"]
        if "sfdlm+ckpt" in here:
            row["ckpt_mib"] = here["sfdlm+ckpt"]["peak_memory_mib"]
            row["ckpt_time_over_sfdlm"] = here["sfdlm+ckpt"]["seconds"] / base["seconds"]
        rows.append(row)
    return rows


def crossover(summary: list[dict], name: str, dtype: str, mode: str) -> float | None:
    """Smallest length at which the contender takes as long as SFDLM (log-linear interpolation)."""
    rows = [r for r in summary if (r["dtype"], r["mode"]) == (dtype, mode) and f"{name}_time_over_sfdlm" in r]
    previous = None
    for row in rows:
        ratio = row[f"{name}_time_over_sfdlm"]
        if ratio >= 1:
            if previous is None:
                return float(row["length"])
            (l0, r0), (l1, r1) = previous, (row["length"], ratio)
            fraction = (0 - math.log(r0)) / (math.log(r1) - math.log(r0))
            return math.exp(math.log(l0) + fraction * (math.log(l1) - math.log(l0)))
        previous = (row["length"], ratio)
    return None


def headline(summary: list[dict], points: list[dict]) -> list[str]:
    lines = []
    for dtype in ("float32", "bfloat16"):
        for mode in ("train", "eval"):
            for name in ("bert", "dit"):
                rows = [r for r in summary if (r["dtype"], r["mode"]) == (dtype, mode) and f"{name}_time_over_sfdlm" in r]
                if not rows:
                    continue
                where = crossover(summary, name, dtype, mode)
                ratios = ", ".join(f"{r['length']}: x{r[f'{name}_time_over_sfdlm']:.2f}" for r in rows)
                if where is None:
                    verdict = "SFDLM slower at every measured length"
                elif where == rows[0]["length"]:
                    verdict = f"SFDLM faster from the shortest measured length ({rows[0]['length']}) on"
                else:
                    verdict = f"crossover at ~{where:.0f} tokens"
                lines.append(f"{dtype} {'forward+backward' if mode == 'train' else 'forward'}, {name} time / SFDLM "
                             f"time: {ratios}; {verdict}")
    return lines


def plot(points: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [(axes[0], "train", "seconds", "forward+backward seconds"), (axes[1], "eval", "seconds", "forward seconds"),
              (axes[2], "train", "peak_memory_mib", "forward+backward peak tensor memory (MiB)")]
    for axis, mode, key, ylabel in panels:
        for index, name in enumerate(LABELS):
            for dtype, style in (("float32", "-"), ("bfloat16", "--")):
                series = sorted((p for p in points if (p["model"], p["mode"], p["dtype"]) == (name, mode, dtype)),
                                key=lambda p: p["length"])
                if not series or (key != "seconds" and dtype != "float32"):
                    continue
                axis.plot([p["length"] for p in series], [max(p[key], 1e-3) for p in series], style, marker="o",
                          color=f"C{index}", label=f"{LABELS[name]}, {dtype}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set(xlabel="sequence length", ylabel=ylabel)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"CPU, {args.threads} thread, width {args.hidden}, {args.blocks} SFDLM blocks (contenders "
                    f"parameter-matched), batch {args.batch}; medians of interleaved repeats")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
