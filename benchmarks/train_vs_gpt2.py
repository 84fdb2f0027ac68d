"""Training throughput of the diffusion models against GPT-2 at matched parameters (the quality benchmark's
models: V = 10k words, L = 64, batch 32, width 128), with the absorbing models' output head run at masked
positions only (`DiffusionLMMixin.head_only_loss`, the default) and on the whole canvas (as before).

Every model is built by `benchmarks/quality.py`'s own builders (`build_model`, the `cpu` ptb-word preset, its
parameter matching) and trained by its loop body (`training_loss`, AdamW step, clip 1.0) on random crops of
the PTB training stream. One intra-op thread. The machine is shared, so absolute rates move with the
neighbours' load: the models are measured in interleaved rounds (each round times `--steps` steps of every
model, after warm-up), and the figure to read is each round's ratio to GPT-2 (median and quartiles over the
rounds), not the tokens/s themselves. CPU time of the process is used for the rates (wall time counts the
neighbours), and the wall-clock ratios are reported too.

    python benchmarks/train_vs_gpt2.py                      # ~4 minutes on one busy core
    python benchmarks/train_vs_gpt2.py --rounds 3 --steps 1 # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from common import save_report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (quality.py model, head_only_loss)
CONTENDERS = {
    "gpt2-ar": ("gpt2-ar", None),
    "sfdlm-absorbing (head only)": ("sfdlm-absorbing", True),
    "sfdlm-absorbing (full canvas)": ("sfdlm-absorbing", False),
    "mdlm-transformer (head only)": ("mdlm-transformer", True),
    "mdlm-transformer (full canvas)": ("mdlm-transformer", False),
    "sfdlm-uniform": ("sfdlm-uniform", None),
}


def build(name: str, preset: dict, vocab_size: int):
    model_name, head_only = CONTENDERS[name]
    spec = quality.MODELS[model_name]
    torch.manual_seed(0)
    model = quality.build_model(model_name, spec, preset, vocab_size, preset["block_size"])
    if head_only is not None:
        model.head_only_loss = head_only
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    return {"model": model.train(), "kind": spec["kind"], "optimizer": optimizer,
            "parameters": quality.trained_parameters(model, preset), "noise": torch.Generator().manual_seed(1)}


def step(entry: dict, x: torch.Tensor, bos_id: int) -> float:
    loss = quality.training_loss(entry["model"], entry["kind"], x, bos_id, entry["noise"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(entry["model"].parameters(), 1.0)
    entry["optimizer"].step()
    entry["optimizer"].zero_grad(set_to_none=True)
    return loss.item()


def headline(summary: dict) -> list[str]:
    return [f"{name}: {row['parameters']:,} parameters, {row['tokens_per_cpu_second_median']:,.0f} tokens/s (CPU time), "
            f"{row['ratio_to_gpt2_median']:.2f}x GPT-2 (quartiles over rounds {row['ratio_to_gpt2_quartiles'][0]:.2f}-"
            f"{row['ratio_to_gpt2_quartiles'][1]:.2f})" for name, row in summary.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=sorted(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--data-dir", default=quality.DATA)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "train_vs_gpt2_cpu.json"))
    args = parser.parse_args(argv)
    if "gpt2-ar" not in args.models:
        raise SystemExit("--models must include gpt2-ar (the ratios are to it).")
    torch.set_num_threads(1)
    preset = dict(quality.PRESETS["cpu"]["ptb-word"])
    vocab, data = quality.load_setting("ptb-word", args.data_dir)
    entries = {name: build(name, preset, len(vocab)) for name in args.models}
    batches = quality.crops(data["train"], preset["batch_size"], preset["block_size"],
                            args.warmup + args.rounds * args.steps, seed=0)
    batches = list(batches)
    tokens = preset["batch_size"] * preset["block_size"]
    for name, entry in entries.items():  # warm-up: allocator, autograd caches
        for x in batches[:args.warmup]:
            step(entry, x, vocab.eos_id)
    rounds = []
    for r in range(args.rounds):
        chunk = batches[args.warmup + r * args.steps: args.warmup + (r + 1) * args.steps]
        order = list(entries) if r % 2 == 0 else list(reversed(entries))  # no model always runs first
        record = {}
        for name in order:
            cpu, wall = time.process_time(), time.perf_counter()
            for x in chunk:
                step(entries[name], x, vocab.eos_id)
            record[name] = {"cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall}
        rounds.append(record)
        print(f"round {r}: " + ", ".join(f"{n} {tokens * len(chunk) / v['cpu_seconds']:.0f} tok/s"
                                         for n, v in record.items()), flush=True)
    summary = {}
    for name in entries:
        rates = [tokens * args.steps / rd[name]["cpu_seconds"] for rd in rounds]
        ratios = [rd["gpt2-ar"]["cpu_seconds"] / rd[name]["cpu_seconds"] for rd in rounds]
        wall_ratios = [rd["gpt2-ar"]["wall_seconds"] / rd[name]["wall_seconds"] for rd in rounds]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        summary[name] = {"parameters": entries[name]["parameters"],
                         "tokens_per_cpu_second_median": statistics.median(rates),
                         "ratio_to_gpt2_median": statistics.median(ratios), "ratio_to_gpt2_quartiles": [q[0], q[2]],
                         "wall_ratio_to_gpt2_median": statistics.median(wall_ratios)}
        print(f"{name:34s} {summary[name]['parameters']:>9,d} params  {summary[name]['tokens_per_cpu_second_median']:7.0f} "
              f"tok/s (CPU time)  x{summary[name]['ratio_to_gpt2_median']:.2f} of GPT-2 "
              f"[{q[0]:.2f}, {q[2]:.2f}]  wall x{summary[name]['wall_ratio_to_gpt2_median']:.2f}")
    report = {
        "benchmark": "train_vs_gpt2",
        "command": "python benchmarks/train_vs_gpt2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "notes": ("Interleaved rounds in one process, one intra-op thread, on a machine shared with other jobs: "
                  "read the per-round ratios to GPT-2, not the absolute tokens/s. Rates use process CPU time."),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "settings": {"vocabulary": len(vocab), "block_size": preset["block_size"], "batch_size": preset["batch_size"],
                     "hidden_size": preset["hidden_size"], "rounds": args.rounds, "steps": args.steps,
                     "warmup": args.warmup},
        "summary": summary, "rounds": rounds,
    }
    report["headline"] = headline(summary)
    save_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
