"""Baselines measured against SFDLM under the same data, tokenizer and budget.

* `TransformerDenoiserForDiffusionLM`: a randomly initialised bidirectional Transformer as MDLM's DiT
  builds it (pre-LayerNorm blocks, rotary positions, no position table; an MLM head tied to the
  embedding) trained and evaluated under `hf_sfdlm.diffusion.DiscreteDiffusion`, with the same
  `denoise` / `forward(labels=...)` / `nelbo` interface as `SFDLMForDiffusionLM`. With the absorbing
  process and the log-linear schedule in continuous time it is MDLM (arXiv 2406.07524). With
  `block_size` it is BD3-LM's block-diffusion Transformer (`denoise_blocks`: [x_t; x_0] under a block-causal
  mask; generation with a KV cache of the committed blocks), the matched baseline of SFDLM's block mode.
* `gpt2_config` / `matched_gpt2_config`: an autoregressive `GPT2LMHeadModel` whose parameter count
  matches a target (e.g. an SFDLM model's).

Importing this module registers `TransformerDenoiserConfig` with `AutoConfig` and the model with
`AutoModel` / `AutoModelForMaskedLM`, so saved denoisers load with `AutoModel.from_pretrained`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, BertConfig, GPT2Config, GPT2LMHeadModel,
                          PreTrainedModel)
from transformers.activations import ACT2FN
from transformers import initialization as init

from .block_diffusion import block_index, block_timesteps, num_blocks
from .configuration_sfdlm import NOISE_SCHEDULES, OBJECTIVES, PROCESSES
from .diffusion_lm import DiffusionLMMixin, DiffusionLMOutput
from .generation_sfdlm import SFDLMGenerationMixin
from .modeling_sfdlm import timestep_embedding


class TransformerDenoiserConfig(BertConfig):
    r"""The Transformer denoiser's configuration: `BertConfig`'s field names plus the diffusion fields of
    `SFDLMConfig`.

    Args:
        process (`str`, defaults to `"absorbing"`), num_timesteps (`int`, *optional*, defaults to `None`,
        continuous time), noise_schedule (`str`, defaults to `"loglinear"`), linear_beta_min,
        linear_beta_max, geometric_sigma_min, geometric_sigma_max, objective (`str`, defaults to `"elbo"`),
        mask_token_id (`int`, *optional*):
            As in `SFDLMConfig`; the defaults are MDLM's (absorbing, log-linear, continuous time).
        time_conditioning (`bool`, defaults to `False`):
            Add an MLP embedding of the noise level t to every input embedding. MDLM found the absorbing
            process needs none (the share of masks tells the level); the uniform process wants it.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps,
        initializer_range:
            As in `BertConfig`. `hidden_size / num_attention_heads` must be an even integer (rotary
            positions rotate pairs of features).
        max_position_embeddings (`int`, defaults to 512):
            The longest accepted input. Positions are rotary, so there is no table: a longer limit costs
            no parameters (the model was only trained on the lengths it saw).
        block_size (`int`, *optional*):
            Block diffusion, matched with `SFDLMConfig.block_size` (BD3-LM's layout): blocks of this many tokens
            from each row's first real token; a noisy block attends to itself and to the clean earlier blocks
            (the sequence runs as [x_t; x_0] with a block-causal mask, twice the length). `None`: full canvas.
        Dropout and BERT's token-type and position-table fields are not used.
    """

    model_type = "sfdlm_transformer_denoiser"

    def __init__(self, process: str = "absorbing", num_timesteps: int | None = None,
                 noise_schedule: str = "loglinear", linear_beta_min: float = 0.1, linear_beta_max: float = 20.0,
                 geometric_sigma_min: float = 1e-4, geometric_sigma_max: float = 20.0, objective: str = "elbo",
                 mask_token_id: int | None = None, time_conditioning: bool = False, block_size: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.block_size = block_size
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                       or block_size < 1):
            raise ValueError(f"`block_size` must be a positive integer or None, got {block_size!r}.")
        self.process = process
        self.num_timesteps = num_timesteps
        self.noise_schedule = noise_schedule
        self.linear_beta_min, self.linear_beta_max = linear_beta_min, linear_beta_max
        self.geometric_sigma_min, self.geometric_sigma_max = geometric_sigma_min, geometric_sigma_max
        self.objective = objective
        self.mask_token_id = mask_token_id
        self.time_conditioning = time_conditioning
        self.is_decoder = False
        if process not in PROCESSES:
            raise ValueError(f"`process` must be one of {PROCESSES}, got {process!r}.")
        heads = self.num_attention_heads
        if not (isinstance(heads, int) and heads > 0 and self.hidden_size % heads == 0
                and (self.hidden_size // heads) % 2 == 0):
            raise ValueError(f"`hidden_size` ({self.hidden_size}) must split into `num_attention_heads` ({heads}) heads "
                             f"of an even width (rotary positions rotate pairs of features).")
        if noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"`noise_schedule` must be one of {NOISE_SCHEDULES}, got {noise_schedule!r}.")
        if objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
        if num_timesteps is not None and (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int)
                                          or num_timesteps < 1):
            raise ValueError(f"`num_timesteps` must be a positive integer or None, got {num_timesteps!r}.")
        if process == "absorbing" and not (isinstance(mask_token_id, int) and 0 <= mask_token_id < self.vocab_size):
            raise ValueError(f"`process='absorbing'` needs `mask_token_id` in [0, vocab_size={self.vocab_size}), "
                             f"got {mask_token_id!r}.")


def rotary_tables(length: int, head_dim: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles of positions 0..length-1, each (length, head_dim / 2), base 10 000."""
    inverse = 1.0 / 10_000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(-1) * inverse
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of (B, heads, L, d): the two halves of each head as (re, im)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


class PreNormEncoderLayer(nn.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)): bidirectional self-attention with rotary queries and keys."""

    def __init__(self, config: TransformerDenoiserConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(hidden, config.intermediate_size), ACT2FN[config.hidden_act],
                                 nn.Linear(config.intermediate_size, hidden))

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(rotate(q, *rotary), rotate(k, *rotary), v, attn_mask=key_mask)
        x = x + self.attention_out(attended.transpose(1, 2).reshape(batch, length, hidden))
        return x + self.mlp(self.mlp_norm(x))


# As `SFDLMDiffusionLMOutput`: NELBO per scored token, logits of p_hat(x_0 | x_t), x_t and t.
TransformerDenoiserOutput = DiffusionLMOutput


class TransformerDenoiserForDiffusionLM(DiffusionLMMixin, SFDLMGenerationMixin, PreTrainedModel):
    """A bidirectional Transformer that predicts p_hat(x_0 | x_t), trained by the diffusion NELBO.

    The backbone is MDLM's DiT without adaLN: token embedding, pre-LayerNorm blocks with rotary positions,
    a final LayerNorm, and an output layer tied to the embedding. (It replaced BERT's post-LN encoder with
    a learned position table, which learns where its neighbours are far more slowly:
    `benchmarks/denoiser_positions.py`.)

    The diffusion-LM head (`forward(labels=...)`, `nelbo`, input checks) is the shared
    `diffusion_lm.DiffusionLMMixin` of `SFDLMForDiffusionLM`, so the estimator is the same draw for draw
    (same stratification, corruption and loss terms); this class adds the backbone and `denoise`.
    `generate` is SFDLM's (iterative denoising with the same samplers), so generation quality compares
    like with like.
    """

    config_class = TransformerDenoiserConfig
    config: TransformerDenoiserConfig
    _tied_weights_keys = {
        "lm_head.weight": "embed_tokens.weight",
    }

    def __init__(self, config: TransformerDenoiserConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PreNormEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        hidden = config.hidden_size
        self.time_embed = (nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                           if config.time_conditioning else None)
        self.init_diffusion()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Linear layers keep PyTorch's default initialisation, as in MDLM's DiT (normal(0, 0.02) learned
        more slowly: `benchmarks/denoiser_positions.py`); the embedding, tied to the output layer, and the
        LayerNorms get transformers' defaults."""
        if isinstance(module, nn.Linear) and module is not self.lm_head:
            fan_in = module.weight.shape[1]
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            return
        super()._init_weights(module)  # normal(0, initializer_range) weights, zero biases, unit LayerNorms

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, new_embeddings):
        self.embed_tokens = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def denoise(self, noisy_input_ids: torch.Tensor, timesteps: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) of p_hat(x_0 | x_t) for corrupted ids x_t at noise levels t.

        `positions` (B, L) bool: only the logits (N, V) at its N `True` entries, row-major; the output head
        runs at those positions only (generation asks for the positions it samples).
        """
        if getattr(self.config, "block_size", None) is not None:  # the input is its own clean context
            return self.denoise_blocks(noisy_input_ids, timesteps, attention_mask, noisy_input_ids, positions)
        self.check_inputs(noisy_input_ids, attention_mask, timesteps)
        embeds = self.embed_tokens(noisy_input_ids)
        if self.time_embed is not None:
            if timesteps is None:
                raise ValueError("This denoiser is noise-conditioned (`time_conditioning=True`): pass `timesteps`.")
            t = torch.as_tensor(timesteps, device=embeds.device, dtype=torch.float32).reshape(-1)
            t = t.expand(noisy_input_ids.shape[0])
            embeds = embeds + self.time_embed(timestep_embedding(t, self.config.hidden_size).to(embeds.dtype)).unsqueeze(1)
        rotary = rotary_tables(noisy_input_ids.shape[1], self.config.hidden_size // self.config.num_attention_heads,
                               embeds.device, embeds.dtype)
        key_mask = None
        if attention_mask is not None:  # padding is never attended to (an all-padding row attends to all, not to none: NaN)
            real = attention_mask.bool()
            key_mask = (real | ~real.any(-1, keepdim=True))[:, None, None, :]
        hidden = embeds
        for layer in self.layers:
            hidden = layer(hidden, rotary, key_mask)
        hidden = self.final_norm(hidden)
        if positions is not None:
            hidden = hidden[positions]
        return self.diffusion.restrict_logits(self.lm_head(hidden))


    def denoise_blocks(self, noisy_input_ids: torch.Tensor, timesteps, attention_mask: torch.Tensor | None,
                       clean_input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Block mode (`config.block_size`): logits (B, L, V) of every block from its noisy tokens at its noise
        level (`timesteps`: a number, (B,) or (B, blocks)) and the clean earlier blocks of `clean_input_ids`.

        BD3-LM's layout: one pass over [x_t; x_0] (2L positions, rotary positions 0..L-1 for both halves)
        with a block-causal mask: a noisy position attends to its own noisy block and to the clean blocks
        before it, a clean position to the clean blocks up to its own. Padding is never attended to.
        """
        self.check_inputs(noisy_input_ids, attention_mask)
        if clean_input_ids.shape != noisy_input_ids.shape:
            raise ValueError(f"`clean_input_ids` shape {tuple(clean_input_ids.shape)} does not match "
                             f"{tuple(noisy_input_ids.shape)}.")
        self.check_inputs(clean_input_ids, attention_mask)
        batch, length = noisy_input_ids.shape
        size = self.config.block_size
        blocks = block_index(noisy_input_ids, attention_mask, size)
        real = torch.ones_like(noisy_input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        embeds = self.embed_tokens(torch.cat([noisy_input_ids, clean_input_ids], dim=1))
        if self.time_embed is not None:
            t = block_timesteps(timesteps, batch, num_blocks(length, size), embeds.device)
            if t is None:
                raise ValueError("This denoiser is noise-conditioned (`time_conditioning=True`): pass `timesteps`.")
            t = torch.cat([t.gather(1, blocks), torch.zeros_like(t.gather(1, blocks))], dim=1)  # clean half: t = 0
            features = timestep_embedding(t.reshape(-1), self.config.hidden_size).to(embeds.dtype)
            embeds = embeds + self.time_embed(features).view(batch, 2 * length, -1)
        cos, sin = rotary_tables(length, self.config.hidden_size // self.config.num_attention_heads, embeds.device,
                                 embeds.dtype)
        rotary = (torch.cat([cos, cos]), torch.cat([sin, sin]))
        query_block, key_block = blocks.unsqueeze(-1), blocks.unsqueeze(-2)  # (B, L, 1), (B, 1, L)
        keys = real.unsqueeze(-2)
        noisy_rows = torch.cat([(query_block == key_block) & keys, (key_block < query_block) & keys], dim=-1)
        clean_rows = torch.cat([torch.zeros_like(noisy_rows[..., :length]), (key_block <= query_block) & keys], dim=-1)
        allowed = torch.cat([noisy_rows, clean_rows], dim=1)
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries: anything (never NaN; ignored)
        hidden = embeds
        for layer in self.layers:
            hidden = layer(hidden, rotary, allowed.unsqueeze(1))
        hidden = self.final_norm(hidden[:, :length])
        if positions is not None:
            hidden = hidden[positions]
        return self.diffusion.restrict_logits(self.lm_head(hidden))


    # ------------------------------------------------------------------ block mode: the KV cache of generation
    def new_block_cache(self, rows: int) -> "BlockKVCache":
        """An empty KV cache for block generation of `rows` rows (`generation_block`)."""
        return BlockKVCache(rows, len(self.layers))

    @torch.no_grad()
    def commit_blocks(self, cache: "BlockKVCache", rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Append whole clean blocks ids (len(rows), k * b) to the cache of `rows`, block by block at t = 0."""
        size = self.config.block_size
        for start in range(0, ids.shape[1] - size + 1, size):
            self._cached_pass(cache, rows, ids[:, start:start + size], None, commit=True)

    @torch.no_grad()
    def cached_block_logits(self, cache: "BlockKVCache", rows: torch.Tensor, ids: torch.Tensor, timesteps,
                            positions: torch.Tensor) -> torch.Tensor:
        """Logits at `positions` of the current noisy blocks ids (len(rows), b) of `rows`, from the cache."""
        hidden = self._cached_pass(cache, rows, ids, timesteps, commit=False)
        return self.diffusion.restrict_logits(self.lm_head(self.final_norm(hidden)[positions]))

    def _cached_pass(self, cache, rows, ids, timesteps, commit: bool) -> torch.Tensor:
        """One block through every layer, attending to itself and to the cached clean tokens of its row."""
        count, size = ids.shape
        embeds = self.embed_tokens(ids)
        if self.time_embed is not None:
            t = torch.zeros(count, device=ids.device) if commit else torch.as_tensor(timesteps, device=ids.device)
            t = t.to(torch.float32).reshape(-1).expand(count)
            features = timestep_embedding(t, self.config.hidden_size).to(embeds.dtype)
            embeds = embeds + self.time_embed(features).unsqueeze(1)
        lengths = [cache.lengths[int(r)] for r in rows]
        longest = max(lengths)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rotary_tables(longest + size, head_dim, ids.device, embeds.dtype)
        where = torch.tensor(lengths, device=ids.device).unsqueeze(-1) + torch.arange(size, device=ids.device)
        rotary = (cos[where].unsqueeze(1), sin[where].unsqueeze(1))  # each row's block at its own positions
        first_real = longest - torch.tensor(lengths, device=ids.device).unsqueeze(-1)  # the cache is left-padded
        past_mask = torch.arange(longest, device=ids.device) >= first_real
        allowed = torch.cat([past_mask, torch.ones(count, size, dtype=torch.bool, device=ids.device)], dim=-1)
        allowed = allowed[:, None, None, :]
        x = embeds
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(layer.attention_norm(x)).view(count, size, 3, layer.num_heads, -1)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            q, k = rotate(q, *rotary), rotate(k, *rotary)
            past_k, past_v = cache.stacked(index, rows, longest, k)
            attended = F.scaled_dot_product_attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2),
                                                      attn_mask=allowed)
            x = x + layer.attention_out(attended.transpose(1, 2).reshape(count, size, -1))
            x = x + layer.mlp(layer.mlp_norm(x))
            if commit:
                cache.append(index, rows, k, v)
        if commit:
            for r in rows.tolist():
                cache.lengths[r] += size
        return x


class BlockKVCache:
    """Keys (rotated) and values of the committed clean tokens of every layer, one tensor per row: it grows by
    2 x layers x b x hidden numbers per committed block (the SFDLM cache does not grow)."""

    def __init__(self, rows: int, layers: int):
        self.keys = [[None] * rows for _ in range(layers)]
        self.values = [[None] * rows for _ in range(layers)]
        self.lengths = [0] * rows
        self.tokens = torch.zeros(rows, dtype=torch.long)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.keys + self.values for t in layer if t is not None)

    def stacked(self, layer: int, rows: torch.Tensor, longest: int, like: torch.Tensor):
        """(len(rows), heads, longest, d) keys and values of `rows`, left-padded with zeros."""
        heads, dim = like.shape[1], like.shape[-1]
        keys = like.new_zeros(len(rows), heads, longest, dim)
        values = like.new_zeros(len(rows), heads, longest, dim)
        for i, r in enumerate(rows.tolist()):
            if self.keys[layer][r] is not None:
                n = self.keys[layer][r].shape[1]
                keys[i, :, longest - n:] = self.keys[layer][r]
                values[i, :, longest - n:] = self.values[layer][r]
        return keys, values

    def append(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for i, r in enumerate(rows.tolist()):
            old_k, old_v = self.keys[layer][r], self.values[layer][r]
            self.keys[layer][r] = k[i] if old_k is None else torch.cat([old_k, k[i]], dim=1)
            self.values[layer][r] = v[i] if old_v is None else torch.cat([old_v, v[i]], dim=1)
            if layer == 0:
                self.tokens[r] += k.shape[2]


# ---------------------------------------------------------------------------------------------- parameter matching
def count_parameters(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct trainable parameters (tied weights counted once); optionally without token embeddings."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    total = sum(p.numel() for p in params.values())
    if exclude_embeddings:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None and id(embeddings.weight) in params:
            total -= embeddings.weight.numel()
    return total


def gpt2_config(vocab_size: int, hidden_size: int, num_layers: int, max_length: int, num_heads: int = 4,
                intermediate_size: int | None = None, **kwargs) -> GPT2Config:
    """A `GPT2Config` for the AR baseline; `max_length` positions plus one for the BOS token.

    GPT-2's own special ids (50256) are dropped unless given, as the vocabulary may be smaller."""
    kwargs.setdefault("bos_token_id", None)
    kwargs.setdefault("eos_token_id", None)
    return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                      n_inner=intermediate_size, n_positions=max_length + 1, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, tie_word_embeddings=True, **kwargs)


def _parameters_on_meta(model_class, config) -> int:
    with torch.device("meta"):
        return count_parameters(model_class(config))


def _match_depth_and_width(build, model_class, target_parameters: int, hidden_size: int, max_layers: int):
    """The config `build(layers, mlp_width)` closest to `target_parameters`: for each depth the MLP width
    is solved for (parameters are affine in it); among depths that match within 1%, the one whose MLP
    width is closest to the usual 4 * hidden_size wins."""
    if isinstance(target_parameters, bool) or not isinstance(target_parameters, int) or target_parameters <= 0:
        raise ValueError(f"`target_parameters` must be a positive integer, got {target_parameters!r}.")
    candidates = []
    for layers in range(1, max_layers + 1):
        p1 = _parameters_on_meta(model_class, build(layers, hidden_size))
        p2 = _parameters_on_meta(model_class, build(layers, 2 * hidden_size))
        width = round(hidden_size + (target_parameters - p1) * hidden_size / (p2 - p1))
        width = min(max(width, max(1, hidden_size // 2)), 8 * hidden_size)
        config = build(layers, width)
        gap = abs(_parameters_on_meta(model_class, config) - target_parameters) / target_parameters
        candidates.append((max(gap, 0.01), abs(width - 4 * hidden_size), config))
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def matched_gpt2_config(target_parameters: int, vocab_size: int, hidden_size: int, max_length: int,
                        num_heads: int = 4, max_layers: int = 12, **kwargs) -> GPT2Config:
    """The `GPT2Config` of width `hidden_size` whose parameter count is closest to `target_parameters`.

    The width is kept (so token embeddings, which dominate small models over large vocabularies,
    are equal) and the depth and MLP width are chosen to match the rest.
    """
    return _match_depth_and_width(
        lambda layers, width: gpt2_config(vocab_size, hidden_size, layers, max_length, num_heads, width, **kwargs),
        GPT2LMHeadModel, target_parameters, hidden_size, max_layers)


def transformer_denoiser_config(vocab_size: int, hidden_size: int, num_layers: int, max_length: int,
                                num_heads: int = 4, intermediate_size: int | None = None,
                                **diffusion_kwargs) -> TransformerDenoiserConfig:
    """A `TransformerDenoiserConfig` without dropout (as the SFDLM presets)."""
    return TransformerDenoiserConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                     num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
                                     max_position_embeddings=max_length, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, type_vocab_size=1,
                                     tie_word_embeddings=True, **diffusion_kwargs)


def matched_transformer_denoiser_config(target_parameters: int, vocab_size: int, hidden_size: int,
                                        max_length: int, num_heads: int = 4, max_layers: int = 12,
                                        **diffusion_kwargs) -> TransformerDenoiserConfig:
    """The denoiser of width `hidden_size` closest to `target_parameters` (depth and MLP width)."""
    return _match_depth_and_width(
        lambda layers, width: transformer_denoiser_config(vocab_size, hidden_size, layers, max_length, num_heads,
                                                          width, **diffusion_kwargs),
        TransformerDenoiserForDiffusionLM, target_parameters, hidden_size, max_layers)


AutoConfig.register(TransformerDenoiserConfig.model_type, TransformerDenoiserConfig, exist_ok=True)
AutoModel.register(TransformerDenoiserConfig, TransformerDenoiserForDiffusionLM, exist_ok=True)
AutoModelForMaskedLM.register(TransformerDenoiserConfig, TransformerDenoiserForDiffusionLM, exist_ok=True)

__all__ = [
    "TransformerDenoiserConfig",
    "TransformerDenoiserForDiffusionLM",
    "TransformerDenoiserOutput",
    "count_parameters",
    "gpt2_config",
    "matched_gpt2_config",
    "matched_transformer_denoiser_config",
    "transformer_denoiser_config",
]
