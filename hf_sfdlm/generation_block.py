"""Cached block generation for block-diffusion SFDLM models (`config.block_size = b`).

`generate` of a block model produces the continuation one block of b tokens at a time. The prompt is
consumed once into a `BlockCache`: the state z of every forward SSM (H x N/2 complex numbers per layer and
row, whatever the length; `block_diffusion.py`). Each new block is a canvas of b positions denoised with
the ordinary samplers and `steps` steps (`generation_sfdlm`'s loop, unchanged: ancestral, confidence,
threshold, the uniform sampler with its greedy tail), every network evaluation reading the prefix from the
states only. A finished block is then committed by one clean pass at t = 0 that advances every state,
z <- dA^b z + sum_r dA^(b-1-r) dB u_r. So each block costs `steps` + 1 passes over b positions, and the
length is unbounded (no `max_position_embeddings` limit, no growing cache).

Blocks are aligned at each row's own first real token (the model has no positions), so rows of a ragged
batch sit at different block indices: the block holding a row's prompt end keeps the prompt tokens fixed
and generates the rest of it. `use_cache=False` is the reference path: every evaluation re-reads the whole
prefix (prompt and committed blocks, left-padded) with the uncached block-causal forward; it draws exactly
what the cached path draws. A row stops after the block in which it generated an EOS (later positions are
padding); `stopping_criteria` are asked after every block with the full sequences; a streamer gets, as in
full-canvas generation, `put` with the prompt, `put_draft` with the generated text so far after every block
(the columns every row has finished), then `put` with the final rest and `end()`. Mask tokens inside the prompt (infilling) are refused in
block mode: a block model only ever conditions on clean earlier blocks (use a full-canvas model to infill).

This file is "remote code": it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import torch

from .block_diffusion import BlockCache, BlockContext
from .generation_sfdlm import (DEFAULT_MAX_NEW_TOKENS, SAMPLERS, Denoiser, SFDLMGenerationOutput, _Plan, _Run,
                               requested_new_tokens)
from .sampling_sfdlm import MIN_TEMPERATURE


def _ssm_layers(model) -> list:
    """Every forward SSM of the backbone, in module order (each holds one state in the cache)."""
    return [m for m in model.model.modules() if hasattr(m, "log_neg_a_real") and hasattr(m, "kernel")]


def new_cache(model, rows: int, device) -> BlockCache:
    """An empty prefix: zero states for every SSM layer, (rows, H, N/2) complex in the model's precision."""
    states = {}
    for ssm in _ssm_layers(model):
        dtype = torch.complex128 if ssm.log_dt.dtype == torch.float64 else torch.complex64
        states[ssm] = torch.zeros(rows, *ssm.log_neg_a_real.shape, dtype=dtype, device=device)
    return BlockCache(states=states, tokens=torch.zeros(rows, dtype=torch.long, device=device))


def _clean_condition(model, rows: int, device):
    if model.model.time_embed is None:
        return None
    return model.model._noise_condition(torch.zeros(rows, dtype=torch.float64, device=device), rows, device)


@torch.no_grad()
def consume(model, cache: BlockCache, rows: torch.Tensor, ids: torch.Tensor) -> None:
    """Advance the states of `rows` over clean ids (len(rows), k * b): one pass over k blocks at t = 0."""
    size = model.config.block_size
    count = ids.shape[1] // size
    if count == 0 or len(rows) == 0:
        return
    context = BlockContext(count, cache.rows(rows), keep_final=True, tables=cache.tables)
    embeds = model.model.embed_tokens(ids).reshape(len(rows) * count, size, -1)
    model.model._backbone(embeds, _clean_condition(model, len(rows) * count, ids.device), block_context=context)
    cache.update(rows, context.final)
    cache.tokens[rows] += count * size


