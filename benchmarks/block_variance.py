"""Gradient variance of the block-diffusion objective (issue 23, item 6): a small measurement, not a sweep.

BD3-LM (arXiv 2503.09573) traces most of the gap between block diffusion and AR to the variance of the
NELBO's gradient over the noise draws. For each setting (full canvas, block_size 16, block_size 4) this trains
an SFDLM-absorbing model of the `cpu` quality preset's shape on PTB word (64-token crops, the same crops for
every setting) for `--steps` steps, then, on one fixed batch, draws the training loss `--draws` times (fresh
noise levels and masks each time) and reports, per token:

  - the loss's mean and standard deviation over the draws,
  - the gradient's relative variance E||g - mean g||^2 / ||mean g||^2 (the share of a step that is noise),

for the model's own objective (t ~ U[0, 1], stratified) and, on the same trained model, for BD3-LM's clipped
noise range t ~ U[a, b] (`--clip`), which lowers the variance at the price of a biased (non-NELBO) objective.
Single-thread CPU, one seed: the numbers compare settings on one machine, they are not a benchmark of speed.

    python benchmarks/block_variance.py --steps 150 --draws 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402
from quality import DATA, crops, load_setting  # noqa: E402

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM  # noqa: E402


def build(vocab_size: int, block_size: int | None) -> SFDLMForDiffusionLM:
    torch.manual_seed(0)
    config = SFDLMConfig(vocab_size=vocab_size + 1, mask_token_id=vocab_size, process="absorbing",
                         noise_schedule="loglinear", num_timesteps=None, hidden_size=128, fourier_intermediate_size=256,
                         stage_depths=[1, 1], pool_factors=[2], ssm_state_size=16, block_size=block_size)
    return SFDLMForDiffusionLM(config)


def gradient_statistics(model, batch: torch.Tensor, draws: int, clip: tuple[float, float] | None) -> dict:
    """Loss and gradient statistics of `draws` independent draws of the objective on one batch."""
    model.train()
    losses, gradients = [], []
    generator = torch.Generator().manual_seed(123)
    for _ in range(draws):
        model.zero_grad()
        timesteps = None
        if clip is not None:  # per block (block mode) or per row, uniform on the clipped range
            blocks = 1 if model.config.block_size is None else -(-batch.shape[1] // model.config.block_size)
            shape = (batch.shape[0],) if blocks == 1 and model.config.block_size is None else (batch.shape[0], blocks)
            timesteps = clip[0] + (clip[1] - clip[0]) * torch.rand(shape, generator=generator, dtype=torch.float64)
        loss = model(input_ids=batch, labels=batch, generator=generator, timesteps=timesteps).loss
        loss.backward()
        losses.append(loss.item())
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    g = torch.stack(gradients)
    mean = g.mean(0)
    relative = float(((g - mean) ** 2).sum(-1).mean() / (mean ** 2).sum())
    losses = torch.tensor(losses)
    return {"loss_mean": round(float(losses.mean()), 4), "loss_std": round(float(losses.std()), 4),
            "gradient_relative_variance": round(relative, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--draws", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[0, 16, 4], help="0: full canvas")
    parser.add_argument("--clip", type=float, nargs=2, default=[0.3, 0.8])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab, data = load_setting("ptb-word", args.data_dir)
    fixed = next(crops(data["valid"], args.batch_size, args.length, 1, seed=99))
    results = []
    for size in args.block_sizes:
        model = build(len(vocab), size or None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        model.train()
        for batch in crops(data["train"], args.batch_size, args.length, args.steps, seed=0):
            loss = model(input_ids=batch, labels=batch, generator=generator).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        seconds = time.perf_counter() - start
        row = {"block_size": size or None, "train_steps": args.steps, "train_seconds": round(seconds, 1),
               "final_train_loss": round(loss.item(), 4),
               "objective": gradient_statistics(model, fixed, args.draws, None),
               f"clipped_t_{args.clip[0]}_{args.clip[1]}": gradient_statistics(model, fixed, args.draws,
                                                                                tuple(args.clip))}
        results.append(row)
        print(row, flush=True)
    write_json("block_variance", {
        "command": "python benchmarks/block_variance.py " + " ".join(sys.argv[1:]),
        "setting": {"data": "PTB word, 64-token crops (train) and one fixed batch of valid crops",
                    "model": "SFDLM-absorbing, loglinear, continuous time, cpu quality preset shape",
                    "batch_size": args.batch_size, "draws": args.draws, "threads": args.threads},
        "note": "gradient_relative_variance = E||g - mean g||^2 / ||mean g||^2 over the draws of one batch; one seed, "
                "short training, one loaded shared 2-core machine (seconds are not a speed benchmark); the "
                "clipped range is BD3-LM's variance fix, a biased objective (not a NELBO)",
        "results": results,
    })


if __name__ == "__main__":
    main()
