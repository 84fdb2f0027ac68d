"""Intra-op thread counts for the CLI's CPU work: tokens per second of LoRA fine-tuning steps, NELBO
evaluation and generation on the tiny preset model, for each `torch.set_num_threads` value.

The workloads are what `sfdlm finetune`, `sfdlm eval` and `sfdlm generate` run with their defaults:
a LoRA step on batches of 16 blocks of 128 tokens (forward, backward, AdamW); a 16-sample Monte Carlo
NELBO of 16 blocks of 128 tokens (no grad); 64 new tokens in 32 denoising steps. The model is the tiny
preset (`training/configs/tiny.yaml`) with a 4,096-token vocabulary (a BPE trained on PTB). Thread
counts alternate inside every repeat, so a change in machine load hits all of them alike.

    python benchmarks/cli_threads.py                     # threads 1 2, 3 repeats, ~3 minutes on 2 cores
    python benchmarks/cli_threads.py --threads 1 2 4 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def build_model(vocab_size: int):
    import yaml

    from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM

    preset = yaml.safe_load((REPO / "training" / "configs" / "tiny.yaml").read_text())["model"]
    config = SFDLMConfig(vocab_size=vocab_size, mask_token_id=1, pad_token_id=0, eos_token_id=2,
                         max_position_embeddings=512, **preset)
    return SFDLMForDiffusionLM(config)


def workloads(model, vocab_size: int):
    """{name: (callable doing one unit of work, tokens per unit)}."""
    import torch

    from hf_sfdlm.lora import apply_lora

    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(3, vocab_size, (16, 128), generator=generator)
    peft_model = apply_lora(model, r=8)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)

    def finetune_step():
        peft_model.train()
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    base = peft_model.get_base_model().eval()

    def evaluate():
        with torch.no_grad():
            base.nelbo(batch, num_samples=16, generator=torch.Generator().manual_seed(1))

    def generate():
        with torch.no_grad():
            base.generate(None, max_new_tokens=64, steps=32, generator=torch.Generator().manual_seed(2))

    return {"finetune": (finetune_step, batch.numel()), "eval": (evaluate, batch.numel() * 16),
            "generate": (generate, 64)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--units", type=int, default=3, help="units of work timed per measurement")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--name", default="cli_threads")
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    jobs = workloads(build_model(args.vocab_size), args.vocab_size)
    rates: dict[str, dict[int, list[float]]] = {job: {n: [] for n in args.threads} for job in jobs}
    for name, (work, _) in jobs.items():  # warm-up
        work()
    for repeat in range(args.repeats):
        for name, (work, tokens) in jobs.items():
            for threads in args.threads:
                torch.set_num_threads(threads)
                start = time.perf_counter()
                for _ in range(args.units):
                    work()
                rates[name][threads].append(tokens * args.units / (time.perf_counter() - start))
                print(f"repeat {repeat} {name:>8} threads={threads}: {rates[name][threads][-1]:,.0f} tokens/s",
                      flush=True)
    summary = {name: {str(n): {"median_tokens_per_s": statistics.median(v), "runs": v} for n, v in per.items()}
               for name, per in rates.items()}
    record = {"command": "python benchmarks/cli_threads.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(), "torch": torch.__version__,
              "vocab_size": args.vocab_size, "results": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    for name, per in summary.items():
        print(name, {n: round(v["median_tokens_per_s"]) for n, v in per.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
