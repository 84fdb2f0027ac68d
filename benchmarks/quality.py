"""Quality benchmark: does SFDLM model language, and how far is it from an AR model trained the same way?

Two settings with closed vocabularies (so every likelihood is exact, and published numbers apply):

    ptb-word   Mikolov's PTB, 10k words with <unk>, one <eos> per line: test perplexity per word
               (82,430 test tokens, <eos> included). Published anchors: Kneser-Ney 5-gram 141.2
               (Mikolov & Zweig 2012), small 2-layer LSTM 114.5 (Zaremba et al. 2014).
    ptb-char   character-level PTB ('_' is the space), one <eos> per line: test bits per character.

Baselines computed here on the same splits (`benchmarks/ngram.py`): a unigram model and an
interpolated Kneser-Ney 5-gram, scored on the test stream (the published convention) and with the
history emptied at every block boundary (the conditioning the neural models get).

Models, trained on the same data stream (random crops of `block_size` tokens, same seed), with the same
optimiser recipe (AdamW, warm-up + cosine, clip 1.0) and the same number of tokens, matched in trained
parameters (within 10 %, checked), each at its best learning rate from a short sweep on the validation split:

    gpt2-ar           GPT2LMHeadModel: exact likelihood
    mdlm-transformer  a bidirectional pre-LN Transformer with rotary positions (MDLM's DiT layout, without
                      noise conditioning) under the absorbing continuous-time NELBO (MDLM)
    sfdlm-absorbing   SFDLM, absorbing process, log-linear schedule, continuous-time NELBO
    sfdlm-uniform     SFDLM, uniform process (the paper's), UDLM/Duo reverse kernel, continuous time
    sedd-absorbing    the SFDLM backbone trained as SEDD (score entropy, absorbing graph)

plus the paper's ablations of sfdlm-uniform (no Fourier MLP, no SSM) at the same budget and seeds.
Diffusion figures are NELBO upper bounds (Monte Carlo over noise levels; the standard error is given).
On ptb-word, the seed-0 models are also measured for generation (samples' perplexity under the trained
AR model, unigram entropy, distinct-2 at 8/32/128 steps) and length generalisation (trained on blocks
of L tokens, scored on blocks of 4L and 16L; GPT-2's position table is extended with untrained rows, the
Transformer denoiser's rotary positions and SFDLM need none).

Each invocation writes one JSON (seeds and settings may run as separate invocations; `report.py` merges
them):

    python benchmarks/quality.py --setting ptb-word --seeds 0 1 2    # word level, 3 seeds
    python benchmarks/quality.py --setting ptb-char --seeds 0        # character level, 1 seed
    python benchmarks/quality.py --preset gpu ...                     # where a GPU is lent (bf16)

`--models-dir DIR` (e.g. benchmarks/results/models, ignored by git) keeps every trained model
(`save_pretrained`, with its training record); a later invocation with the same settings loads it instead
of training, so rows can be re-scored (say with more `--eval-samples`), and a killed lane run again does
not re-train the models it had finished.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time

import torch
import transformers
from transformers import GPT2LMHeadModel, get_cosine_schedule_with_warmup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ngram import KneserNeyModel, UnigramModel  # noqa: E402

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM  # noqa: E402
from hf_sfdlm.baselines import (TransformerDenoiserForDiffusionLM, count_parameters, matched_gpt2_config,  # noqa: E402
                                matched_transformer_denoiser_config)
from hf_sfdlm.evaluation import distinct_n, generative_perplexity, score_blocks, unigram_entropy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
EOS = "<eos>"
LN2 = math.log(2.0)

SETTINGS = {
    "ptb-word": dict(
        splits={"train": "ptb/ptb.train.txt", "valid": "ptb/ptb.valid.txt", "test": "ptb/ptb.test.txt"},
        unit="word", metric="test perplexity per word",
        anchors={"Kneser-Ney 5-gram (Mikolov & Zweig 2012)": 141.2,
                 "small 2-layer LSTM (Zaremba et al. 2014)": 114.5}),
    "ptb-char": dict(
        splits={"train": "ptb-char/ptb.char.train.txt.gz", "valid": "ptb-char/ptb.char.valid.txt.gz",
                "test": "ptb-char/ptb.char.test.txt.gz"},
        unit="character", metric="test bits per character", anchors={}),
}
MODELS = {
    "gpt2-ar": dict(kind="ar"),
    "mdlm-transformer": dict(kind="transformer", process="absorbing", noise_schedule="loglinear", num_timesteps=None),
    "sfdlm-absorbing": dict(kind="sfdlm", process="absorbing", noise_schedule="loglinear", num_timesteps=None),
    "sfdlm-uniform": dict(kind="sfdlm", process="uniform", noise_schedule="cosine", num_timesteps=None),
    "sedd-absorbing": dict(kind="sfdlm", process="absorbing", noise_schedule="loglinear", num_timesteps=None,
                           objective="score_entropy"),
}
ABLATIONS = {  # of sfdlm-uniform, the paper's Table 3
    "sfdlm-uniform no-fourier-mlp": dict(MODELS["sfdlm-uniform"], use_fourier_mlp=False),
    "sfdlm-uniform no-ssm": dict(MODELS["sfdlm-uniform"], use_ssm=False),
}
# Block diffusion (BD3-LM's objective, `SFDLMConfig.block_size` / `TransformerDenoiserConfig.block_size`): the same
# networks and parameters, trained block-causally; each takes its full-canvas model's learning rate.
BLOCK_MODELS = {
    f"{base} b{size}": dict(MODELS[base], block_size=size)
    for base in ("sfdlm-absorbing", "mdlm-transformer", "sfdlm-uniform") for size in (4, 16)
}
ALL_MODELS = {**MODELS, **ABLATIONS, **BLOCK_MODELS}
_CPU_MODEL = dict(hidden_size=128, fourier_intermediate_size=256, stage_depths=[1, 1], pool_factors=[2],
                  ssm_state_size=16, num_heads=4, batch_size=32, warmup=50, eval_samples=2, eval_batch_size=64,
                  device="cpu", dtype="float32")
PRESETS = {
    # Two CPU cores, the whole benchmark (5 models x 3 seeds + 2 ablations x 3 seeds on ptb-word,
    # 5 models x 1 seed on ptb-char, sweeps, generation, length generalisation) in about 100 minutes as
    # two single-thread lanes (`benchmarks/quality_cpu.sh`). Sized from single-thread timings with both
    # lanes busy (training tokens/s at ~2.1M parameters, word level: GPT-2 3.5k, SFDLM absorbing 3.6k,
    # SFDLM uniform 1.65k, MDLM and SEDD 2.8k; the 10k-word output layer is most of the cost). Lower
    # learning rates won every pilot at this length (1e-3 over 3e-3 over 1e-2), hence the sweep's range.
    "cpu": {
        "ptb-word": dict(_CPU_MODEL, block_size=64, steps=400, sweep_steps=100, lrs=[3e-4, 1e-3, 3e-3],
                         gen_samples=8, gen_steps=[8, 32, 128], length_factors=[4, 16]),
        "ptb-char": dict(_CPU_MODEL, block_size=256, steps=200, sweep_steps=50, lrs=[3e-4, 1e-3, 3e-3],
                         gen_samples=0, gen_steps=[], length_factors=[]),
    },
    # The `cpu` models with 4x the training tokens (1,600 steps), scored with 8 t samples per test block (two
    # replicates of 4) so every diffusion row's error bar is under 1 %; no sweep of its own (`--lr-from` the
    # `cpu` seed-0 JSON) and no extras. Single-thread step times with both lanes busy: see the README's plan.
    "cpu-long": {
        "ptb-word": dict(_CPU_MODEL, block_size=64, steps=1600, sweep_steps=100, lrs=[3e-4, 1e-3, 3e-3],
                         eval_samples=8, gen_samples=0, gen_steps=[], length_factors=[]),
    },
    # One GPU, bf16 autocast, >= 50M training tokens per model, under 30 minutes (never run in CI).
    "gpu": {
        setting: dict(_CPU_MODEL, hidden_size=512, fourier_intermediate_size=2048, stage_depths=[2, 2, 2],
                      pool_factors=[2, 2], ssm_state_size=64, num_heads=8, batch_size=128,
                      block_size=128 if setting == "ptb-word" else 512,
                      steps=4000 if setting == "ptb-word" else 800, sweep_steps=500, warmup=200,
                      lrs=[3e-4, 1e-3, 3e-3], eval_samples=16, eval_batch_size=128, device="cuda", dtype="bfloat16",
                      gen_samples=64 if setting == "ptb-word" else 0,
                      gen_steps=[8, 32, 128] if setting == "ptb-word" else [],
                      length_factors=[4, 16] if setting == "ptb-word" else [])
        for setting in SETTINGS
    },
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- data
def read_symbols(path: str) -> list[str]:
    """A split as one stream of symbols: each line's whitespace-separated symbols, then <eos>."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [symbol for line in handle for symbol in line.split() + [EOS]]


