"""Training throughput and peak memory: SFDLM vs Transformer denoisers of equal parameter count.

All models train under the very same loop (`hf_sfdlm.trainer.DiffusionTrainer`), data (the synthetic
grammar corpus, word-level tokenizer), batch (tokens per step held fixed across lengths) and objective:
the absorbing-diffusion NELBO of `hf_sfdlm.diffusion.DiscreteDiffusion`. The Transformers, configured as
their users train them (dropout 0 like SFDLM, attention on the flash SDPA kernel; see
benchmarks/contenders.py), drive `DiscreteDiffusion.loss_terms` through the trainer's `compute_loss` hook:
`transformer`, a randomly initialised `BertForMaskedLM` (no noise-level input, as in MDLM's absorbing
setting), and `dit`, the MDLM-style DiT of benchmarks/contenders.py (adaLN on the noise level, rotary
positions) with a head tied to its embedding. Their depth and MLP width are chosen so their parameter
counts match the SFDLM's.

Each (model, sequence length) measurement runs in a fresh subprocess, alternating models, so peak memory
is that run's alone. Memory is reported two ways: the activations autograd saves for the backward pass
of one step (exact, from `saved_tensors_hooks`; this is what grows with length and batch), and the peak
resident set size of the process (Linux VmHWM; mostly libraries and allocator caching on CPU, so only a
coarse check). Throughput is tokens per second of process CPU time (one intra-op thread: the machine is
shared, and wall time would measure the neighbours) over the timed steps, after warm-up steps. Matmul FLOPs
per token come from `torch.utils.flop_counter` (FFTs are not counted, so the SFDLM figure is a lower
bound). On a CUDA device `--mixed-precision bf16` and model FLOPs
utilisation against `--peak-tflops` are reported too.

    python benchmarks/train_throughput.py                       # CPU, lengths 64 256 1024, ~10 minutes
    python benchmarks/train_throughput.py --lengths 64 --steps 10 --name train_throughput_quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODELS = ("sfdlm", "transformer", "dit")


# ---------------------------------------------------------------------------------------------- one run
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def sfdlm_model_config(args, tokenizer):
    from hf_sfdlm.pipelines import build_model_config
    from hf_sfdlm.train_config import TINY_MODEL

    return build_model_config(dict(TINY_MODEL, hidden_size=args.hidden_size,
                                   fourier_intermediate_size=2 * args.hidden_size), tokenizer)


def matched_bert_config(target: int, vocab_size: int, hidden: int, max_length: int):
    """A dropout-free BertConfig with `hidden` width whose parameter count is closest to `target`."""
    from transformers import BertConfig, BertForMaskedLM

    from contenders import match_depth_and_width

    def build(layers: int, intermediate: int) -> BertConfig:
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=max(1, hidden // 32), intermediate_size=intermediate,
                          max_position_embeddings=max_length, type_vocab_size=1, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)

    layers, intermediate = match_depth_and_width(lambda n, i: BertForMaskedLM(build(n, i)), target, hidden)
    return build(layers, intermediate)


def matched_dit(target: int, vocab_size: int, hidden: int):
    """The contenders' DiT with `hidden` width (head dim 32 at this small width) matched to `target`."""
    from contenders import DiTDenoiser, match_depth_and_width

    layers, intermediate = match_depth_and_width(lambda n, i: DiTDenoiser(hidden, n, i, 32, vocab_size),
                                                 target, hidden)
    return DiTDenoiser(hidden, layers, intermediate, 32, vocab_size)


