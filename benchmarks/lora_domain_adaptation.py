"""LoRA against full fine-tuning for domain adaptation, same data, loop, steps and budget.

1. Pretrain a base SFDLM (the `tiny` preset of `hf_sfdlm.train_config`, shortened) on the synthetic grammar corpus.
2. New domain: the same grammar with every sentence's word order reversed (same vocabulary, new syntax).
3. Adapt the base for the same number of steps with (a) LoRA (`hf_sfdlm.lora.apply_lora`, default targets,
   and with `--train-ssm`) and (b) full fine-tuning, through the same `DiffusionTrainer`.

Reports the held-out NELBO (nats/token, an upper bound on the NLL) on reversed text before and after,
how much of the gap to full fine-tuning LoRA closes, trainable parameters and wall time (ratios: the
machine is shared). Writes benchmarks/results/lora_domain_adaptation.json and a PNG of the eval curves.

    python benchmarks/lora_domain_adaptation.py            # about 10 minutes on 2 shared CPU cores
    python benchmarks/lora_domain_adaptation.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_sfdlm.lora import apply_lora  # noqa: E402
from hf_sfdlm.synthetic import SyntheticGrammar  # noqa: E402
from hf_sfdlm.pipelines import build_finetune_datasets, run_training  # noqa: E402
from hf_sfdlm.tracking import read_metrics  # noqa: E402
from hf_sfdlm.train_config import FinetuneConfig, TrainingConfig, load_config  # noqa: E402
from hf_sfdlm.trainer import DiffusionTrainer  # noqa: E402


def pretrain(work: Path, steps: int) -> Path:
    config = load_config(None, [f"training.max_steps={steps}", f"training.output_dir={work / 'base'}",
                                "training.progress_bar=false", "training.log_with=[jsonl]",
                                "training.eval_every=0", f"training.checkpoint_every={steps}"])
    result, _ = run_training(config, overwrite=True)  # scratch folders: a rerun replaces the last one
    return Path(result.output_dir)


def reversed_corpus(path: Path, sentences: int) -> Path:
    lines = [" ".join(reversed(s.split()[:-1])) + " ." for s in SyntheticGrammar().sample_sentences(sentences, 7)]
    path.write_text("\n".join(lines) + "\n")
    return path


def adapt(base: Path, data: Path, out: Path, method: str, steps: int, seed: int) -> dict:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(base, trust_remote_code=True)
    if method.startswith("lora"):
        model = apply_lora(model, r=8, alpha=16, train_ssm=method == "lora+ssm")
        lr = 3e-3
    else:
        lr = 1e-3
    train, evaluation, collator = build_finetune_datasets(FinetuneConfig(model=str(base), data=str(data), block_size=64),
                                                          "text", tokenizer, seed)
    config = TrainingConfig(output_dir=str(out / method), max_steps=steps, batch_size=32, learning_rate=lr,
                            warmup_steps=10, ema_decay=None, eval_every=max(steps // 6, 1), checkpoint_every=steps,
                            eval_max_sequences=64, eval_num_samples=4, progress_bar=False, log_with=["jsonl"],
                            seed=seed)
    trainer = DiffusionTrainer(model, config, train, evaluation, data_collator=collator, tokenizer=tokenizer)
    before = trainer.evaluate()["eval/nelbo"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".lora_" not in n and "modules_to_save" not in n)
    start = time.perf_counter()
    result = trainer.train(overwrite=True)
    seconds = time.perf_counter() - start
    curve = [(m["step"], m["eval/nelbo"]) for m in read_metrics(out / method / "logs" / "metrics.jsonl")
             if "eval/nelbo" in m]
    return {"method": method, "nelbo_before": before, "nelbo_after": result.eval_nelbo,
            "trainable_parameters": trainable, "base_parameters": total, "seconds": round(seconds, 1),
            "learning_rate": lr, "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="outputs/bench-lora")
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors on shared cores: one thread is fastest
    work = Path(options.work)
    pretrain_steps, adapt_steps, sentences = (40, 12, 400) if options.quick else (600, 150, 4000)
    started = time.perf_counter()
    base = pretrain(work, pretrain_steps)
    data = reversed_corpus(work / "reversed.txt", sentences)
    runs = [adapt(base, data, work, method, adapt_steps, seed=0) for method in ("lora", "lora+ssm", "full")]
    full = next(r for r in runs if r["method"] == "full")
    for run in runs:
        gain, full_gain = run["nelbo_before"] - run["nelbo_after"], full["nelbo_before"] - full["nelbo_after"]
        run["fraction_of_full_ft_gain"] = gain / full_gain if full_gain else None
        run["trainable_fraction"] = run["trainable_parameters"] / run["base_parameters"]
        run["time_vs_full"] = run["seconds"] / full["seconds"]
    import peft
    import transformers

    record = {"benchmark": "lora_domain_adaptation", "machine": platform.platform(), "python": platform.python_version(),
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
              "config": {"pretrain_steps": pretrain_steps, "adapt_steps": adapt_steps, "batch_size": 32,
                         "block_size": 64, "domain": "synthetic grammar, word order reversed", "seed": 0,
                         "lora": {"r": 8, "alpha": 16, "targets": "in_proj,out_proj,fc_in,fc_out"}},
              "runs": runs, "total_seconds": round(time.perf_counter() - started, 1)}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    name = "lora_domain_adaptation" + ("_quick" if options.quick else "")
    (results / f"{name}.json").write_text(json.dumps(record, indent=1))
    for run in runs:
        print(f"{run['method']:9s} NELBO {run['nelbo_before']:.3f} -> {run['nelbo_after']:.3f} nats/token, "
              f"{run['trainable_fraction']:.1%} of parameters trained, "
              f"{run['fraction_of_full_ft_gain']:.2f} of full FT's gain, time x{run['time_vs_full']:.2f} of full FT")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for run in runs:
        steps, values = zip(*([(0, run["nelbo_before"])] + run["curve"]))
        axis.plot(steps, values, marker="o", label=f"{run['method']} ({run['trainable_fraction']:.1%} trained)")
    axis.set_xlabel("adaptation step")
    axis.set_ylabel("held-out NELBO on reversed text (nats/token)")
    axis.set_title("Domain adaptation of a tiny SFDLM: LoRA vs full fine-tuning")
    axis.legend()
    figure.tight_layout()
    figure.savefig(results / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
