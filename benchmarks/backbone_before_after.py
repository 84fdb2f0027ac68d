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
    torch.manual_seed(0)
    models = {"before": module_at(args.before).SFDLMModel(config).train(), "after": today.SFDLMModel(config).train()}
    with torch.no_grad():  # open the adaLN-Zero gates, or every block is the identity and outputs agree trivially
        for parameter in models["before"].parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    models["after"].load_state_dict(models["before"].state_dict())
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
        times = {name: [] for name in models}
        for round_ in range(args.repeats):
            for name in (list(models) if round_ % 2 == 0 else list(models)[::-1]):
                times[name].append(step(models[name])[0])
        memory = {}
        for name, model in models.items():
            with PeakTensorMemory() as tracker:
                step(model)
            memory[name] = tracker.peak_mib
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        row = {"length": length, "before_ms": before * 1e3, "before_range_ms": [min(times["before"]) * 1e3,
               max(times["before"]) * 1e3], "after_ms": after * 1e3,
               "after_range_ms": [min(times["after"]) * 1e3, max(times["after"]) * 1e3], "speed_up": before / after,
               "before_peak_mib": memory["before"], "after_peak_mib": memory["after"],
               "max_relative_output_difference": difference}
        rows.append(row)
        print(f"L={length}: before {row['before_ms']:.0f} ms, {memory['before']:.0f} MiB; after {row['after_ms']:.0f} ms, "
              f"{memory['after']:.0f} MiB; x{row['speed_up']:.2f}; outputs differ by {difference:.1e}", flush=True)
    command = "python " + " ".join(["benchmarks/backbone_before_after.py"] + (sys.argv[1:] if argv is None else argv))
    headline = [f"L={r['length']}: forward+backward x{r['speed_up']:.2f} faster, peak memory "
                f"{r['before_peak_mib']:.0f} -> {r['after_peak_mib']:.0f} MiB" for r in rows]
    path = write_json(args.name, {"command": command, "headline": headline, "settings": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


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
        torch.manual_seed(0)
        models = {"before": module_at(args.before).SFDLMForDiffusionLM(config).eval()}
        with torch.no_grad():  # past adaLN-Zero, so the draws depend on the backbone
            for parameter in models["before"].parameters():
                parameter.add_(0.02 * torch.randn_like(parameter))
        models["after"] = today.SFDLMForDiffusionLM(config).eval()
        models["after"].load_state_dict(models["before"].state_dict())

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
        times = {name: [] for name in models}
        for round_ in range(args.repeats):
            for name in (list(models) if round_ % 2 == 0 else list(models)[::-1]):
                times[name].append(sample(models[name])[0])
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        rows.append({"length": length, "batch": args.batch, "steps": args.sample, "before_s": before,
                     "before_range_s": [min(times["before"]), max(times["before"])], "after_s": after,
                     "after_range_s": [min(times["after"]), max(times["after"])], "speed_up": before / after,
                     "max_relative_logit_difference": difference, "share_of_equal_tokens_drawn": agreement})
        print(f"L={length}, batch {args.batch}, {args.sample} steps: before {before:.2f} s, after {after:.2f} s, "
              f"x{before / after:.2f}", flush=True)
    command = "python " + " ".join(["benchmarks/backbone_before_after.py"] + (sys.argv[1:] if argv is None else argv))
    headline = [f"L={r['length']}, batch {r['batch']}, {r['steps']} steps: sampling x{r['speed_up']:.2f} faster "
                f"(process CPU time, median of {args.repeats} alternating rounds)" for r in rows]
    path = write_json(args.name, {"command": command, "headline": headline, "settings": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