class SymbolVocabulary:
    """The closed vocabulary of a training split: symbol <-> id, sorted, <eos> included."""

    def __init__(self, train_symbols: list[str]):
        self.symbols = sorted(set(train_symbols))
        self.index = {symbol: i for i, symbol in enumerate(self.symbols)}
        self.eos_id = self.index[EOS]

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, symbols: list[str], split: str) -> torch.Tensor:
        unknown = sorted({s for s in symbols if s not in self.index})
        if unknown:
            raise ValueError(f"The {split} split has {len(unknown)} symbols outside the training vocabulary "
                             f"(first: {unknown[:5]}); a closed-vocabulary benchmark needs none.")
        return torch.tensor([self.index[s] for s in symbols], dtype=torch.long)


def load_setting(setting: str, data_dir: str) -> tuple[SymbolVocabulary, dict[str, torch.Tensor]]:
    streams = {split: read_symbols(os.path.join(data_dir, path)) for split, path in SETTINGS[setting]["splits"].items()}
    vocab = SymbolVocabulary(streams["train"])
    return vocab, {split: vocab.encode(symbols, split) for split, symbols in streams.items()}


def crops(ids: torch.Tensor, batch_size: int, block_size: int, steps: int, seed: int):
    """The same stream of random crops for every model of a setting and seed."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(block_size)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block_size, (batch_size,), generator=generator)
        yield ids[starts.unsqueeze(-1) + offsets]


def blocks_of(ids: torch.Tensor, block_size: int, whole_only: bool = False) -> list[torch.Tensor]:
    """Consecutive non-overlapping blocks covering the stream (the last one may be shorter, unless
    `whole_only`, which drops it)."""
    blocks = list(ids.split(block_size))
    return blocks[:-1] if whole_only and len(blocks[-1]) < block_size else blocks


# ---------------------------------------------------------------------------------------------- models
def sfdlm_config(preset: dict, vocab_size: int, **overrides) -> SFDLMConfig:
    # Every diffusion model gets one extra id: the mask (absorbing state, or the infilling marker).
    values = dict(vocab_size=vocab_size + 1, mask_token_id=vocab_size, hidden_size=preset["hidden_size"],
                  stage_depths=preset["stage_depths"], pool_factors=preset["pool_factors"],
                  ssm_state_size=preset["ssm_state_size"], fourier_intermediate_size=preset["fourier_intermediate_size"])
    values.update(overrides)
    return SFDLMConfig(**values)


def build_model(name: str, spec: dict, preset: dict, vocab_size: int, max_length: int):
    """The model `name`, accepting `max_length` tokens (GPT-2's position table gets untrained rows).

    Parameters are matched to sfdlm-absorbing at the training length `block_size`: GPT-2's position rows
    beyond it are extra, never trained, and not counted (`trained_parameters`)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "sfdlm":
        return SFDLMForDiffusionLM(sfdlm_config(preset, vocab_size, **spec))
    target = matching_target(preset, vocab_size)
    block = preset["block_size"]
    if kind == "transformer":
        config = matched_transformer_denoiser_config(target, vocab_size + 1, preset["hidden_size"], block,
                                                     num_heads=preset["num_heads"], mask_token_id=vocab_size, **spec)
        config.max_position_embeddings = max_length
        return TransformerDenoiserForDiffusionLM(config)
    config = matched_gpt2_config(target, vocab_size, preset["hidden_size"], block, num_heads=preset["num_heads"])
    config.n_positions = max_length + 1
    return GPT2LMHeadModel(config)


def matching_target(preset: dict, vocab_size: int) -> int:
    """The parameter count every model is matched to: sfdlm-absorbing's."""
    spec = {k: v for k, v in MODELS["sfdlm-absorbing"].items() if k != "kind"}
    return count_parameters(SFDLMForDiffusionLM(sfdlm_config(preset, vocab_size, **spec)))


def trained_parameters(model, preset: dict) -> int:
    """Parameters that training can reach: GPT-2's position rows beyond the training length (and its BOS)
    are excluded; the other models have no position table."""
    total = count_parameters(model)
    if not isinstance(model, GPT2LMHeadModel):
        return total
    return total - (model.config.n_positions - preset["block_size"] - 1) * model.config.hidden_size


def training_loss(model, kind: str, x: torch.Tensor, bos_id: int, generator: torch.Generator) -> torch.Tensor:
    """nats/token: exact NLL (AR, each crop after a BOS) or the NELBO (diffusion)."""
    if kind == "ar":
        inputs = torch.cat([torch.full_like(x[:, :1], bos_id), x], dim=1)
        labels = torch.cat([torch.full_like(x[:, :1], -100), x], dim=1)
        return model(input_ids=inputs, labels=labels).loss
    return model(x, labels=x, generator=generator).loss


def train(model, kind: str, stream, steps: int, lr: float, preset: dict, bos_id: int, seed: int) -> dict:
    """The one training loop for every model: AdamW, warm-up + cosine, clip 1.0."""
    device = preset["device"]
    dtype = getattr(torch, preset["dtype"])
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(preset["warmup"], steps // 10), steps)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    curve, tokens, start = [], 0, time.perf_counter()
    for step, x in enumerate(stream, 1):
        x = x.to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loss = training_loss(model, kind, x, bos_id, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step} (lr {lr})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += x.numel()
        if step % 10 == 0 or step == steps:
            curve.append({"step": step, "tokens": tokens, "loss": loss.item(),
                          "seconds": round(time.perf_counter() - start, 3)})
    model.eval()
    seconds = time.perf_counter() - start
    return {"tokens_seen": tokens, "train_seconds": seconds, "tokens_per_second": tokens / seconds, "curve": curve}


def nll(model, blocks: list[torch.Tensor], preset: dict, bos_id: int, seed: int) -> dict:
    """Total NLL in nats of `blocks` (exact for AR, NELBO for diffusion) with its Monte Carlo error."""
    if not blocks:
        raise ValueError("No block to score.")
    totals, variances = score_blocks(model, blocks, batch_size=preset["eval_batch_size"],
                                     num_samples=preset["eval_samples"], seed=seed, bos_token_id=bos_id)
    tokens = sum(len(b) for b in blocks)
    return {"total_nll": float(totals.sum()), "total_nll_stderr": float(variances.sum().sqrt()), "tokens": tokens,
            "nll_per_token": float(totals.sum()) / tokens, "blocks": len(blocks), "block_size": len(blocks[0])}


def figures(result: dict, unit: str) -> dict:
    """Perplexity per word (word level) or bits per character, with their standard errors."""
    per, err = result["nll_per_token"], result["total_nll_stderr"] / result["tokens"]
    if unit == "word":
        return {"perplexity": math.exp(per), "perplexity_stderr": math.exp(per) * err}
    return {"bits_per_character": per / LN2, "bits_per_character_stderr": err / LN2}


# ---------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generation_quality(model, judge, preset: dict, bos_id: int, seed: int) -> list[dict]:
    """Unconditional samples of `block_size` tokens against steps, judged by the trained AR model.

    `steps` counts denoising network evaluations per sample: a block model spends them evenly over its
    L / b blocks (at least one step per block, so b = 4 at 8 steps takes 16), plus one commit pass per block."""
    if model.config.objective == "score_entropy":
        sampler = "tweedie"
    else:
        sampler = "ancestral" if model.config.process == "absorbing" else "uniform"
    block = getattr(model.config, "block_size", None)
    rows = []
    for steps in preset["gen_steps"]:
        per_call = steps if block is None else max(1, steps * block // preset["block_size"])
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        samples = model.generate(max_new_tokens=preset["block_size"], steps=per_call, sampler=sampler,
                                 num_return_sequences=preset["gen_samples"], generator=generator).cpu()
        seconds = time.perf_counter() - start
        samples = samples.clamp(max=judge.config.vocab_size - 1)  # a leftover mask id would be out of the judge's range
        rows.append({"sampler": sampler, "steps": steps if block is None else per_call * preset["block_size"] // block,
                     "steps_per_block": None if block is None else per_call, "seconds": seconds,
                     "gen_ppl": generative_perplexity(judge, samples, bos_token_id=bos_id),
                     "unigram_entropy": unigram_entropy(samples), "distinct_2": distinct_n(samples, 2)})
    return rows


@torch.no_grad()
def ar_reference_samples(judge, preset: dict, bos_id: int, seed: int) -> dict:
    """The AR model's own ancestral samples (KV cache) scored by itself: a reference, not a fair judge."""
    torch.manual_seed(seed)
    prompt = torch.full((preset["gen_samples"], 1), bos_id)
    out = judge.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                         max_new_tokens=preset["block_size"], min_new_tokens=preset["block_size"],
                         pad_token_id=bos_id, eos_token_id=None)[:, 1:]
    return {"sampler": "autoregressive (self-judged)", "steps": preset["block_size"],
            "gen_ppl": generative_perplexity(judge, out, bos_token_id=bos_id),
            "unigram_entropy": unigram_entropy(out), "distinct_2": distinct_n(out, 2)}


# ---------------------------------------------------------------------------------------------- driver
def sweep(name: str, spec: dict, setting: str, data: dict, preset: dict, vocab_size: int, bos_id: int) -> dict:
    """Short runs at each learning rate (seed 0), scored on the validation blocks: the best lr wins.

    Every candidate's validation nats/token is reported with its Monte Carlo standard error, and the winner's
    lead over each other candidate with the standard error of that paired difference (per-block differences
    on the same blocks: it counts both the Monte Carlo noise and the finite validation set). The choice is
    `resolved` when the lead over the runner-up exceeds 2 standard errors; otherwise the best point estimate is
    kept and the sweep is flagged unresolved (the report says so)."""
    valid = blocks_of(data["valid"], preset["block_size"])
    if preset.get("sweep_blocks"):
        valid = valid[:preset["sweep_blocks"]]
    tokens = sum(len(b) for b in valid)
    results, errors, per_block = {}, {}, {}
    for lr in preset["lrs"]:
        torch.manual_seed(0)
        model = build_model(name, spec, preset, vocab_size, preset["block_size"])
        stream = crops(data["train"], preset["batch_size"], preset["block_size"], preset["sweep_steps"], seed=0)
        try:
            train(model, spec["kind"], stream, preset["sweep_steps"], lr, preset, bos_id, seed=0)
            totals, variances = score_blocks(model, valid, batch_size=preset["eval_batch_size"],
                                             num_samples=preset["eval_samples"], seed=0, bos_token_id=bos_id)
            results[lr], errors[lr] = float(totals.sum()) / tokens, float(variances.sum().sqrt()) / tokens
            per_block[lr] = totals
        except FloatingPointError as error:
            results[lr], errors[lr] = math.inf, 0.0
            log(f"  {name} lr {lr}: {error}")
        log(f"  sweep {setting} / {name}: lr {lr:g} -> valid {results[lr]:.4f} ± {errors[lr]:.4f} nats/token")
    best = min(results, key=results.get)
    leads = {}
    for lr in results:
        if lr == best or lr not in per_block:
            continue
        differences = per_block[lr] - per_block[best]  # same blocks: paired
        leads[f"{lr:g}"] = {"nats_per_token": float(differences.sum()) / tokens,
                            "stderr": float(differences.std() * math.sqrt(len(differences))) / tokens}
    runner_up = min(leads.values(), key=lambda lead: lead["nats_per_token"], default=None)
    resolved = runner_up is None or runner_up["nats_per_token"] > 2 * runner_up["stderr"]
    if not resolved:
        log(f"  sweep {setting} / {name}: UNRESOLVED, lead {runner_up['nats_per_token']:.4f} ± {runner_up['stderr']:.4f}")
    return {"lrs": {f"{lr:g}": v for lr, v in results.items()}, "stderr": {f"{lr:g}": e for lr, e in errors.items()},
            "lead_of_best": leads, "resolved": resolved, "best_lr": best, "steps": preset["sweep_steps"],
            "validation_blocks": len(valid), "validation_tokens": tokens}


def run_model(name: str, spec: dict, setting: str, data: dict, preset: dict, vocab_size: int, bos_id: int,
              lr: float, seed: int, length_generalisation: bool = True,
              models_dir: str | None = None) -> tuple[dict, torch.nn.Module]:
    """Train `name` (or load it from `models_dir`, where a finished training left it) and score it."""
    factors = preset["length_factors"] if length_generalisation else []
    max_length = preset["block_size"] * max([1] + factors)
    saved = os.path.join(models_dir, f"{name.replace(' ', '-')}_seed{seed}") if models_dir else None
    if saved and os.path.exists(os.path.join(saved, TRAINING_FILE)):
        record, model = load_trained(saved, spec, preset, lr, max_length)
        log(f"{setting} / {name} / seed {seed}: loaded from {saved} (trained {record['train_seconds']:.0f} s)")
    else:
        record, model = train_model(name, spec, setting, data, preset, vocab_size, bos_id, lr, seed, max_length)
        if saved:
            save_trained(model, record, preset, max_length, saved)
    start = time.perf_counter()
    record["test"] = nll(model, blocks_of(data["test"], preset["block_size"]), preset, bos_id, seed)
    record["test"].update(figures(record["test"], SETTINGS[setting]["unit"]))
    record["eval_seconds"] = time.perf_counter() - start
    log(f"  test {record['test']} (train {record['train_seconds']:.0f} s)")
    if factors:  # k = 1 is the test figure above; longer blocks drop the stream's last partial block
        unit = SETTINGS[setting]["unit"]
        record["length_generalisation"] = [{"factor": 1, **figures(record["test"], unit)}] + [
            {"factor": k, **figures(nll(model, blocks_of(data["test"], k * preset["block_size"], whole_only=True),
                                        longer_blocks(preset, k), bos_id, seed), unit)}
            for k in factors if len(data["test"]) >= k * preset["block_size"]]
    return record, model


def train_model(name: str, spec: dict, setting: str, data: dict, preset: dict, vocab_size: int, bos_id: int,
                lr: float, seed: int, max_length: int) -> tuple[dict, torch.nn.Module]:
    """Build `name` from seed `seed` and train it on the seed's crops; the record holds everything but scores."""
    torch.manual_seed(seed)
    model = build_model(name, spec, preset, vocab_size, max_length)
    record = {"name": name, "setting": setting, "seed": seed, "kind": spec["kind"], "lr": lr,
              "spec": {k: v for k, v in spec.items() if k != "kind"},
              "parameters": trained_parameters(model, preset), "config": model.config.to_diff_dict()}
    record["parameter_ratio"] = record["parameters"] / matching_target(preset, vocab_size)
    if spec["kind"] != "sfdlm" and abs(record["parameter_ratio"] - 1) > 0.10:
        raise ValueError(f"{name} has {record['parameters']:,} trained parameters, more than 10 % from the target.")
    log(f"{setting} / {name} / seed {seed}: {record['parameters']:,} trained parameters, lr {lr:g}")
    stream = crops(data["train"], preset["batch_size"], preset["block_size"], preset["steps"], seed)
    record.update(train(model, spec["kind"], stream, preset["steps"], lr, preset, bos_id, seed))
    return record, model


# ---------------------------------------------------------------------------------------------- saved models
TRAINING_FILE = "training.json"
# The preset entries a trained model depends on: a saved model is reused only where all of them agree.
TRAINING_KEYS = ("hidden_size", "fourier_intermediate_size", "stage_depths", "pool_factors", "ssm_state_size",
                 "num_heads", "batch_size", "warmup", "block_size", "steps", "dtype")
MODEL_CLASSES = {"sfdlm": SFDLMForDiffusionLM, "transformer": TransformerDenoiserForDiffusionLM, "ar": GPT2LMHeadModel}


def save_trained(model, record: dict, preset: dict, max_length: int, path: str) -> None:
    """`save_pretrained` weights and config plus the training record, written in a temporary folder that is
    renamed into place: a run killed while saving leaves no half-written model to load."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, TRAINING_FILE), "w") as handle:
        json.dump({"record": record, "max_length": max_length,
                   "training": {key: preset[key] for key in TRAINING_KEYS}}, handle, indent=1)
    os.replace(tmp, path)


def load_trained(path: str, spec: dict, preset: dict, lr: float, max_length: int) -> tuple[dict, torch.nn.Module]:
    """A model saved by `save_trained`, after checking it was trained as this invocation would train it."""
    with open(os.path.join(path, TRAINING_FILE)) as handle:
        saved = json.load(handle)
    wanted = {key: preset[key] for key in TRAINING_KEYS} | {"lr": lr, "spec": {k: v for k, v in spec.items() if k != "kind"}}
    found = saved["training"] | {"lr": saved["record"]["lr"], "spec": saved["record"]["spec"]}
    differ = {key: f"saved {found.get(key)!r}, wanted {value!r}" for key, value in wanted.items() if found.get(key) != value}
    if differ:
        raise ValueError(f"{path} was trained with other settings ({differ}); remove it or use another --models-dir.")
    if saved["max_length"] < max_length:
        raise ValueError(f"{path} was saved for blocks of up to {saved['max_length']} tokens; scoring needs "
                         f"{max_length} (length generalisation): pass --no-extras or retrain.")
    model = MODEL_CLASSES[spec["kind"]].from_pretrained(path).to(preset["device"]).eval()
    return dict(saved["record"], loaded_from=os.path.basename(path)), model


def longer_blocks(preset: dict, factor: int) -> dict:
    """The preset for scoring blocks `factor` times longer: as many tokens per batch as at the training
    length (a uniform model's NELBO holds a few (batch, length, V) tensors: at 16 x 64 tokens, batch 64 and
    a 10k vocabulary that was over 20 GB)."""
    return dict(preset, eval_batch_size=max(1, preset["eval_batch_size"] // factor))


def count_based_baselines(setting: str, data: dict, vocab_size: int, block_size: int) -> list[dict]:
    train_ids, test_ids = data["train"].tolist(), data["test"].tolist()
    rows = []
    for name, model in (("unigram (add-one)", UnigramModel(train_ids, vocab_size)),
                        ("interpolated Kneser-Ney 5-gram", KneserNeyModel(train_ids, vocab_size, order=5))):
        for conditioning, reset in (("test stream", None), (f"blocks of {block_size}", block_size)):
            total = model.score(test_ids, reset_every=reset)
            result = {"total_nll": total, "total_nll_stderr": 0.0, "tokens": len(test_ids),
                      "nll_per_token": total / len(test_ids)}
            rows.append({"name": name, "conditioning": conditioning, **figures(result, SETTINGS[setting]["unit"])})
            log(f"{setting} / {name} ({conditioning}): {rows[-1]}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="ptb-word")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", choices=list(ALL_MODELS),
                        help="default: every full-canvas model, and the ablations on ptb-word (block models: by name)")
    parser.add_argument("--lr", type=float, help="skip the sweep and train every model at this learning rate")
    parser.add_argument("--lr-from", nargs="+", help="take each model's swept learning rate from these quality JSONs")
    parser.add_argument("--no-extras", dest="extras", action="store_false",
                        help="skip generation and length generalisation (measured on the first seed's models)")
    parser.add_argument("--steps", type=int, help="override the preset's training steps (smoke runs)")
    parser.add_argument("--eval-samples", type=int, help="override the preset's t samples per test block (even, >= 2)")
    parser.add_argument("--study", help="a name that keeps this invocation's rows in their own report section "
                                        "(e.g. `blocks`: models re-run side by side with one code version)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    parser.add_argument("--data-dir", default=DATA)
    parser.add_argument("--output", help="JSON path (default benchmarks/results/quality_<preset>_<setting>_seeds<..>.json)")
    parser.add_argument("--models-dir", help="save every trained model here (`save_pretrained`), and load instead of "
                                             "training where one trained with the same settings is saved: re-scores "
                                             "(e.g. with more --eval-samples) and resumes without re-training")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset][args.setting])
    if args.steps:
        preset.update(steps=args.steps, sweep_steps=max(1, args.steps // 4))
    if args.eval_samples:
        preset.update(eval_samples=args.eval_samples)
    if preset["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--preset gpu needs CUDA; no GPU is visible.")
    if preset["device"] == "cpu":
        torch.set_num_threads(args.threads)
    names = args.models or list(MODELS) + (list(ABLATIONS) if args.setting == "ptb-word" else [])
    specs = ALL_MODELS
    seeds = "-".join(map(str, args.seeds))
    study = f"_{args.study}" if args.study else ""
    output = args.output or os.path.join(HERE, "results", f"quality_{args.preset}_{args.setting}{study}_seeds{seeds}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    models_dir = os.path.join(args.models_dir, f"{args.preset}_{args.setting}") if args.models_dir else None

    started = time.perf_counter()
    vocab, data = load_setting(args.setting, args.data_dir)
    unit = SETTINGS[args.setting]["unit"]
    report = {
        "benchmark": "quality", "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
        "preset": args.preset, "setting": args.setting, "study": args.study, "unit": unit, "metric": SETTINGS[args.setting]["metric"],
        "settings": preset, "seeds": args.seeds, "anchors": SETTINGS[args.setting]["anchors"],
        "data": {split: len(ids) for split, ids in data.items()} | {"vocabulary": len(vocab)},
        "baselines": [], "sweeps": {}, "runs": [], "generation": [],
    }
    log(f"{args.setting}: vocabulary {len(vocab)}, {report['data']}")
    if 0 in args.seeds:
        report["baselines"] = count_based_baselines(args.setting, data, len(vocab), preset["block_size"])
    _save(report, output, started)
    learning_rates = choose_learning_rates(args, names, report, data, preset, len(vocab), vocab.eos_id, output, started)
    models_seed0 = {}
    for name in names:
        lr = learning_rates[name]
        for seed in args.seeds:  # length generalisation, like generation, on the first seed's models
            extras = args.extras and seed == args.seeds[0]
            record, model = run_model(name, specs[name], args.setting, data, preset, len(vocab), vocab.eos_id, lr, seed,
                                      length_generalisation=extras, models_dir=models_dir)
            report["runs"].append(record)
            if extras:
                models_seed0[name] = model
            _save(report, output, started)
    judge = models_seed0.get("gpt2-ar")
    if preset["gen_steps"] and judge is not None:
        for name, model in models_seed0.items():
            if name == "gpt2-ar" or name in ABLATIONS:
                continue
            log(f"generation quality: {name}")
            for row in generation_quality(model, judge, preset, vocab.eos_id, args.seeds[0]):
                report["generation"].append({"model": name, **row})
        report["generation"].append({"model": "gpt2-ar", **ar_reference_samples(judge, preset, vocab.eos_id, args.seeds[0])})
    _save(report, output, started)
    plot(report, output.replace(".json", ".png"))
    log(f"wrote {output} in {time.perf_counter() - started:.0f} s")
    return 0


def choose_learning_rates(args, names: list[str], report: dict, data: dict, preset: dict, vocab_size: int,
                          bos_id: int, output: str, started: float) -> dict[str, float]:
    """Every model's learning rate: `--lr`, or the sweeps of `--lr-from` (another invocation's JSON, so
    seeds can run in parallel processes without sweeping twice), or sweeps run here first, before any
    training. An ablation keeps sfdlm-uniform's rate (the full model's recipe), a block model its full-canvas
    model's."""
    if args.lr is not None:
        return {name: args.lr for name in names}
    if args.lr_from:
        for path in args.lr_from:
            with open(path) as handle:
                report["sweeps"].update(json.load(handle).get("sweeps", {}))
        report["lr_from"] = [os.path.relpath(path, os.path.dirname(output)) for path in args.lr_from]
    owners = {name: sweep_owner(name) for name in names}
    for name in dict.fromkeys(owners.values()):
        if name not in report["sweeps"]:
            if args.lr_from:
                raise SystemExit(f"{' '.join(args.lr_from)}: no sweep for {name!r}.")
            report["sweeps"][name] = sweep(name, MODELS[name], args.setting, data, preset, vocab_size, bos_id)
            _save(report, output, started)
    return {name: report["sweeps"][owner]["best_lr"] for name, owner in owners.items()}


def sweep_owner(name: str) -> str:
    """The full-canvas model whose swept learning rate `name` trains at."""
    if name in ABLATIONS:
        return "sfdlm-uniform"
    return name.split(" b")[0] if name in BLOCK_MODELS else name


def _save(report: dict, path: str, started: float) -> None:
    report["total_seconds"] = time.perf_counter() - started
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(report, handle, indent=1)
    os.replace(tmp, path)


def plot(report: dict, path: str) -> None:
    """Training loss (nats/token: NELBO bound for diffusion, exact NLL for AR) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in report["runs"]:
        ax.plot([c["tokens"] for c in run["curve"]], [c["loss"] for c in run["curve"]],
                label=f"{run['name']} (seed {run['seed']})", linewidth=1)
    for row in report["baselines"]:
        if row["conditioning"] == "test stream":
            value = math.log(row["perplexity"]) if "perplexity" in row else row["bits_per_character"] * LN2
            ax.axhline(value, linestyle="--", color="gray", linewidth=0.8)
            ax.annotate(f"{row['name']} (test)", (0, value), fontsize=7, color="gray")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("train loss, nats/token")
    ax.set_title(f"{report['setting']}: {report['command']}", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
