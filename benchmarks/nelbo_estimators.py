"""NELBO estimators on trained language models: spread of independent replicates, the reported error bar,
and a long run, for the historical uniform-t estimator and the new ones (`hf_sfdlm.diffusion.NELBO_ESTIMATORS`).

The quality benchmark's sfdlm-absorbing and sfdlm-uniform (`cpu` ptb-word preset: V = 10k, L = 64, width 128)
are trained for `--steps` steps (its loop, its swept learning rates), then the first `--blocks` PTB test blocks
are scored `--replicates` times per estimator with `--samples` model calls per block (independent seeds).
Reported per estimator: the word-level perplexity bound's mean and standard deviation over the replicates
(the real error of one evaluation), the error bar each evaluation reports (from its own independent
replicates, `score_blocks`), and the variance ratio to uniform-t at equal model calls; plus one long run
(`--long-samples` calls per block, masked_count) that every estimator's mean must agree with.

    python benchmarks/nelbo_estimators.py            # about an hour on one core of the shared 2-core machine
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from common import save_report  # noqa: E402

from hf_sfdlm.evaluation import score_blocks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LEARNING_RATES = {"sfdlm-absorbing": 3e-3, "sfdlm-uniform": 1e-3}  # the committed cpu sweeps' choices


def evaluate(model, blocks, words, samples, seed, estimator, batch):
    start = time.perf_counter()
    totals, variances = score_blocks(model, blocks, batch_size=batch, num_samples=samples, seed=seed, estimator=estimator)
    nats, error = float(totals.sum()), float(variances.sum().sqrt())
    return {"perplexity": math.exp(nats / words), "perplexity_stderr": math.exp(nats / words) * error / words,
            "seconds": time.perf_counter() - start}


def headline(results: dict) -> list[str]:
    lines = []
    for name, result in results.items():
        long = result["long_run"]
        lines.append(f"{name} ({result['steps']} steps): long run {long['perplexity']:.2f} ± {long['perplexity_stderr']:.2f}")
        for estimator, row in result["estimators"].items():
            ratio = row.get("variance_ratio_uniform_t_over_this")
            lines.append(f"{name} {estimator}: {row['mean']:.2f} ± {row['std']:.2f} over replicates (reported "
                         f"± {row['reported_stderr_rms']:.2f}; {row['relative_std']:.2%} of the value"
                         + (f"; uniform_t variance / this: {ratio:.1f}" if ratio else "") + ")")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(LEARNING_RATES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--replicates", type=int, default=6)
    parser.add_argument("--long-samples", type=int, default=64)
    parser.add_argument("--estimators", nargs="+", default=["uniform_t", "masked_count", "importance"])
    parser.add_argument("--data-dir", default=quality.DATA)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "nelbo_estimators_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = dict(quality.PRESETS["cpu"]["ptb-word"])
    vocab, data = quality.load_setting("ptb-word", args.data_dir)
    blocks = quality.blocks_of(data["test"], preset["block_size"])[:args.blocks]
    words = sum(len(b) for b in blocks)  # PTB word level: every token (<eos> included) is a word
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        model = quality.build_model(name, quality.MODELS[name], preset, len(vocab), preset["block_size"])
        stream = quality.crops(data["train"], preset["batch_size"], preset["block_size"], args.steps, seed=0)
        quality.train(model, "sfdlm", stream, args.steps, LEARNING_RATES[name], preset, vocab.eos_id, seed=0)
        model.eval()
        long = evaluate(model, blocks, words, args.long_samples, 10_000, "masked_count", preset["eval_batch_size"])
        print(f"{name}: long run ({args.long_samples} calls/block) {long['perplexity']:.2f} ± "
              f"{long['perplexity_stderr']:.2f}", flush=True)
        rows = {}
        for estimator in args.estimators:
            runs = [evaluate(model, blocks, words, args.samples, seed, estimator, preset["eval_batch_size"])
                    for seed in range(args.replicates)]
            values = [r["perplexity"] for r in runs]
            rows[estimator] = {"perplexities": values, "mean": statistics.mean(values), "std": statistics.stdev(values),
                               "reported_stderr_rms": math.sqrt(statistics.mean(r["perplexity_stderr"] ** 2 for r in runs)),
                               "seconds_per_evaluation": statistics.mean(r["seconds"] for r in runs)}
            print(f"  {estimator:13s} {rows[estimator]['mean']:.2f} ± {rows[estimator]['std']:.2f} over "
                  f"{args.replicates} replicates (reported ± {rows[estimator]['reported_stderr_rms']:.2f}): "
                  f"{', '.join(f'{v:.1f}' for v in values)}", flush=True)
        for estimator, row in rows.items():
            row["variance_ratio_uniform_t_over_this"] = (rows["uniform_t"]["std"] / row["std"]) ** 2 if "uniform_t" in rows else None
            row["relative_std"] = row["std"] / row["mean"]
        results[name] = {"steps": args.steps, "lr": LEARNING_RATES[name], "long_run": long, "estimators": rows}
    report = {"benchmark": "nelbo_estimators",
              "command": "python benchmarks/nelbo_estimators.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "notes": ("Independent evaluations (seeds) of the same trained model on the same test blocks: their "
                        "spread is the real Monte Carlo error of one evaluation; compare it with the error bar each "
                        "evaluation reports. Equal model calls per block for every estimator."),
              "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
              "settings": {"blocks": len(blocks), "block_size": preset["block_size"], "samples": args.samples,
                           "replicates": args.replicates, "long_samples": args.long_samples},
              "results": results}
    report["headline"] = headline(results)
    save_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