def run_one(args) -> dict:
    """One measurement in this process; returns its record."""
    import torch

    from hf_sfdlm.diffusion import DiscreteDiffusion
    from hf_sfdlm.pipelines import build_model, prepare_pipeline
    from hf_sfdlm.train_config import TrainingConfig, load_config
    from hf_sfdlm.trainer import DiffusionTrainer, TrainerCallback

    torch.set_num_threads(args.threads)
    batch = max(1, args.tokens_per_step // args.length)
    out = Path(args.work_dir) / f"{args.model}-{args.length}"
    config = load_config(None, [f"training.output_dir={out}", f"data.block_size={args.length}",
                                f"data.synthetic_sentences={args.sentences}"])
    pipeline = prepare_pipeline(config)
    sfdlm_config = sfdlm_model_config(args, pipeline.tokenizer)
    diffusion = DiscreteDiffusion.from_config(sfdlm_config)
    if args.model == "sfdlm":
        model, compute_loss = build_model(sfdlm_config), None
    else:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from transformers import BertForMaskedLM

        target = sum(p.numel() for p in build_model(sfdlm_config).parameters())
        if args.model == "transformer":
            model = BertForMaskedLM._from_config(matched_bert_config(
                target, sfdlm_config.vocab_size, args.hidden_size, max(args.lengths_all)), attn_implementation="sdpa")
        else:
            model = matched_dit(target, sfdlm_config.vocab_size, args.hidden_size)

            def save_pretrained(directory, **kwargs):  # the trainer's final save, for this plain nn.Module
                from safetensors.torch import save_model

                Path(directory).mkdir(parents=True, exist_ok=True)
                save_model(model, str(Path(directory) / "model.safetensors"))
            model.save_pretrained = save_pretrained

        def compute_loss(model, batch):  # the same absorbing NELBO, driven by the Transformer's logits
            x0, scored = batch["input_ids"], batch["labels"] != -100
            draw = diffusion.draw_noise(x0.shape[0], device=x0.device)
            noisy = diffusion.corrupt(x0, diffusion.schedule.alpha(draw.t), corruptible=scored)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                if args.model == "transformer":
                    logits = model(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
                else:
                    logits = F.linear(model(noisy, draw.t), model.embed_tokens.weight)
            return (diffusion.loss_terms(logits, x0, noisy, draw) * scored).sum() / scored.sum()

    parameters = sum(p.numel() for p in model.parameters())
    flops_per_token, activation_mib = probe_step(model, compute_loss, pipeline, batch, args.length)

    times: list[float] = []
    peak = {}

    class Clock(TrainerCallback):  # the timed window ends before the run's final checkpoint and save
        def on_step_end(self, trainer, step, loss):
            if trainer.accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.process_time())
            if step == args.warmup + args.steps:
                peak["rss"] = _rss_kib("VmHWM")

    training = TrainingConfig(output_dir=str(out), max_steps=args.warmup + args.steps, batch_size=batch,
                              warmup_steps=0, eval_every=0, checkpoint_every=10**9, log_every=10**6,
                              log_with=[], progress_bar=False, ema_decay=None, save_best=False,
                              mixed_precision=args.mixed_precision)
    trainer = DiffusionTrainer(model, training, pipeline.train_dataset, tokenizer=pipeline.tokenizer,
                               compute_loss=compute_loss, callbacks=[Clock()],
                               accelerator_kwargs={"cpu": args.device == "cpu"})
    if trainer.accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup_rss = _rss_kib("VmRSS")
    _reset_peak_rss()  # the peak from here on is what training itself needs on top of the built model
    trainer.train(overwrite=True)  # a benchmark scratch folder: a rerun replaces the last one
    seconds = times[-1] - times[args.warmup - 1]
    tokens = args.steps * batch * args.length
    record = {"model": args.model, "length": args.length, "batch": batch, "parameters": parameters,
              "tokens_per_second": tokens / seconds, "seconds_per_step": seconds / args.steps,
              "activation_mib": activation_mib, "peak_rss_mib": peak["rss"] / 1024,
              "setup_rss_mib": setup_rss / 1024, "training_rss_mib": (peak["rss"] - setup_rss) / 1024, "device": str(trainer.accelerator.device),
              "mixed_precision": args.mixed_precision, "flops_per_token": flops_per_token}
    if trainer.accelerator.device.type == "cuda":
        record["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if flops_per_token and args.peak_tflops:
            record["mfu"] = flops_per_token * record["tokens_per_second"] / (args.peak_tflops * 1e12)
    if flops_per_token:
        record["achieved_gflops"] = flops_per_token * record["tokens_per_second"] / 1e9
    if args.model == "transformer":
        record["bert_layers"] = model.config.num_hidden_layers
        record["bert_intermediate"] = model.config.intermediate_size
    if args.model == "dit":
        record["dit_blocks"] = len(model.blocks)
        record["dit_intermediate"] = model.blocks[0].mlp[0].out_features
    return record


def probe_step(model, compute_loss, pipeline, batch: int, length: int) -> tuple[float, float]:
    """One forward + backward on a copy of the model: matmul FLOPs per token (torch.utils.flop_counter; FFTs
    are not counted) and the bytes of the tensors autograd saves for the backward pass (activation memory,
    each storage counted once), in MiB."""
    import copy

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hf_sfdlm.data import DiffusionCollator

    probe = copy.deepcopy(model)
    collate = DiffusionCollator(pad_token_id=pipeline.tokenizer.pad_token_id)
    data = collate([pipeline.train_dataset[i] for i in range(batch)])
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = compute_loss(probe, data) if compute_loss else probe(**data).loss
        loss.backward()
    return counter.get_total_flops() / (batch * length), sum(saved.values()) / 2**20


# ---------------------------------------------------------------------------------------------- driver
def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model, marker in zip(MODELS, "os^"):
        rows = sorted((r for r in runs if r["model"] == model), key=lambda r: r["length"])
        lengths = sorted({r["length"] for r in rows})
        speed = [statistics.median(r["tokens_per_second"] for r in rows if r["length"] == n) for n in lengths]
        memory = [max(r["activation_mib"] for r in rows if r["length"] == n) for n in lengths]
        label = f"{model} ({rows[0]['parameters'] / 1e6:.2f}M params)"
        axes[0].plot(lengths, speed, marker=marker, label=label)
        axes[1].plot(lengths, memory, marker=marker, label=label)
    for axis, ylabel in zip(axes, ("training tokens / s", "activations saved for backward (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_ylim(bottom=0)
        axis.set_xlabel("sequence length (tokens per step held fixed)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("Training throughput and memory, same loop and objective (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--tokens-per-step", type=int, default=4096)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12, help="Timed steps per measurement.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first.")
    parser.add_argument("--repeats", type=int, default=1, help="Alternating measurements per (model, length).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: as the tiny preset).")
    parser.add_argument("--sentences", type=int, default=6000, help="Synthetic corpus size.")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="Peak dense TFLOP/s of the accelerator for MFU (H100 SXM bf16: 989).")
    parser.add_argument("--name", default="train_throughput_cpu")
    parser.add_argument("--work-dir", default="/tmp/sfdlm_train_throughput")
    parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)  # internal: run one measurement
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths_all = args.lengths
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")

    if args.one:
        args.model = args.one
        print("RECORD " + json.dumps(run_one(args)), flush=True)
        return 0

    from common import write_json

    started = time.time()
    runs = []
    for repeat in range(args.repeats):
        for length in args.lengths:
            for model in (MODELS if repeat % 2 == 0 else MODELS[::-1]):  # alternate the order
                command = [sys.executable, __file__, "--one", model, "--length", str(length)] + [
                    a for a in (argv if argv is not None else sys.argv[1:])]
                done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ,
                                      HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
                lines = [l for l in done.stdout.splitlines() if l.startswith("RECORD ")]
                if done.returncode != 0 or not lines:
                    raise RuntimeError(f"{model} at length {length} failed:\n{done.stderr[-3000:]}")
                record = json.loads(lines[-1][len("RECORD "):])
                record["repeat"] = repeat
                runs.append(record)
                print(f"{model:12s} L={length:5d} {record['tokens_per_second']:9.0f} tok/s  activations "
                      f"{record['activation_mib']:6.1f} MiB  peak RSS {record['peak_rss_mib']:5.0f} MiB "
                      f"(+{record['training_rss_mib']:.0f} for training)", flush=True)

    ratios = []
    for length in args.lengths:
        speed = {m: statistics.median(r["tokens_per_second"] for r in runs if r["model"] == m and r["length"] == length)
                 for m in MODELS}
        memory = {m: max(r["activation_mib"] for r in runs if r["model"] == m and r["length"] == length)
                  for m in MODELS}
        rss = {m: max(r["peak_rss_mib"] for r in runs if r["model"] == m and r["length"] == length) for m in MODELS}
        row = {"length": length, "sfdlm_tokens_per_second": speed["sfdlm"], "sfdlm_activation_mib": memory["sfdlm"],
               "sfdlm_peak_rss_mib": rss["sfdlm"]}
        for other in MODELS[1:]:
            row.update({f"{other}_tokens_per_second": speed[other],
                        f"speed_ratio_sfdlm_over_{other}": speed["sfdlm"] / speed[other],
                        f"{other}_activation_mib": memory[other],
                        f"activation_memory_ratio_sfdlm_over_{other}": memory["sfdlm"] / memory[other],
                        f"{other}_peak_rss_mib": rss[other]})
        ratios.append(row)
    command = "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {
        "command": command.strip(),
        "headline": [f"L={r['length']}: SFDLM {r['sfdlm_tokens_per_second']:.0f} tok/s; " + "; ".join(
                     f"{other} {r[f'{other}_tokens_per_second']:.0f} tok/s (SFDLM x{r[f'speed_ratio_sfdlm_over_{other}']:.2f}, "
                     f"activation memory x{r[f'activation_memory_ratio_sfdlm_over_{other}']:.2f})" for other in MODELS[1:])
                     for r in ratios],
        "config": {k: v for k, v in vars(args).items() if k not in ("one", "length", "lengths_all")},
        "seconds": round(time.time() - started, 1),
        "ratios": ratios,
        "runs": runs,
    }
    path = write_json(args.name, payload)
    plot(runs, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')} in {payload['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
