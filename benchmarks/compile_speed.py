"""`torch.compile(model)` against eager: forward, forward+backward, and one denoising step.

The model is the tiny preset's architecture (width 128, U-Net stages [2, 2], pooling 2, absorbing
process, float32). Timings interleave eager and compiled calls in every repeat, so machine load hits both
alike; the medians and their ratio are written to `results/compile_speed_<device>.json`, with the
one-off compilation time and the number of graph breaks `torch._dynamo.explain` finds in each call.

    python benchmarks/compile_speed.py                          # CPU, batch 8 x 256 tokens, ~3 minutes
    python benchmarks/compile_speed.py --batch 4 --length 128 --repeats 5 --name compile_speed_quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from common import write_json  # noqa: E402

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM  # noqa: E402

TINY_ARCHITECTURE = dict(hidden_size=128, stage_depths=[2, 2], pool_factors=[2], ssm_state_size=16,
                         fourier_intermediate_size=256, process="absorbing", num_timesteps=None,
                         noise_schedule="loglinear")


def build_model(vocab_size: int, device: str) -> SFDLMForDiffusionLM:
    config = SFDLMConfig(vocab_size=vocab_size, mask_token_id=vocab_size - 1, **TINY_ARCHITECTURE)
    torch.manual_seed(0)
    model = SFDLMForDiffusionLM(config).to(device)
    with torch.no_grad():  # open the adaLN-Zero gates, as after pretraining
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model


def workloads(model, ids, t, s):
    """name -> callable(module) for the three measured calls; `module` is the eager or compiled model."""

    def forward(module):
        with torch.no_grad():
            return module(input_ids=ids, timesteps=t).logits

    def forward_backward(module):
        model.zero_grad(set_to_none=True)
        loss = module(input_ids=ids, timesteps=t).logits.float().logsumexp(-1).mean()
        loss.backward()
        return loss

    def denoising_step(module):
        with torch.no_grad():
            logits = module(input_ids=ids, timesteps=t).logits
            schedule = model.diffusion.schedule
            probs = model.diffusion.reverse_probs(model.diffusion.x0_probs(logits, ids), ids,
                                                  schedule.alpha(s), schedule.alpha(t))
            return torch.multinomial(probs.flatten(0, 1), 1).view(ids.shape)

    return {"forward": forward, "forward_backward": forward_backward, "denoising_step": denoising_step}


def graph_breaks(function, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(function)(*args).graph_break_count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args.vocab_size, args.device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab_size - 1, (args.batch, args.length), generator=generator).to(args.device)
    ids[:, ::3] = args.vocab_size - 1  # a third of the positions masked
    t = torch.full((args.batch,), 0.5, device=args.device)
    s = torch.full((args.batch,), 0.45, device=args.device)
    calls = workloads(model, ids, t, s)

    breaks = {name: graph_breaks(lambda: call(model)) for name, call in calls.items()}
    torch._dynamo.reset()
    compiled = torch.compile(model)
    compile_seconds = {}
    for name, call in calls.items():  # the first call compiles (forward and backward graphs)
        start = time.perf_counter()
        call(compiled)
        compile_seconds[name] = time.perf_counter() - start
        call(model)  # warm-up for eager too
    times = {name: {"eager": [], "compiled": []} for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            for kind, module in (("eager", model), ("compiled", compiled)):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                call(module)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name][kind].append(time.perf_counter() - start)
    with torch.no_grad():  # the mask token's logit is -inf in both: compare the finite ones
        compiled_logits, eager_logits = compiled(input_ids=ids, timesteps=t).logits, model(input_ids=ids, timesteps=t).logits
        finite = torch.isfinite(eager_logits)
        max_difference = float((compiled_logits[finite] - eager_logits[finite]).abs().max())

    results = {}
    for name, pair in times.items():
        eager, compiled_time = statistics.median(pair["eager"]), statistics.median(pair["compiled"])
        results[name] = {"eager_seconds": eager, "compiled_seconds": compiled_time,
                         "speedup": eager / compiled_time, "first_call_seconds": compile_seconds[name],
                         "graph_breaks": breaks[name]}
        print(f"{name:17s} eager {eager * 1e3:8.1f} ms  compiled {compiled_time * 1e3:8.1f} ms  "
              f"speed-up {eager / compiled_time:4.2f}x  (compile {compile_seconds[name]:.0f} s, "
              f"{breaks[name]} graph breaks)")
    name = args.name or f"compile_speed_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    command = "python benchmarks/compile_speed.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    path = write_json(name, {"command": command, "settings": vars(args), "architecture": TINY_ARCHITECTURE,
                             "parameters": sum(p.numel() for p in model.parameters()),
                             "max_abs_logit_difference": max_difference, "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
