"""The models the speed benchmarks race, each configured as its users would train it.

- `sfdlm`: the SFDLM backbone (`SFDLMModel`): a U-Net of `blocks` SSM + Fourier-MLP blocks, no pooling.
- `bert`: transformers' `BertModel` encoder with dropout 0 (as SFDLM trains; dropout on the attention
  probabilities would force SDPA's slow math kernel), SDPA attention, no pooler, no noise conditioning
  (MDLM's absorbing setting does without it).
- `dit`: a DiT-style denoiser as in MDLM, written here: adaLN-Zero blocks conditioned on the noise
  level, rotary positions, bias-free QKV, SDPA, GELU(tanh) MLP, an adaLN final norm.

The Transformers are parameter-matched to the SFDLM backbone: same width, and the depth and MLP width whose
parameter count (position-embedding tables excluded, since BERT's grows with the maximum length) is
closest to SFDLM's, preferring the usual 4x MLP. Every model maps (ids, noise levels) to hidden states
(B, L, H); no vocabulary head. Their attention runs under `sdpa_kernel(FLASH_ATTENTION)`, the fastest
kernel on CPU and on CUDA, so a configuration that would fall back to the math kernel fails loudly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_sfdlm.baselines import rotary_tables, rotate

MODELS = ("sfdlm", "bert", "dit")
VOCAB = 1024


# ---------------------------------------------------------------------------------------------- DiT
class DiTBlock(nn.Module):
    """x + g1 * Attn(adaLN(x)) ; x + g2 * MLP(adaLN(x)), shift/scale/gate from the noise embedding."""

    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(approximate="tanh"),
                                 nn.Linear(intermediate, hidden))
        self.modulation = nn.Linear(hidden, 6 * hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rotary) -> torch.Tensor:
        batch, length, hidden = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, *rotary), rotate(k, *rotary)
        attended = F.scaled_dot_product_attention(q, k, v)
        x = x + gate1 * self.attn_out(attended.transpose(1, 2).reshape(batch, length, hidden))
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiTDenoiser(nn.Module):
    """MDLM-style DiT backbone: token embedding, noise-level embedding, adaLN blocks, adaLN final norm."""

    def __init__(self, hidden: int, layers: int, intermediate: int, head_dim: int = 64, vocab_size: int = VOCAB):
        super().__init__()
        self.head_dim = head_dim
        self.embed_tokens = nn.Embedding(vocab_size, hidden)
        self.time_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, hidden // head_dim, intermediate) for _ in range(layers))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(hidden, 2 * hidden)

    def forward(self, input_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        from hf_sfdlm.modeling_sfdlm import timestep_embedding

        x = self.embed_tokens(input_ids)
        cond = F.silu(self.time_embed(timestep_embedding(timesteps, x.shape[-1]).to(x.dtype)))
        rotary = rotary_tables(input_ids.shape[1], self.head_dim, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, cond, rotary)
        shift, scale = self.final_modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        return self.final_norm(x) * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------- building
def sfdlm_backbone(hidden: int, blocks: int, max_length: int):
    from hf_sfdlm import SFDLMConfig, SFDLMModel

    third = max(1, blocks // 3)  # down (b/3) and up (b/3) stages around a bottleneck (b/3), no pooling
    config = SFDLMConfig(vocab_size=VOCAB, hidden_size=hidden, stage_depths=[third, third],
                         fourier_intermediate_size=4 * hidden, ssm_state_size=32, dropout=0.0,
                         max_position_embeddings=max_length)
    return SFDLMModel(config)


def bert_encoder(hidden: int, layers: int, intermediate: int, max_length: int):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=max(1, hidden // 64), intermediate_size=intermediate,
                        max_position_embeddings=max_length, type_vocab_size=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False)


def count_parameters(model: nn.Module) -> int:
    """Parameters, BERT's position-embedding table excluded (it grows with the maximum length)."""
    return sum(p.numel() for name, p in model.named_parameters() if "position_embeddings" not in name)


