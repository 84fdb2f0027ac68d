"""One SFDLM training step (forward + backward of the continuous-time NELBO) at the PTB-word shape, uniform
against absorbing, interleaved in one process: what the one-pass uniform KL rate costs.

    python benchmarks/uniform_loss_speed.py --threads 2     # writes results/uniform_loss_speed_cpu.json
"""

import argparse
import json
import os
import statistics
import time

import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import MODELS, PRESETS, sfdlm_config  # noqa: E402

from hf_sfdlm import SFDLMForDiffusionLM  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def model(process: str, vocab: int) -> SFDLMForDiffusionLM:
    """The quality benchmark's cpu-preset SFDLM (sfdlm-absorbing or sfdlm-uniform) over `vocab` words."""
    spec = {k: v for k, v in MODELS[f"sfdlm-{process}"].items() if k != "kind"}
    return SFDLMForDiffusionLM(sfdlm_config(PRESETS["cpu"]["ptb-word"], vocab, **spec))


def step_seconds(net, ids) -> float:
    start = time.perf_counter()
    net(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, args.vocab, (32, 64), generator=torch.Generator().manual_seed(0))
    nets = {process: model(process, args.vocab) for process in ("absorbing", "uniform")}
    for net in nets.values():
        step_seconds(net, ids)  # warm-up
    times = {process: [] for process in nets}
    for _ in range(args.rounds):
        for process, net in nets.items():
            times[process].append(step_seconds(net, ids))
    medians = {process: statistics.median(values) for process, values in times.items()}
    report = {"benchmark": "uniform_loss_speed", "command": f"python benchmarks/uniform_loss_speed.py --threads {args.threads}",
              "machine": {"torch_threads": args.threads, "load_average_at_start": os.getloadavg()},
              "shape": {"batch": 32, "length": 64, "vocab": args.vocab},
              "results": [{"process": p, "median_seconds": medians[p], "all_seconds": times[p]} for p in nets],
              "headline": {"uniform / absorbing step time": medians["uniform"] / medians["absorbing"]}}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "uniform_loss_speed_cpu.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    print(report["headline"])


if __name__ == "__main__":
    main()