class _CachedNetwork:
    """Logits of the current block of some rows from their cached states (one pass over b positions)."""

    def __init__(self, model, cache: BlockCache):
        self.model, self.cache = model, cache

    def __call__(self, rows, canvas, t, positions):
        inner = self.model.model
        cond = None if inner.time_embed is None else inner._noise_condition(t, len(rows), canvas.device)
        hidden, _ = inner._backbone(inner.embed_tokens(canvas), cond,
                                    block_context=BlockContext(1, self.cache.rows(rows), tables=self.cache.tables))
        return self.model.diffusion.restrict_logits(self.model.lm_head(hidden[positions]))


class _UncachedNetwork:
    """The reference: the whole prefix (left-padded) and the current block through the uncached forward."""

    def __init__(self, model, prefixes: list):
        self.model, self.prefixes = model, prefixes

    def __call__(self, rows, canvas, t, positions):
        size = canvas.shape[1]
        prefixes = [self.prefixes[int(r)] for r in rows]
        longest = max(len(p) for p in prefixes)
        ids = canvas.new_zeros(len(rows), longest + size)
        mask = torch.zeros_like(ids)
        for i, prefix in enumerate(prefixes):
            ids[i, longest - len(prefix):longest] = prefix
            mask[i, longest - len(prefix):] = 1
        ids[:, longest:] = canvas
        timesteps = t.double() if getattr(self.model.config, "time_conditioning", True) else None
        if hasattr(self.model, "denoise_blocks"):  # a model with its own block mode (the Transformer denoiser)
            where = torch.cat([torch.zeros(len(rows), longest, dtype=torch.bool, device=ids.device), positions], 1)
            return self.model.denoise_blocks(ids, timesteps, mask, ids, positions=where)
        hidden = self.model.model(ids, attention_mask=mask, timesteps=timesteps).last_hidden_state[:, longest:]
        return self.model.diffusion.restrict_logits(self.model.lm_head(hidden[positions]))


class _BlockDenoiser(Denoiser):
    """`Denoiser` whose evaluations go to a block network that needs the row indices (for their states)."""

    def __init__(self, model, plan, config, logits_processor, network, active: torch.Tensor):
        super().__init__(model, plan, config, logits_processor)
        self.network, self.active = network, active

    def _evaluate(self, canvas, t, positions, rows) -> torch.Tensor:
        which = rows.nonzero().squeeze(-1)
        self.passes[which] += 1
        self.head_positions[which] += positions[which].sum(-1)
        with self.autocast:
            logits = self.network(self.active[which], canvas[which], t[which].float(), positions[which])
        return logits.float()


def _prompts(model, input_ids, attention_mask, config):
    """Each output row's real prompt tokens (a list of 1-D tensors), after the checks."""
    ids, mask = model._checked_inputs(input_ids, attention_mask)
    mask_id = model._resolve_mask_id(config)
    if mask_id is not None and bool((mask & (ids == mask_id)).any()):
        raise ValueError(f"The prompt holds mask tokens (id {mask_id}): block mode (`block_size`="
                         f"{model.config.block_size}) generates after the prompt only and does not infill; use a "
                         "full-canvas model (`block_size=None`) to fill masks inside a text.")
    repeats = config.num_return_sequences
    ids, mask = ids.repeat_interleave(repeats, 0), mask.repeat_interleave(repeats, 0)
    return ids, mask, [row[m] for row, m in zip(ids, mask)]


def _new_tokens(config, length: int) -> int:
    new = requested_new_tokens(config, length, default=DEFAULT_MAX_NEW_TOKENS)
    if new < 1:
        raise ValueError(f"Block generation needs `max_new_tokens` >= 1, got {new}.")
    return new


