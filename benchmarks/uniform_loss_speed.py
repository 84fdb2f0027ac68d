"""One SFDLM training step (forward + backward of the continuous-time NELBO) at the PTB-word shape, uniform
against absorbing, interleaved in one process: what the one-pass uniform KL rate costs.

    python benchmarks/uniform_loss_speed.py --threads 2     # writes results/uniform_loss_speed_cpu.json
"""

import argparse
import json
import os
import statistics
import time

import torch

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def model(process: str, vocab: int) -> SFDLMForDiffusionLM:
    return SFDLMForDiffusionLM(SFDLMConfig(
        vocab_size=vocab + 1, mask_token_id=vocab, hidden_size=128, fourier_intermediate_size=256,
        stage_depths=[1, 1], pool_factors=[2], ssm_state_size=16, process=process,
        noise_schedule="loglinear" if process == "absorbing" else "cosine", num_timesteps=None))


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
