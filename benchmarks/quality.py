"""Quality benchmark: SFDLM against an autoregressive and a Transformer-denoiser baseline, same everything.

Trains, on PTB and WikiText-2 (from ../shared/data) under the GPT-2 tokenizer, with one data stream,
one token budget and one optimiser recipe:

    sfdlm-uniform     SFDLM, uniform process (the paper's), linear schedule, continuous-time NELBO
    sfdlm-absorbing   SFDLM, absorbing process, log-linear schedule, continuous time (MDLM's objective)
    mdlm-transformer  a BERT encoder under the same absorbing objective (MDLM), matched parameters
    sedd-absorbing    SFDLM trained as SEDD: log-scores, score entropy, absorbing graph, log-linear schedule
    sedd-uniform      SFDLM trained as SEDD: uniform graph, geometric schedule (Tweedie/Euler samplers)
    gpt2-ar           GPT2LMHeadModel, exact likelihood, matched parameters

and the paper's ablations of sfdlm-uniform on PTB (no Fourier MLP, no SSM, cosine schedule,
T in {4, 10, 100} against continuous time). Reports test perplexity (token-level under GPT-2 BPE,
word-level, bits per byte; diffusion figures are NELBO upper bounds with Monte Carlo standard errors),
parameters, tokens seen and wall time; on PTB also generation quality (generative perplexity under
the AR model as judge, unigram entropy, distinct-n, against sampler and steps, sampled in float64)
and infilling (exact match and NLL of a masked span of held-out text). Writes
benchmarks/results/quality_<preset>.json and a learning-curve PNG.

Vocabulary: small models over GPT-2's 50,257 ids spend almost all parameters and compute on the
output layer, so every model predicts the `vocab_size` most frequent training ids plus one "other"
id spread uniformly over the rest (`hf_sfdlm.evaluation.CompactVocabulary`). Likelihoods stay exact
likelihoods of GPT-2 token sequences; the "other" penalty is the same for every model.

    python benchmarks/quality.py --preset cpu --eval-samples 16   # the run in RESULTS.md (~27 min on 2 cores)
    python benchmarks/quality.py --preset gpu          # where a GPU is lent
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import transformers
from transformers import AutoTokenizer, GPT2LMHeadModel, get_cosine_schedule_with_warmup

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM
from hf_sfdlm.baselines import (TransformerDenoiserForDiffusionLM, count_parameters, matched_gpt2_config,
                                matched_transformer_denoiser_config)
from hf_sfdlm.evaluation import (CompactVocabulary, autoregressive_nll, distinct_n, evaluate_perplexity,
                                 generative_perplexity, infilling_exact_match, make_blocks, read_text, span_nll,
                                 tokenize_lines, unigram_entropy)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
DATASETS = {
    "ptb": ("ptb/ptb.train.txt", "ptb/ptb.test.txt"),
    "wikitext-2": ("wikitext-2/wiki.train.tokens", "wikitext-2/wiki.test.tokens"),
}
PRESETS = {
    # Sized for 2 shared CPU cores: ~0.5M-parameter models, 60 steps of 16 x 64 tokens (61k tokens) each;
    # the whole run takes ~20-40 min depending on how busy the cores are.
    "cpu": dict(hidden_size=64, fourier_intermediate_size=128, stage_depths=[1, 1], pool_factors=[2],
                ssm_state_size=16, block_size=64, batch_size=16, steps=60, lr=3e-3, warmup=6, vocab_size=4096,
                eval_lines={"ptb": 120, "wikitext-2": 40}, eval_samples=4, num_heads=4,
                gen_samples=4, gen_steps=[8, 16], infill_rows=16, infill_span=8, device="cpu"),
    "gpu": dict(hidden_size=256, fourier_intermediate_size=1024, stage_depths=[2, 2, 2], pool_factors=[2, 2],
                ssm_state_size=32, block_size=256, batch_size=64, steps=5000, lr=1e-3, warmup=200,
                vocab_size=None, eval_lines={"ptb": None, "wikitext-2": None}, eval_samples=16, num_heads=4,
                gen_samples=64, gen_steps=[16, 64, 256], infill_rows=256, infill_span=16, device="cuda"),
}
MAIN_RUNS = {
    "sfdlm-uniform": dict(kind="sfdlm", process="uniform", noise_schedule="linear", num_timesteps=None),
    "sfdlm-absorbing": dict(kind="sfdlm", process="absorbing", noise_schedule="loglinear", num_timesteps=None),
    "mdlm-transformer": dict(kind="transformer", process="absorbing", noise_schedule="loglinear", num_timesteps=None),
    "sedd-absorbing": dict(kind="sfdlm", process="absorbing", noise_schedule="loglinear", num_timesteps=None,
                           objective="score_entropy"),
    "sedd-uniform": dict(kind="sfdlm", process="uniform", noise_schedule="geometric", num_timesteps=None,
                         objective="score_entropy"),
    "gpt2-ar": dict(kind="ar"),
}
ABLATIONS = {  # of sfdlm-uniform, on PTB
    "no-fourier-mlp": dict(use_fourier_mlp=False),
    "no-ssm": dict(use_ssm=False),
    "cosine": dict(noise_schedule="cosine"),
    "T=4": dict(num_timesteps=4),
    "T=10": dict(num_timesteps=10),
    "T=100": dict(num_timesteps=100),
}
TOKENIZER_NAME = "gpt2 (GPT-2 BPE, 50,257 ids)"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- data
def load_ids(tokenizer, path: str, cache_dir: str) -> torch.Tensor:
    """GPT-2 ids of a text file, tokenized line by line (cached: tokenizing WikiText-2 takes ~20 s)."""
    os.makedirs(cache_dir, exist_ok=True)
    stat = os.stat(path)
    cache = os.path.join(cache_dir, f"{os.path.basename(path)}.{stat.st_size}.{int(stat.st_mtime)}.pt")
    if os.path.exists(cache):
        return torch.load(cache)
    ids = torch.tensor(tokenize_lines(read_text(path), tokenizer), dtype=torch.long)
    torch.save(ids, cache)
    return ids


def batches(ids: torch.Tensor, batch_size: int, block_size: int, steps: int, seed: int):
    """The same stream of random crops for every model of a dataset."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(block_size)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=generator)
        yield ids[starts.unsqueeze(-1) + offsets]


