"""Cache memory of block generation (issue 23): the bytes the prefix occupies after every committed block.

A block-diffusion SFDLM (`block_size`) keeps the whole prefix in the forward SSMs' states, (SSM layers) x rows
x H x N/2 complex numbers, whatever the length. This script generates `--lengths` tokens (batch 1, `--steps`
steps per block) with an untrained model of the `cpu` quality preset's shape (V = 10,000) and records, through
`generate_blocks(cache_observer=...)`, the cache's bytes after the prompt and after every block; beside it, the
bytes a Transformer KV cache of the same width and depth (2 x layers x tokens x H float32) would hold. Weights
are random: memory does not depend on them. Timings are not the point (one loaded 2-core machine).

    python benchmarks/block_cache.py --lengths 1024 16384
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from hf_sfdlm import SFDLMConfig, SFDLMForDiffusionLM  # noqa: E402
from hf_sfdlm.generation_block import generate_blocks  # noqa: E402
from hf_sfdlm.modeling_sfdlm import BidirectionalDiagonalSSM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 16384])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = SFDLMConfig(vocab_size=10_001, mask_token_id=10_000, process="absorbing", noise_schedule="loglinear",
                         num_timesteps=None, hidden_size=128, fourier_intermediate_size=256, stage_depths=[1, 1],
                         pool_factors=[2], ssm_state_size=16, block_size=args.block_size)
    model = SFDLMForDiffusionLM(config).eval()
    layers = sum(isinstance(m, BidirectionalDiagonalSSM) for m in model.modules())
    runs = []
    for length in args.lengths:
        seen = []
        start = time.perf_counter()
        out = generate_blocks(model, torch.tensor([[1, 2, 3]]), max_new_tokens=length, steps=args.steps,
                              generator=torch.Generator().manual_seed(0),
                              cache_observer=lambda cache: seen.append((cache.nbytes(), int(cache.tokens.max()))))
        seconds = time.perf_counter() - start
        sizes = sorted({b for b, _ in seen})
        runs.append({"generated_tokens": out.shape[1] - 3, "blocks_committed": len(seen) - 1,
                     "tokens_in_cache_at_end": seen[-1][1], "cache_bytes_distinct_values": sizes,
                     "transformer_kv_cache_bytes_same_width_depth": 2 * layers * seen[-1][1] * config.hidden_size * 4,
                     "seconds": round(seconds, 1)})
        print(runs[-1], flush=True)
    write_json("block_cache", {
        "command": "python benchmarks/block_cache.py " + " ".join(sys.argv[1:]),
        "model": {"hidden_size": 128, "ssm_state_size": 16, "ssm_layers": layers, "vocab_size": 10_001,
                  "block_size": args.block_size, "steps_per_block": args.steps, "dtype": "float32"},
        "note": "cache = the forward SSM states, (ssm_layers) x rows x hidden x state/2 complex64; measured after the "
                "prompt and after every committed block; weights untrained (memory does not depend on them); "
                "seconds are one loaded shared 2-core machine, single thread, not a speed benchmark",
        "runs": runs,
    })


if __name__ == "__main__":
    main()
