"""The SFDLM backbone of another git revision against this one: forward+backward time and peak memory.

Loads `hf_sfdlm/modeling_sfdlm.py` as it was at `--before` (beside today's sibling modules) and today's,
builds both backbones with the same weights (width 256, 6 blocks, as benchmarks/forward_scaling.py),
checks that they compute the same outputs, then times one forward+backward of each per round, the order
alternating, in process CPU time on one thread, after a discarded warm-up; every parameter's version is
bumped after each step (untimed), as an optimiser step would, so parameter-keyed caches miss as in
training. Peak memory is the peak of tensor memory alive during one step (`common.PeakTensorMemory`).

    python benchmarks/backbone_before_after.py --before 43c7b1c --lengths 1024 4096

`--sample STEPS` times sampling instead: `generate(max_new_tokens=L, steps=STEPS)` of the whole absorbing
model (the old backbone under today's generation code, vocabulary 2,048, the sampling benchmark's width 128)
at `--batch` rows, same generator for both; the two models' logits must agree to float tolerance (checked;
their draws may still part where rounding flips a sample, the share of equal tokens is recorded); no
optimiser steps in between, so the SSM kernel cache hits as it does in real sampling.

    python benchmarks/backbone_before_after.py --before ac83a94 --sample 32 --batch 16 --lengths 256
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import PeakTensorMemory, as_after_an_optimiser_step, write_json  # noqa: E402


def module_at(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:hf_sfdlm/modeling_sfdlm.py"], cwd=HERE.parent,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "modeling_sfdlm_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("hf_sfdlm._modeling_before", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "hf_sfdlm"  # its relative imports resolve to today's sibling modules
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def same_weights(make_before, make_after):
    """Both models with the old one's weights, perturbed past adaLN-Zero (else every block is the identity
    and outputs agree trivially)."""
    torch.manual_seed(0)
    before = make_before()
    with torch.no_grad():
        for parameter in before.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    after = make_after()
    after.load_state_dict(before.state_dict())
    return {"before": before, "after": after}


def alternating_rounds(models: dict, timed, repeats: int) -> dict[str, list[float]]:
    """`timed(model)[0]` seconds of each model per round, the order alternating between rounds."""
    times = {name: [] for name in models}
    for round_ in range(repeats):
        for name in (list(models) if round_ % 2 == 0 else list(models)[::-1]):
            times[name].append(timed(models[name])[0])
    return times


def timing_row(times: dict[str, list[float]], unit: str, scale: float) -> dict:
    """Medians and [min, max] of before and after (in `unit`, seconds x `scale`) and the speed-up."""
    row = {}
    for name in ("before", "after"):
        row[f"{name}_{unit}"] = statistics.median(times[name]) * scale
        row[f"{name}_range_{unit}"] = [min(times[name]) * scale, max(times[name]) * scale]
    row["speed_up"] = row[f"before_{unit}"] / row[f"after_{unit}"]
    return row


def save(args, argv, headline: list[str], rows: list[dict]) -> int:
    command = "python " + " ".join(["benchmarks/backbone_before_after.py"] + (sys.argv[1:] if argv is None else argv))
    path = write_json(args.name, {"command": command, "headline": headline, "settings": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the old backbone")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--name", default="backbone_before_after")
    parser.add_argument("--sample", type=int, metavar="STEPS", help="time generate() with this many steps instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.sample is not None:
        return sample_before_after(args, argv)

    from hf_sfdlm import SFDLMConfig
    from hf_sfdlm import modeling_sfdlm as today

    config = SFDLMConfig(vocab_size=1024, hidden_size=256, stage_depths=[2, 2], fourier_intermediate_size=1024,
                         ssm_state_size=32, max_position_embeddings=max(args.lengths))
    models = same_weights(lambda: module_at(args.before).SFDLMModel(config).train(),
                          lambda: today.SFDLMModel(config).train())
    rows = []
    for length in args.lengths:
        ids, t = torch.randint(0, 1024, (args.batch, length)), torch.rand(args.batch)

        def step(model) -> tuple[float, torch.Tensor]:
            start = time.process_time()
            out = model(ids, timesteps=t).last_hidden_state
            out.square().mean().backward()
            model.zero_grad(set_to_none=True)
            seconds = time.process_time() - start
            as_after_an_optimiser_step(model)  # caches keyed on the parameters miss, as in training
            return seconds, out.detach()

        outputs = {name: step(model)[1] for name, model in models.items()}  # warm-up, discarded
        difference = ((outputs["before"] - outputs["after"]).abs().max() / outputs["before"].abs().max()).item()
        times = alternating_rounds(models, step, args.repeats)
        memory = {}
        for name, model in models.items():
            with PeakTensorMemory() as tracker:
                step(model)
            memory[name] = tracker.peak_mib
        row = {"length": length, **timing_row(times, "ms", 1e3), "before_peak_mib": memory["before"],
               "after_peak_mib": memory["after"], "max_relative_output_difference": difference}
        rows.append(row)
        print(f"L={length}: before {row['before_ms']:.0f} ms, {memory['before']:.0f} MiB; after {row['after_ms']:.0f} ms, "
              f"{memory['after']:.0f} MiB; x{row['speed_up']:.2f}; outputs differ by {difference:.1e}", flush=True)
    return save(args, argv, [f"L={r['length']}: forward+backward x{r['speed_up']:.2f} faster, peak memory "
                             f"{r['before_peak_mib']:.0f} -> {r['after_peak_mib']:.0f} MiB" for r in rows], rows)


def sample_before_after(args, argv) -> int:
    """Process CPU time of one `generate` call per round, before and after, alternating the order."""
    from hf_sfdlm import SFDLMConfig
    from hf_sfdlm import modeling_sfdlm as today

    if args.sample < 1:
        raise SystemExit(f"--sample needs a positive number of steps, got {args.sample}.")
    rows = []
    for length in args.lengths:
        config = SFDLMConfig(vocab_size=2049, mask_token_id=2048, hidden_size=128, fourier_intermediate_size=256,
                             stage_depths=[1, 1], max_position_embeddings=length)
        models = same_weights(lambda: module_at(args.before).SFDLMForDiffusionLM(config).eval(),
                              lambda: today.SFDLMForDiffusionLM(config).eval())

        def sample(model) -> tuple[float, torch.Tensor]:
            start = time.process_time()
            out = model.generate(max_new_tokens=length, steps=args.sample, num_return_sequences=args.batch,
                                 generator=torch.Generator().manual_seed(0))
            return time.process_time() - start, out

        ids = torch.randint(0, 2049, (2, length), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = {name: model(ids, timesteps=torch.full((2,), 0.5)).logits for name, model in models.items()}
        difference = ((logits["before"] - logits["after"]).abs().max() / logits["before"].abs().max()).item()
        if difference > 1e-4:
            raise SystemExit(f"before and after logits differ by {difference:.1e}: not the same model")
        drawn = {name: sample(model)[1] for name, model in models.items()}  # warm-up, discarded
        agreement = (drawn["before"] == drawn["after"]).double().mean().item()
        row = {"length": length, "batch": args.batch, "steps": args.sample,
               **timing_row(alternating_rounds(models, sample, args.repeats), "s", 1.0),
               "max_relative_logit_difference": difference, "share_of_equal_tokens_drawn": agreement}
        rows.append(row)
        print(f"L={length}, batch {args.batch}, {args.sample} steps: before {row['before_s']:.2f} s, after "
              f"{row['after_s']:.2f} s, x{row['speed_up']:.2f}", flush=True)
    return save(args, argv, [f"L={r['length']}, batch {r['batch']}, {r['steps']} steps: sampling x{r['speed_up']:.2f} "
                             f"faster (process CPU time, median of {args.repeats} alternating rounds)" for r in rows],
                rows)


if __name__ == "__main__":
    sys.exit(main())