# ---------------------------------------------------------------------------------------------- models
def sfdlm_config(preset: dict, vocab: CompactVocabulary, **overrides) -> SFDLMConfig:
    # Every diffusion model gets one extra id: the mask (absorbing state, or the infilling marker).
    values = dict(vocab_size=vocab.size + 1, mask_token_id=vocab.size, hidden_size=preset["hidden_size"],
                  stage_depths=preset["stage_depths"], pool_factors=preset["pool_factors"],
                  ssm_state_size=preset["ssm_state_size"],
                  fourier_intermediate_size=preset["fourier_intermediate_size"])
    values.update(overrides)
    return SFDLMConfig(**values)


def build_model(spec: dict, preset: dict, vocab: CompactVocabulary, target_parameters: int):
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "sfdlm":
        return SFDLMForDiffusionLM(sfdlm_config(preset, vocab, **spec))
    if kind == "transformer":
        return TransformerDenoiserForDiffusionLM(matched_transformer_denoiser_config(
            target_parameters, vocab.size + 1, preset["hidden_size"], preset["block_size"],
            num_heads=preset["num_heads"], mask_token_id=vocab.size, **spec))
    return GPT2LMHeadModel(matched_gpt2_config(target_parameters, vocab.size, preset["hidden_size"],
                                               preset["block_size"], num_heads=preset["num_heads"]))