def generate_blocks(model, input_ids=None, attention_mask=None, generation_config=None, streamer=None,
                    logits_processor=None, stopping_criteria=None, generator=None, cache_observer=None, **kwargs):
    """`generate` of a block model (see the module docstring); the arguments are `generate`'s, plus
    `use_cache` (default True) among the keyword arguments. `cache_observer(cache)`, if given, is called
    after the prompt and after every committed block (the tests and the README measure the cache with it).
    """
    use_cache = kwargs.pop("use_cache", True)
    if not isinstance(use_cache, bool):
        raise TypeError(f"`use_cache` must be True or False, got {use_cache!r}.")
    config = model._prepare_generation_config(generation_config, **kwargs)
    size = model.config.block_size
    if config.block_length is not None and config.block_length != size:
        raise ValueError(f"`block_length`={config.block_length} differs from the model's `block_size`={size}: a block "
                         "model generates in its own blocks (leave `block_length` unset).")
    if config.output_history:
        raise ValueError("`output_history` is not supported in block mode (each block has its own canvas).")
    sampler_name = model._resolve_sampler(config)
    ids, _, prompts = _prompts(model, input_ids, attention_mask, config)
    rows, device = ids.shape[0], ids.device
    new = _new_tokens(config, ids.shape[1])
    generators = model._row_generators(generator, rows)
    eos_ids, pad_id = model._special_ids(config)
    mask_id = model._resolve_mask_id(config)
    sampler = SAMPLERS[sampler_name](config)

    offsets = [len(p) % size for p in prompts]  # prompt tokens inside each row's first generated block
    prefixes = [p[:len(p) - o] for p, o in zip(prompts, offsets)]  # the whole prompt blocks
    if use_cache:
        cache, commit, network = _cache_for(model, rows, device)
        for count in sorted({len(p) for p in prefixes}):
            group = torch.tensor([r for r, p in enumerate(prefixes) if len(p) == count], device=device)
            commit(group, torch.stack([prefixes[int(r)] for r in group]))
        if cache_observer is not None:
            cache_observer(cache)
    produced = [[] for _ in range(rows)]  # generated tokens of each row
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    passes = torch.zeros(rows, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(ids.cpu())
    needed = lambda r: new - len(produced[r])  # noqa: E731
    first = True
    while any(needed(r) > 0 and not finished[r] for r in range(rows)):
        active = torch.tensor([r for r in range(rows) if needed(r) > 0 and not finished[r]], device=device)
        canvas, free = _block_canvas(model, active, [prompts[r][len(prefixes[r]):] if first else None
                                                     for r in active.tolist()], size, mask_id, generators)
        plan = _Plan(canvas=canvas, free=free, attention=torch.ones_like(free),
                     block=torch.where(free, 0, -1), steps=[config.steps],
                     generators=[generators[r] for r in active.tolist()], sampler_name=sampler_name, mask_id=mask_id,
                     eos_ids=eos_ids, pad_id=pad_id, config=config, greedy=config.temperature < MIN_TEMPERATURE)
        denoiser = _BlockDenoiser(model, plan, config, logits_processor,
                                  network if use_cache else _UncachedNetwork(model, prefixes), active)
        block = _denoise(model, plan, sampler, denoiser)
        passes[active] += denoiser.passes
        if use_cache:  # commit: one clean pass advances every state
            commit(active, block)
            passes[active] += 1
            if cache_observer is not None:
                cache_observer(cache)
        for i, r in enumerate(active.tolist()):
            prefixes[r] = torch.cat([prefixes[r], block[i]])
            tokens = block[i][free[i]]
            produced[r].extend(tokens[:needed(r)].tolist())
            if eos_ids is not None and bool(torch.isin(tokens, eos_ids).any()):
                finished[r] = True
        first = False
        if stopping_criteria is not None:
            finished |= stopping_criteria(_sequences(ids, produced, new, pad_id), None).to(device).bool()
        ready = min(new if finished[r] else len(produced[r]) for r in range(rows))
        if streamer is not None and hasattr(streamer, "put_draft") and ready:
            final = _sequences(ids, produced, new, pad_id, eos_ids)  # what the output will hold (EOS applied)
            streamer.put_draft(final[:, ids.shape[1]:ids.shape[1] + ready].cpu())
    sequences = _sequences(ids, produced, new, pad_id, eos_ids)
    if streamer is not None:
        streamer.put(sequences[:, ids.shape[1]:].cpu())
        streamer.end()
    if not config.return_dict_in_generate:
        return sequences
    generated = torch.tensor(_generated_counts(produced, new, eos_ids), device=passes.device)
    return SFDLMGenerationOutput(sequences=sequences, num_forward_passes=passes,
                                 tokens_per_forward=generated / passes.clamp_min(1))


def _generated_counts(produced: list, new: int, eos_ids) -> list[int]:
    """Tokens each row generated, not counting the padding after its first generated EOS (as the full-canvas
    output's `tokens_per_forward`)."""
    eos = set() if eos_ids is None else set(eos_ids.tolist())
    counts = []
    for tokens in produced:
        tokens = tokens[:new]
        first_eos = next((i for i, token in enumerate(tokens) if token in eos), None)
        counts.append(len(tokens) if first_eos is None else first_eos + 1)
    return counts


def _cache_for(model, rows: int, device):
    """(cache, commit(rows, ids), network) of cached generation: SSM states for SFDLM, or the model's own
    cache when it has one (the Transformer denoiser's keys and values)."""
    if hasattr(model, "new_block_cache"):
        cache = model.new_block_cache(rows)

        def network(group, canvas, t, where):
            return model.cached_block_logits(cache, group, canvas, t, where)

        return cache, lambda group, ids: model.commit_blocks(cache, group, ids), network
    cache = new_cache(model, rows, device)
    return cache, lambda group, ids: consume(model, cache, group, ids), _CachedNetwork(model, cache)


def _denoise(model, plan: _Plan, sampler, denoiser) -> torch.Tensor:
    """The block's reverse chain on the sampler's time grid (`generation_sfdlm`'s step): its final canvas."""
    run = _Run.start(plan, denoiser, None, None)
    run.start_block()
    for t, s in sampler.time_grid(plan.config.steps):
        if not model._denoising_step(run, plan, sampler, 0, t, s):
            break
    return run.canvas


def _block_canvas(model, active: torch.Tensor, fixed: list, size: int, mask_id, generators):
    """The starting canvas (len(active), b) of the next block and its free positions: each row's `fixed`
    tokens (its prompt's end, in the first block) first, the rest from the prior (masks, or uniform draws
    from the row's own generator)."""
    canvas = torch.zeros(len(active), size, dtype=torch.long, device=active.device)
    free = torch.ones_like(canvas, dtype=torch.bool)
    for i, tokens in enumerate(fixed):
        if tokens is not None and len(tokens):
            canvas[i, :len(tokens)] = tokens
            free[i, :len(tokens)] = False
    if model.diffusion.process == "absorbing":
        canvas[free] = mask_id
    else:
        for i, r in enumerate(active.tolist()):
            count = int(free[i].sum())
            canvas[i, free[i]] = torch.randint(model.config.vocab_size, (count,), generator=generators[r],
                                               device=generators[r].device).to(canvas.device)
    return canvas, free


def _sequences(ids, produced, new: int, pad_id, eos_ids=None) -> torch.Tensor:
    """The input followed by `new` columns of generated tokens; after a row's first EOS (and where a row
    stopped early) the padding id."""
    fill = 0 if pad_id is None else pad_id
    out = torch.full((ids.shape[0], new), fill, dtype=torch.long, device=ids.device)
    for r, tokens in enumerate(produced):
        if tokens:
            out[r, :len(tokens)] = torch.tensor(tokens[:new], device=ids.device)
    if eos_ids is not None and pad_id is not None:
        is_eos = torch.isin(out, eos_ids)
        after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        out = out.masked_fill(after, pad_id)
    return torch.cat([ids, out], dim=1)


__all__ = ["consume", "generate_blocks", "new_cache"]
