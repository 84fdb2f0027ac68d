"""How fast does a denoiser learn where its neighbours are? The choice of the Transformer denoiser's layout.

The data is a rule that only position can reveal: every block is k, k+1, k+2, ... (mod V) from a random
start k, so a masked token is its left neighbour + 1. The exact NLL of a block is log V for the start and 0
for the rest, and a context-free model can do no better than log V per token. Each model is trained under
the absorbing NELBO with the quality benchmark's recipe (`quality.train`: AdamW, warm-up + cosine, clip
1.0) at matched parameters, then scored (NELBO, 4 stratified draws per block) on held-out blocks:

    bert-post-ln         BERT's encoder (post-LN, learned position table, embedding LayerNorm): the layout
                         `TransformerDenoiserForDiffusionLM` had before
    rotary-pre-ln-0.02   the library's denoiser (pre-LN, rotary) with every linear layer normal(0, 0.02)
    rotary-pre-ln        the library's denoiser as shipped (PyTorch's default init for linear layers, as
                         MDLM's DiT)
    sfdlm                SFDLM under the same process (its SSM sees its neighbours from the first step)

    python benchmarks/denoiser_positions.py            # ~6 minutes on one thread
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys

import torch
import transformers
from torch import nn
from transformers import BertModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from common import save_report  # noqa: E402

from hf_sfdlm.baselines import TransformerDenoiserForDiffusionLM  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB, LENGTH, BATCH = 64, 32, 32


class BertPostLNDenoiser(TransformerDenoiserForDiffusionLM):
    """The earlier layout: transformers' `BertModel` (post-LN, position table) under the same head."""

    def __init__(self, config):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.bert.embeddings.word_embeddings = self.embed_tokens  # one tied embedding, as before
        self.layers, self.final_norm = nn.ModuleList(), nn.Identity()

    def denoise(self, noisy_input_ids, timesteps=None, attention_mask=None, positions=None):
        hidden = self.bert(input_ids=noisy_input_ids, attention_mask=attention_mask).last_hidden_state
        if positions is not None:
            hidden = hidden[positions]
        return self.diffusion.restrict_logits(self.lm_head(hidden))


def blocks(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (count, 1), generator=generator) + torch.arange(LENGTH)) % VOCAB


def build(name: str, preset: dict):
    benchmark_name = "sfdlm-absorbing" if name == "sfdlm" else "mdlm-transformer"
    spec = quality.MODELS[benchmark_name]
    model = quality.build_model(benchmark_name, spec, preset, VOCAB, LENGTH)
    if name == "bert-post-ln":
        model = BertPostLNDenoiser(model.config)
    if name == "rotary-pre-ln-0.02":
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                nn.init.normal_(module.weight, std=model.config.initializer_range)
                nn.init.zeros_(module.bias)
    return model, spec["kind"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "denoiser_positions.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = dict(quality.PRESETS["cpu"]["ptb-word"], block_size=LENGTH, batch_size=BATCH, steps=args.steps,
                  eval_samples=4)
    test = list(blocks(256, seed=10_000))
    rows = []
    for name in ("bert-post-ln", "rotary-pre-ln-0.02", "rotary-pre-ln", "sfdlm"):
        scores = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            model, kind = build(name, preset)
            stream = (blocks(BATCH, seed=seed * 100_000 + step) for step in range(args.steps))
            run = quality.train(model, kind, stream, args.steps, args.lr, preset, bos_id=0, seed=seed)
            scores.append(quality.nll(model, test, preset, bos_id=0, seed=seed)["nll_per_token"])
        rows.append({"model": name, "parameters": quality.count_parameters(model), "nats_per_token": scores,
                     "mean": statistics.mean(scores), "train_seconds_last_seed": run["train_seconds"]})
        print(f"{name:20s} {rows[-1]['parameters']:,} parameters: NELBO {statistics.mean(scores):.3f} nats/token "
              f"(seeds {', '.join(f'{s:.3f}' for s in scores)})", flush=True)
    report = {"benchmark": "denoiser_positions", "command": "python benchmarks/denoiser_positions.py "
              + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": args.threads},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "vocabulary": VOCAB, "block_size": LENGTH, "batch_size": BATCH, "steps": args.steps, "lr": args.lr,
              "exact_nll_nats_per_token": math.log(VOCAB) / LENGTH, "context_free_nats_per_token": math.log(VOCAB),
              "results": rows}
    save_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