def train(model, kind: str, stream, preset: dict, bos_id: int, seed: int) -> dict:
    """The one training loop for every model: AdamW, warmup + cosine, clip 1.0; loss in nats/token."""
    device = preset["device"]
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=preset["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, preset["warmup"], preset["steps"])
    noise = torch.Generator().manual_seed(seed + 1)
    curve, tokens, start = [], 0, time.perf_counter()
    for step, x in enumerate(stream, 1):
        x = x.to(device)
        if kind == "ar":
            inputs = torch.cat([torch.full_like(x[:, :1], bos_id), x], dim=1)
            labels = torch.cat([torch.full_like(x[:, :1], -100), x], dim=1)
            loss = model(input_ids=inputs, labels=labels).loss
        else:
            loss = model(x, labels=x, generator=noise).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += x.numel()
        curve.append({"step": step, "tokens": tokens, "loss": loss.item(),
                      "seconds": round(time.perf_counter() - start, 3)})
    model.eval()
    return {"tokens_seen": tokens, "train_seconds": time.perf_counter() - start, "curve": curve,
            "final_train_loss": sum(c["loss"] for c in curve[-10:]) / min(10, len(curve))}


# ---------------------------------------------------------------------------------------------- generation quality
def generation_quality(model, judge, vocab: CompactVocabulary, preset: dict, bos_id: int, seed: int) -> list[dict]:
    """Unconditional samples (float64) against sampler and steps, judged by the AR model (float64)."""
    rows = []
    samplers = ["ancestral", "confidence"] if model.config.process == "absorbing" else ["uniform", "ancestral"]
    if getattr(model.config, "objective", None) == "score_entropy":  # SEDD: log-scores, not logits of p_hat
        samplers = ["tweedie", "euler"]
    model = model.double()
    for sampler in samplers:
        for steps in preset["gen_steps"]:
            generator = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            samples = model.generate(max_new_tokens=preset["block_size"], steps=steps, sampler=sampler,
                                     num_return_sequences=preset["gen_samples"], generator=generator).cpu()
            seconds = time.perf_counter() - start
            samples = samples.clamp(max=vocab.other_id)  # a leftover mask would be "other" for the judge
            rows.append({"sampler": sampler, "steps": steps, "seconds": seconds, **_sample_scores(samples, judge, bos_id)})
    model.float()
    return rows


def _sample_scores(samples: torch.Tensor, judge, bos_id: int) -> dict:
    return {"gen_ppl": generative_perplexity(judge, samples, bos_token_id=bos_id),
            "unigram_entropy": unigram_entropy(samples), "distinct_2": distinct_n(samples, 2),
            "distinct_3": distinct_n(samples, 3)}


def ar_self_samples(judge, preset: dict, bos_id: int, seed: int) -> dict:
    """The AR model's own ancestral samples (KV cache), scored by itself: a reference, not a fair judge."""
    torch.manual_seed(seed)
    prompt = torch.full((preset["gen_samples"], 1), bos_id)
    out = judge.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=preset["block_size"], min_new_tokens=preset["block_size"],
                         top_k=0, pad_token_id=bos_id, eos_token_id=None)[:, 1:]
    return {"sampler": "autoregressive (self-judged)", "steps": preset["block_size"], **_sample_scores(out, judge, bos_id)}


def infilling(model, kind: str, blocks: torch.Tensor, preset: dict, bos_id: int, seed: int) -> dict:
    """Mask a span in the middle of held-out blocks: greedy fill (exact match) and NLL of the true span.

    Diffusion models see both sides of the span; the AR model only the left context (its greedy
    continuation and its exact NLL of the span given the left context).
    """
    span = preset["infill_span"]
    begin = (blocks.shape[1] - span) // 2
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask[:, begin:begin + span] = True
    generator = torch.Generator().manual_seed(seed)
    if kind == "ar":
        context = torch.cat([torch.full_like(blocks[:, :1], bos_id), blocks[:, :begin]], dim=1)
        out = model.generate(context, attention_mask=torch.ones_like(context), do_sample=False,
                             max_new_tokens=span, min_new_tokens=span,
                             pad_token_id=bos_id, eos_token_id=None)
        predictions = blocks.clone()
        predictions[:, begin:begin + span] = out[:, context.shape[1]:]
        nll = autoregressive_nll(model, blocks, bos_id, labels=torch.where(mask, blocks, -100))
    else:
        masked = blocks.masked_fill(mask, model.config.mask_token_id)
        sampler = "confidence" if model.config.process == "absorbing" else "uniform"
        sampler = "tweedie" if getattr(model.config, "objective", None) == "score_entropy" else sampler
        predictions = model.generate(masked, steps=span, sampler=sampler, temperature=0.0, generator=generator)
        nll = span_nll(model, blocks, mask, num_samples=preset["eval_samples"], generator=generator)
    scores = infilling_exact_match(predictions.cpu(), blocks, mask)
    return {**scores, "span_nll_per_token": float(nll.sum()) / int(mask.sum()), "rows": blocks.shape[0],
            "span_tokens": span, "conditioning": "left context only" if kind == "ar" else "both sides"}