def match_depth_and_width(build, target: int, hidden: int) -> tuple[int, int]:
    """(layers, MLP width) of `build(layers, intermediate)` whose parameter count is closest to `target`;
    a 1 % parameter gap weighs as much as a 20 % departure from the usual 4x MLP."""
    def count(layers: int, intermediate: int) -> int:
        with torch.device("meta"):
            return count_parameters(build(layers, intermediate))

    best = None
    for layers in range(1, 25):
        base = count(layers, 32)
        per_unit = (count(layers, 64) - base) / 32
        intermediate = max(32, round((32 + (target - base) / per_unit) / 32) * 32)
        score = abs(count(layers, intermediate) - target) / target + 0.05 * abs(intermediate / hidden - 4) / 4
        if best is None or score < best[0]:
            best = (score, layers, intermediate)
    return best[1], best[2]


def build(kind: str, hidden: int = 256, blocks: int = 6, max_length: int = 4096) -> nn.Module:
    """One contender, parameter-matched to the SFDLM backbone of `hidden` width and `blocks` blocks."""
    if kind == "sfdlm":
        return sfdlm_backbone(hidden, blocks, max_length)
    with torch.device("meta"):
        target = count_parameters(sfdlm_backbone(hidden, blocks, max_length))
    if kind == "bert":
        layers, intermediate = match_depth_and_width(lambda n, i: bert_encoder(hidden, n, i, 512), target, hidden)
        return bert_encoder(hidden, layers, intermediate, max_length)
    if kind == "dit":
        layers, intermediate = match_depth_and_width(lambda n, i: DiTDenoiser(hidden, n, i), target, hidden)
        return DiTDenoiser(hidden, layers, intermediate)
    raise ValueError(f"Unknown contender {kind!r}; expected one of {MODELS}.")


def describe(kind: str, model: nn.Module) -> str:
    if kind == "bert":
        return f"BertModel, {model.config.num_hidden_layers} layers, MLP {model.config.intermediate_size}"
    if kind == "dit":
        return f"DiT, {len(model.blocks)} blocks, MLP {model.blocks[0].mlp[0].out_features}, rotary"
    blocks = sum(len(stage) for stage in (*model.down_stages, model.bottleneck, *model.up_stages))
    return f"SFDLM, {blocks} blocks, Fourier MLP {model.config.fourier_intermediate_size}"


def forward(kind: str, model: nn.Module, input_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, L, H) of one contender; attention on the flash SDPA kernel."""
    if kind == "sfdlm":
        return model(input_ids, timesteps=timesteps).last_hidden_state
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        if kind == "bert":
            return model(input_ids=input_ids).last_hidden_state
        return model(input_ids, timesteps)


def flop_counter():
    """torch's FlopCounterMode (matmuls, SDPA) plus FFTs counted as 2.5 n log2 n (real) / 5 n log2 n (complex)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten

    def real_fft(x_shape, dim, *args, out_shape=None, **kwargs) -> int:  # r2c: input real of size n
        n = math.prod(x_shape[d] for d in dim)
        return int(math.prod(x_shape) // n * 2.5 * n * math.log2(max(n, 2)))

    def real_ifft(x_shape, dim, *args, out_shape=None, **kwargs) -> int:  # c2r: output real of size n
        n = math.prod(out_shape[d] for d in dim)
        return int(math.prod(out_shape) // n * 2.5 * n * math.log2(max(n, 2)))

    def complex_fft(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
        n = math.prod(x_shape[d] for d in dim)
        return int(math.prod(x_shape) // n * 5 * n * math.log2(max(n, 2)))

    return FlopCounterMode(display=False, custom_mapping={aten._fft_r2c: real_fft, aten._fft_c2r: real_ifft,
                                                          aten._fft_c2c: complex_fft})


def count_flops(kind: str, model: nn.Module, batch: int, length: int, backward: bool) -> dict:
    """FLOPs of one forward (and backward) on a meta-device copy of the model: no compute, exact shapes."""
    import copy

    ghost = copy.deepcopy(model).to("meta")
    if kind == "sfdlm":
        ghost.check_inputs = lambda *args, **kwargs: None  # reads token ids' values, which meta has not
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    with flop_counter() as counter:
        out = forward(kind, ghost, ids, torch.zeros(batch, device="meta"))
        if backward:
            out.float().square().mean().backward()
    counts = counter.get_flop_counts()["Global"]
    fft = sum(v for op, v in counts.items() if "fft" in str(op))
    return {"total": counter.get_total_flops(), "fft": fft}

