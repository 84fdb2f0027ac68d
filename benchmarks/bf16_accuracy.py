"""How far bf16 autocast moves the backbones from float32: outputs and gradients, SFDLM against the DiT.

Both contenders of benchmarks/forward_scaling.py (width 256, parameter-matched), their weights perturbed
past the adaLN-Zero initialisation (zero gates would make every block the identity and hide the error),
the same token ids and noise levels. Under `torch.autocast("cpu", dtype=torch.bfloat16)` the Linear layers
run in bf16, SFDLM's FFTs, SSM kernel and spectrum products in float32 (`_fft_precision`). Reported: the
relative error ||bf16 - fp32|| / ||fp32|| of the final hidden states, and of the gradient of a fixed
random projection of them with respect to all parameters, per length.

    python benchmarks/bf16_accuracy.py --lengths 256 1024
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import contenders  # noqa: E402
from common import write_json  # noqa: E402


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.double() - reference.double()).norm() / reference.double().norm()).item()


def measure(kind: str, model: torch.nn.Module, ids: torch.Tensor, timesteps: torch.Tensor) -> dict:
    projection = torch.randn(ids.shape[0], ids.shape[1], model_width(model), generator=torch.Generator().manual_seed(1))
    results = {}
    for name, enabled in (("float32", False), ("bfloat16", True)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = contenders.forward(kind, model, ids, timesteps)
        (out.float() * projection).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[name] = (out.detach().float(), grads)
    return {"output_relative_error": relative_error(results["bfloat16"][0], results["float32"][0]),
            "gradient_relative_error": relative_error(results["bfloat16"][1], results["float32"][1])}


def model_width(model: torch.nn.Module) -> int:
    return model.embed_tokens.weight.shape[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.02, help="std of the weight perturbation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for length in args.lengths:
        torch.manual_seed(0)
        ids = torch.randint(0, contenders.VOCAB, (args.batch, length))
        timesteps = torch.rand(args.batch)
        for kind in ("sfdlm", "dit"):
            model = contenders.build(kind, 256, 6, max(length, 4096)).train()
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(args.scale * torch.randn_like(parameter))
            row = {"model": kind, "length": length, **measure(kind, model, ids, timesteps)}
            rows.append(row)
            print(f"{kind:6s} L={length:5d}: output {row['output_relative_error']:.2e}, "
                  f"gradient {row['gradient_relative_error']:.2e}", flush=True)
    command = "python " + " ".join(["benchmarks/bf16_accuracy.py"] + (sys.argv[1:] if argv is None else argv))
    path = write_json("bf16_accuracy", {"command": command, "settings": vars(args), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