# ---------------------------------------------------------------------------------------------- driver
def run_one(name: str, spec: dict, dataset: str, ctx: dict, preset: dict, args) -> dict:
    vocab, tokenizer = ctx["vocab"], ctx["tokenizer"]
    torch.manual_seed(args.seed)
    model = build_model(spec, preset, vocab, ctx["target_parameters"])
    kind = spec["kind"]
    log(f"{dataset} / {name}: {count_parameters(model):,} parameters, training {preset['steps']} steps")
    stream = batches(ctx["train_ids"], preset["batch_size"], preset["block_size"], preset["steps"], args.seed)
    record = {"name": name, "dataset": dataset, "kind": kind, "spec": {k: v for k, v in spec.items()},
              "parameters": count_parameters(model),
              "non_embedding_parameters": count_parameters(model, exclude_embeddings=True),
              "config": model.config.to_diff_dict()}
    record.update(train(model, kind, stream, preset, ctx["bos_id"], args.seed))
    start = time.perf_counter()
    result = evaluate_perplexity(model, tokenizer, ctx["test_text"], block_size=preset["block_size"], batch_size=32,
                                 num_samples=preset["eval_samples"], seed=args.seed, vocabulary=vocab,
                                 bos_token_id=ctx["bos_id"], tokenizer_name=TOKENIZER_NAME)
    record["test"] = result.to_dict()
    record["eval_seconds"] = time.perf_counter() - start
    log(f"  {result.summary()} (train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s)")
    return record, model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["ptb", "wikitext-2"])
    parser.add_argument("--steps", type=int, help="override the preset's training steps")
    parser.add_argument("--eval-samples", type=int, help="override the preset's t samples per test block")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=DATA)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "hf_sfdlm_bench"))
    parser.add_argument("--output", help="JSON path (default benchmarks/results/quality_<preset>.json)")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    if args.eval_samples:
        preset["eval_samples"] = args.eval_samples
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs CUDA; no GPU is visible.")
    if preset["device"] == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    output = args.output or os.path.join(HERE, "results", f"quality_{args.preset}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.data_dir, "gpt2-tokenizer"))
    started = time.perf_counter()
    report = {
        "benchmark": "quality", "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "preset": args.preset, "settings": preset, "tokenizer": TOKENIZER_NAME, "runs": [], "generation": [],
        "infilling": [], "datasets": {},
    }
    for dataset in args.datasets:
        train_path, test_path = (os.path.join(args.data_dir, p) for p in DATASETS[dataset])
        train_ids = load_ids(tokenizer, train_path, args.cache_dir)
        eos = tokenizer.eos_token_id
        vocab = CompactVocabulary.from_token_ids(train_ids.tolist(), len(tokenizer), always_keep=[eos],
                                                 max_kept=preset["vocab_size"])
        test_text = read_text(test_path, max_lines=preset["eval_lines"][dataset])
        covered = vocab.encode(train_ids) != vocab.other_id
        ctx = {"tokenizer": tokenizer, "vocab": vocab, "train_ids": vocab.encode(train_ids), "test_text": test_text,
               "bos_id": int(vocab.encode(torch.tensor(eos)))}
        ctx["target_parameters"] = count_parameters(SFDLMForDiffusionLM(sfdlm_config(preset, vocab)))
        report["datasets"][dataset] = {
            "train_tokens": len(train_ids), "test_lines": test_text.count("\n"),
            "test_words": len(test_text.split()) + test_text.count("\n"), "model_vocabulary": vocab.size,
            "train_token_coverage": float(covered.double().mean()),
            "test_subset": f"first {preset['eval_lines'][dataset]} lines of {DATASETS[dataset][1]}"
            if preset["eval_lines"][dataset] else f"all of {DATASETS[dataset][1]}"}
        log(f"{dataset}: {len(train_ids):,} train tokens, vocabulary {vocab.size} ids "
            f"({covered.double().mean():.1%} of train tokens), test subset {report['datasets'][dataset]['test_subset']}")
        models = {}
        for name, spec in MAIN_RUNS.items():
            record, model = run_one(name, spec, dataset, ctx, preset, args)
            report["runs"].append(record)
            models[name] = model
            _save(report, output, started)
        if dataset == "ptb" and not args.no_ablations:
            for name, overrides in ABLATIONS.items():
                spec = {**MAIN_RUNS["sfdlm-uniform"], **overrides}
                record, _ = run_one(f"sfdlm-uniform {name}", spec, dataset, ctx, preset, args)
                record["ablation"] = name
                report["runs"].append(record)
                _save(report, output, started)
        if dataset == "ptb" and not args.no_generation:
            judge = models["gpt2-ar"].double()
            blocks = torch.stack([b for b in make_blocks(vocab.encode(torch.tensor(tokenize_lines(test_text, tokenizer))).tolist(),
                                                         preset["block_size"]) if len(b) == preset["block_size"]])
            blocks = blocks[:preset["infill_rows"]]
            for name in ("sfdlm-uniform", "sfdlm-absorbing", "mdlm-transformer", "sedd-absorbing", "sedd-uniform"):
                log(f"generation quality: {name}")
                for row in generation_quality(models[name], judge, vocab, preset, ctx["bos_id"], args.seed):
                    report["generation"].append({"model": name, "dataset": dataset, **row})
                report["infilling"].append({"model": name, "dataset": dataset,
                                            **infilling(models[name], "diffusion", blocks, preset, ctx["bos_id"], args.seed)})
                _save(report, output, started)
            report["generation"].append({"model": "gpt2-ar", "dataset": dataset,
                                         **ar_self_samples(judge, preset, ctx["bos_id"], args.seed)})
            report["infilling"].append({"model": "gpt2-ar", "dataset": dataset,
                                        **infilling(judge.float(), "ar", blocks, preset, ctx["bos_id"], args.seed)})
            _save(report, output, started)
    _save(report, output, started)
    plot(report, output.replace(".json", ".png"))
    log(f"wrote {output} in {time.perf_counter() - started:.0f} s")
    return 0


def _save(report: dict, path: str, started: float) -> None:
    report["total_seconds"] = time.perf_counter() - started
    with open(path, "w") as handle:
        json.dump(report, handle, indent=1)


def plot(report: dict, path: str) -> None:
    """Training loss (nats/token: NELBO bound for diffusion, exact NLL for AR) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, [r for r in report["runs"] if r["dataset"] == d and "ablation" not in r]) for d in report["datasets"]]
    ablations = [r for r in report["runs"] if "ablation" in r or (r["dataset"] == "ptb" and r["name"] == "sfdlm-uniform")]
    if len(ablations) > 1:
        panels.append(("ptb: sfdlm-uniform ablations", ablations))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        for run in runs:
            losses = [c["loss"] for c in run["curve"]]
            smooth, value = [], losses[0]
            for loss in losses:  # exponential moving average, to read trends through the noise of single batches
                value = 0.9 * value + 0.1 * loss
                smooth.append(value)
            ax.plot([c["tokens"] for c in run["curve"]], smooth, label=run["name"])
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("train loss, nats/token (EMA)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"quality benchmark, preset {report['preset']}: {report['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
