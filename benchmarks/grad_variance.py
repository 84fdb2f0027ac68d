"""Variance of the training loss's gradient under each noise-draw estimator (`DiffusionLMMixin.training_estimator`).

The quality benchmark's sfdlm-absorbing and sfdlm-uniform models (`cpu` ptb-word preset: V = 10k, L = 64,
width 128) are trained briefly (`--train-steps` at lr 3e-3) so the gradients are those of a model that has
started to learn; then, on one fixed batch of 32 crops, the gradient of the training loss is drawn
`--draws` times per estimator (fresh noise each time, the batch and weights fixed) and the trace of its
covariance, sum_params Var(g), is reported with the squared norm of the mean gradient (the signal), plus the
loss's own variance. All estimators have the same expectation (tests/test_estimators.py), so a lower trace
is a strictly better stochastic gradient at equal cost.

    python benchmarks/grad_variance.py               # ~6 minutes on one core
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from common import save_report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ESTIMATORS = ("uniform_t", "masked_count", "importance")


def gradient(model, x, generator):
    model.zero_grad(set_to_none=True)
    loss = model(x, labels=x, generator=generator).loss
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double(), loss.item()


def measure(name: str, preset: dict, vocab, data, args) -> dict:
    torch.manual_seed(0)
    model = quality.build_model(name, quality.MODELS[name], preset, len(vocab), preset["block_size"])
    stream = quality.crops(data["train"], preset["batch_size"], preset["block_size"], args.train_steps, seed=0)
    quality.train(model, "sfdlm", stream, args.train_steps, 3e-3, dict(preset, warmup=5), vocab.eos_id, seed=0)
    model.train()
    x = next(quality.crops(data["valid"], preset["batch_size"], preset["block_size"], 1, seed=1 + args.seed))
    out = {}
    for estimator in ESTIMATORS:
        model.training_estimator = estimator
        generator = torch.Generator().manual_seed(2 + args.seed)
        grads, losses = zip(*(gradient(model, x, generator) for _ in range(args.draws)))
        g = torch.stack(grads)
        losses = torch.tensor(losses, dtype=torch.float64)
        out[estimator] = {"gradient_variance_trace": float(g.var(0).sum()), "mean_gradient_sq_norm": float(g.mean(0).pow(2).sum()),
                          "loss_mean": float(losses.mean()), "loss_std": float(losses.std())}
        print(f"{name} {estimator:13s} tr Var(g) {out[estimator]['gradient_variance_trace']:.4e}  "
              f"|E g|^2 {out[estimator]['mean_gradient_sq_norm']:.4e}  loss {losses.mean():.4f} +- {losses.std():.4f}",
              flush=True)
    base = out["uniform_t"]["gradient_variance_trace"]
    for estimator in ESTIMATORS:
        out[estimator]["variance_ratio_to_uniform_t"] = out[estimator]["gradient_variance_trace"] / base
    return out


def headline(results: dict) -> list[str]:
    return [f"{name} {estimator}: tr Var(g) {row['gradient_variance_trace']:.3g} "
            f"({row['variance_ratio_to_uniform_t']:.2f}x uniform_t's), loss {row['loss_mean']:.4f} ± {row['loss_std']:.4f}"
            for name, rows in results.items() for estimator, row in rows.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--draws", type=int, default=24)
    parser.add_argument("--models", nargs="+", default=["sfdlm-absorbing", "sfdlm-uniform"])
    parser.add_argument("--seed", type=int, default=0, help="picks the fixed batch and the noise draws")
    parser.add_argument("--data-dir", default=quality.DATA)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "grad_variance_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = dict(quality.PRESETS["cpu"]["ptb-word"])
    vocab, data = quality.load_setting("ptb-word", args.data_dir)
    results = {name: measure(name, preset, vocab, data, args) for name in args.models}
    report = {"benchmark": "grad_variance",
              "command": "python benchmarks/grad_variance.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
              "settings": {"seed": args.seed, "train_steps": args.train_steps, "draws": args.draws, "batch_size": preset["batch_size"],
                           "block_size": preset["block_size"], "vocabulary": len(vocab)},
              "results": results}
    report["headline"] = headline(results)
    save_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
