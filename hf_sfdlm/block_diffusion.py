"""Block diffusion for SFDLM: a block-causal backbone whose earlier blocks live in a fixed-size SSM state.

With `config.block_size = b` a sequence is cut into blocks of b tokens, counted from each row's first real
token (the last block may be shorter). Block j is denoised at its own noise level t_j from its own noisy
tokens and from the *clean* blocks before it (BD3-LM, arXiv 2503.09573). Inside a block everything is as in
the full-canvas model: the bidirectional SSM, the complex Fourier MLP over the block, pooling, adaLN from the
block's own t. Across blocks information flows forward only, and only through the forward-direction SSM of
each layer: the backward direction, D and the Fourier MLP never cross a boundary. The model has no position
table and the SSM kernel is translation invariant, so a block is simply run as a row of its own, plus one
extra term in every forward SSM: the contribution of all earlier blocks.

The cross-block term. The forward SSM of one channel is the convolution y_n = sum_{m <= n} K_{n-m} u_m with
K_l = 2 Re(C dB dA^l) (summed over the N/2 complex modes; `BidirectionalDiagonalSSM.kernel`). For position
n = s + r of a block that starts at s, split the sum at s:

    y_n = sum_{s <= m <= n} K_{n-m} u_m  +  cross_n,      cross_n = sum_{m < s} K_{n-m} u_m

    recurrence form:  cross_{s+r} = 2 Re(C dA^(r+1) z_s),   z_s = sum_{m < s} dA^(s-1-m) dB u_m,
                      z_{s+b} = dA^b z_s + w_s,             w_s = sum_{r < b} dA^(b-1-r) dB u_{s+r}
    FFT form:         cross = causal_conv(u, K) - blockwise_causal_conv(u, K[:b])   (one FFT of size >= 2L)

The first sum is the ordinary SSM run on the block alone; z_s (H x N/2 complex per layer) is the whole
prefix, exactly. It is the cache of generation: its size does not depend on the length. Both forms are
exact; this module uses the recurrence: block contributions w by one matmul with the b powers of dA
(O(L H N)), the boundary states by a log-depth parallel scan over the blocks (doubling: O(L/b log(L/b) H N)),
the cross terms by one matmul with the b powers again (O(L H N)). It is exactly block-causal by
construction (no FFT rounding leaks from later blocks) and it is the same arithmetic as the cached
generation. (The FFT form costs O(L log L H) and leaks rounding from every position into every other.)

Training, vectorised (no loop over blocks). Pass 1 runs the model on the clean sequence x_0 in block mode
(each block at t = 0), and each SSM layer records its cross terms; pass 2 runs the noisy blocks, each a row
(B * L/b, b) at its own t, and each SSM layer adds the cross terms pass 1 recorded for it (the prefix of a
noisy block is clean, so its cross term is exactly pass 1's). Gradients flow through both passes (as BD3-LM's
do through x_0's keys and values). The cost is two backbone passes, against one for the full-canvas model.
The loss is the full-canvas NELBO of each block at its own noise level, summed over blocks and divided by the
scored tokens: each block's term is an unbiased estimate of its conditional NELBO given the clean earlier
blocks, so the sum bounds -log p(x) of the block-wise chain. The noise is drawn by the full canvas's machinery
(`diffusion.draw_for_estimator`) with every block a row of its own (`block_rows`): training uses the full
canvas's law of t (`training_estimator`, stratified over all blocks of the batch) and, for absorbing x_0
models, runs the head at masked positions only; `nelbo` takes the same estimator names (the masked count
counts a block's own scored positions). With b >= L the one block is the row, and every draw is the full
canvas's.

This file is "remote code": it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .diffusion import (NoiseDraw, _carry_over_logits, draw_for_estimator, head_only_terms, invert_one_minus_alpha,
                        resolve_estimator, resolve_training_estimator, stratified_quantiles, uses_head_only)


def _no_autocast(x: torch.Tensor):
    if not torch.amp.is_autocast_available(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def _real_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def ssm_factors(ssm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log dA, dB, 2C) of the forward direction of a `BidirectionalDiagonalSSM`, each (H, N/2) complex, so
    that its forward kernel is K_l = Re(sum_modes 2C dB exp(l log dA)) (the zero-order hold of S4D, B = 1)."""
    dtype = _real_dtype(ssm.log_dt)
    dt = ssm.log_dt.to(dtype).exp().unsqueeze(-1)
    a = torch.complex(-ssm.log_neg_a_real.to(dtype).exp(), ssm.a_imag.to(dtype))
    log_da = dt * a
    db = torch.expm1(log_da) / a
    c2 = 2 * torch.complex(ssm.c[0, ..., 0].to(dtype), ssm.c[0, ..., 1].to(dtype))
    return log_da, db, c2


def _powers(log_da: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """dA^e for every exponent: (H, N, E) complex, from exp(e log dA) (accurate for large e, decaying)."""
    return torch.exp(log_da.unsqueeze(-1) * exponents.to(log_da.real.dtype))


def gain_table(log_da, db, length: int) -> torch.Tensor:
    """dA^(b-1-r) dB for r < b = `length`: (H, N, b) complex, what each input adds to the block's final state."""
    return db.unsqueeze(-1) * _powers(log_da, torch.arange(length - 1, -1, -1, device=log_da.device))


def block_contributions(log_da, db, u: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    """w = sum_r dA^(b-1-r) dB u_r of every block: u (R, nb, b, H) real -> (R, nb, H, N) complex (`gain`: the
    precomputed `gain_table`)."""
    if gain is None:
        gain = gain_table(log_da, db, u.shape[2])
    return torch.complex(torch.einsum("rjlh,hnl->rjhn", u, gain.real), torch.einsum("rjlh,hnl->rjhn", u, gain.imag))


def scan_states(log_da, w: torch.Tensor, block_length: int, initial: torch.Tensor | None,
                carried: torch.Tensor | None = None):
    """Boundary states of z_{j+1} = dA^b z_j + w_j from z_0 = `initial` (R, H, N) or 0 (`carried`: the
    precomputed `carried_table`).

    Returns (starts (R, nb, H, N): the state entering each block, final (R, H, N): after the last block), by
    a Hillis-Steele doubling scan: log2(nb) vectorised steps, each multiplying by a decaying power of dA.
    """
    num_blocks = w.shape[1]
    inclusive, shift = w, 1
    while shift < num_blocks:
        decay = torch.exp(log_da * (shift * block_length))
        inclusive = torch.cat([inclusive[:, :shift], inclusive[:, shift:] + decay * inclusive[:, :-shift]], dim=1)
        shift *= 2
    starts = torch.cat([torch.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], dim=1)
    final = inclusive[:, -1]
    if initial is not None:
        if carried is None:
            carried = carried_table(log_da, block_length, num_blocks)
        carried = initial.unsqueeze(1) * carried.permute(2, 0, 1).unsqueeze(0)  # (R, nb + 1, H, N)
        starts, final = starts + carried[:, :-1], final + carried[:, -1]
    return starts, final


def carried_table(log_da, block_length: int, num_blocks: int) -> torch.Tensor:
    """dA^(b j) for j = 0..nb: (H, N, nb + 1) complex, how an initial state decays to each boundary."""
    return _powers(log_da, block_length * torch.arange(num_blocks + 1, device=log_da.device))


def cross_table(log_da, c2, length: int) -> torch.Tensor:
    """2C dA^(r+1) for r < length: (H, N, length) complex, what a state contributes to each position."""
    return c2.unsqueeze(-1) * _powers(log_da, torch.arange(1, length + 1, device=log_da.device))


def cross_from_table(starts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Re(sum_modes table z): starts (R, nb, H, N) -> (R, nb, length, H) real."""
    return (torch.einsum("rjhn,hnl->rjlh", starts.real, table.real)
            - torch.einsum("rjhn,hnl->rjlh", starts.imag, table.imag))


def cross_terms(log_da, c2, starts: torch.Tensor, length: int) -> torch.Tensor:
    """cross_r = Re(sum_modes 2C dA^(r+1) z) for r < length: starts (R, nb, H, N) -> (R, nb, length, H) real."""
    return cross_from_table(starts, cross_table(log_da, c2, length))


class FrozenTables:
    """Each forward SSM's (log dA, dB, 2C) and cross tables, computed once and reused: for generation, where
    the parameters cannot change between calls (no gradients; one `generate` call owns it, in its
    `BlockCache`). A cached block step then costs two small einsums per layer instead of complex powers
    (which took a quarter of a toy-size block step). Its size is fixed by the architecture and b (a few
    (H, N/2, b) tables per layer), whatever the length generated."""

    def __init__(self):
        self._factors: dict = {}
        self._tables: dict = {}

    def factors(self, ssm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if ssm not in self._factors:
            self._factors[ssm] = ssm_factors(ssm)
        return self._factors[ssm]

    def _table(self, key: tuple, build) -> torch.Tensor:
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]

    def cross_table(self, ssm, length: int) -> torch.Tensor:
        log_da, _, c2 = self.factors(ssm)
        return self._table(("cross", ssm, length), lambda: cross_table(log_da, c2, length))

    def gain_table(self, ssm, length: int) -> torch.Tensor:
        log_da, db, _ = self.factors(ssm)
        return self._table(("gain", ssm, length), lambda: gain_table(log_da, db, length))

    def carried_table(self, ssm, length: int, num_blocks: int) -> torch.Tensor:
        log_da = self.factors(ssm)[0]
        if num_blocks > 1:  # only a commit's one-block table is kept: a prompt's would grow with its length
            return carried_table(log_da, length, num_blocks)
        return self._table(("carried", ssm, length), lambda: carried_table(log_da, length, 1))


class BlockContext:
    """What the forward SSMs of one backbone pass over block rows add across block boundaries.

    The pass runs on rows (R * num_blocks, length, H): `num_blocks` consecutive blocks of each of R sequences
    (row-major). Each `BidirectionalDiagonalSSM` calls `context(ssm, u)` with its input u and adds the returned
    cross term (same shape as u) to its output. Modes:
      - computing (default): from the layer's own u (blocks of one sequence see each other's earlier blocks)
        and the optional `initial` states (a `BlockCache`'s, the prefix before the first block);
        `keep_cross` records each layer's term in `cross` (for a replay), `keep_final` the state after the
        last block in `final` (to advance a cache);
      - replay (`replay` = another context's `cross`): the recorded terms, whatever u is (pass 2 of training).
    Layers are keyed by module, so a gradient-checkpointing recomputation overwrites with equal values.
    `tables` (a `FrozenTables`, generation only) reuses each layer's factors across calls; ignored while
    gradients are enabled, where the parameters may change between calls (each call then builds its own).
    """

    def __init__(self, num_blocks: int, initial: dict | None = None, keep_cross: bool = False,
                 keep_final: bool = False, replay: dict | None = None, tables: FrozenTables | None = None):
        self.num_blocks = num_blocks
        self.tables = tables
        self.initial = initial
        self.keep_cross, self.keep_final = keep_cross, keep_final
        self.replay = replay
        self.cross: dict = {}
        self.final: dict = {}

    def __call__(self, ssm, u: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            return self.replay[ssm].to(u.dtype)
        rows, length, hidden = u.shape
        initial = None if self.initial is None else self.initial.get(ssm)
        # a fresh FrozenTables computes everything for this call only (and under autograd)
        frozen = self.tables is not None and not torch.is_grad_enabled()
        tables = self.tables if frozen else FrozenTables()
        with _no_autocast(u):
            log_da, db, c2 = tables.factors(ssm)
            blocks = u.to(log_da.real.dtype).view(rows // self.num_blocks, self.num_blocks, length, hidden)
            if self.num_blocks == 1 and not self.keep_final:  # nothing to scan: only the initial state counts
                starts = None if initial is None else initial.unsqueeze(1)
                final = None
            else:
                contributions = block_contributions(log_da, db, blocks, tables.gain_table(ssm, length))
                carried = None if initial is None else tables.carried_table(ssm, length, self.num_blocks)
                starts, final = scan_states(log_da, contributions, length, initial, carried)
            if starts is None:
                cross = blocks.new_zeros(blocks.shape)
            else:
                cross = cross_from_table(starts, tables.cross_table(ssm, length))
            cross = cross.reshape(rows, length, hidden)
        if self.keep_cross:
            self.cross[ssm] = cross
        if self.keep_final:
            self.final[ssm] = final
        return cross.to(u.dtype)


@dataclass
class BlockCache:
    """The prefix of block generation: every forward SSM's state z (rows, H, N/2 complex), keyed by module.

    Its size is fixed by the architecture and the batch: (SSM layers) x rows x H x N/2 complex numbers,
    whatever the number of tokens consumed (`tokens`, per row)."""

    states: dict = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    tables: FrozenTables = field(default_factory=FrozenTables)

    def nbytes(self) -> int:
        """Bytes held by the states."""
        return sum(state.numel() * state.element_size() for state in self.states.values())

    def rows(self, index: torch.Tensor) -> dict:
        """The states of the rows `index`, as the `initial` of a `BlockContext`."""
        return {module: state[index] for module, state in self.states.items()}

    def update(self, index: torch.Tensor, final: dict) -> None:
        """Write the advanced states of rows `index`."""
        for module, state in final.items():
            if module in self.states:
                self.states[module][index] = state
            else:  # first use: zeros elsewhere (rows that consumed nothing yet)
                full = state.new_zeros(len(self.tokens), *state.shape[1:])
                full[index] = state
                self.states[module] = full


# ------------------------------------------------------------------------------------------------ backbone
def num_blocks(length: int, block_size: int) -> int:
    """Blocks of a sequence of `length` tokens (the last one may be shorter)."""
    return -(-length // block_size)


def block_timesteps(timesteps, batch: int, blocks: int, device) -> torch.Tensor | None:
    """Noise levels as (batch, blocks) float64: a number or (batch,) tensor is every block's, (batch, blocks)
    one per block. Raises naming the shape otherwise."""
    if timesteps is None:
        return None
    if isinstance(timesteps, bool) or not isinstance(timesteps, (int, float, torch.Tensor)):
        raise TypeError(f"`timesteps` must be a float, a ({batch},) tensor or a ({batch}, {blocks}) tensor (one "
                        f"noise level per block), got {type(timesteps).__name__}.")
    t = torch.as_tensor(timesteps, device=device)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"`timesteps` must be real numbers in [0, 1], got dtype {t.dtype}.")
    t = t.to(torch.float64)
    if t.dim() == 2 and t.shape == (batch, blocks):
        out = t
    elif t.numel() == 1 or (t.dim() == 1 and t.shape[0] == batch):
        out = t.reshape(-1, 1).expand(batch, blocks)
    else:
        raise ValueError(f"In block mode `timesteps` must be a scalar, ({batch},) or ({batch}, {blocks}) (one noise "
                         f"level per block of {blocks}), got shape {tuple(t.shape)}.")
    if bool((~torch.isfinite(out) | (out < 0) | (out > 1)).any()):
        raise ValueError(f"`timesteps` must be finite noise levels in [0, 1], got {out.flatten().tolist()[:8]}.")
    return out


def _condition(model, t: torch.Tensor | None, rows: int, device):
    """adaLN conditioning of each block row, (rows, H), or None for a model without noise conditioning."""
    if model.time_embed is None:
        return None
    if t is None:
        raise ValueError("This model is noise-conditioned (`time_conditioning=True`): pass `timesteps`.")
    return model._noise_condition(t.reshape(-1), rows, device)


def _merge_states(full, tail, sequences: int):
    """Stage outputs of the block rows (R * nb, n_s, H) and of the tail (R, n_t, H) as (R, nb * n_s + n_t, H)."""
    if full is None and tail is None:
        return None
    parts = []
    for index in range(len(full if full is not None else tail)):
        pieces = []
        if full is not None:
            pieces.append(full[index].reshape(sequences, -1, full[index].shape[-1]))
        if tail is not None:
            pieces.append(tail[index])
        parts.append(torch.cat(pieces, dim=1))
    return tuple(parts)


def run_blocks(model, embeds: torch.Tensor, t: torch.Tensor | None, output_hidden_states: bool = False,
               context: torch.Tensor | None = None):
    """The block-causal backbone on R sequences of one length n: embeds (R, n, H), noise levels t (R, nb).

    Block j reads blocks < j of `context` (R, n, H) (default: `embeds` itself), clean at t = 0. Pass 1 runs
    the whole blocks of `context` and records every SSM's cross terms and final state; pass 2 runs the
    noisy whole blocks replaying the cross terms, and a shorter last block (if any) reads the final states.
    Without noise conditioning and with `context` = `embeds`, pass 1 is already the answer. Returns
    (hidden (R, n, H), stage outputs or None).
    """
    rows, length, hidden = embeds.shape
    size = model.config.block_size
    full_blocks, tail = divmod(length, size)
    single = context is None and model.time_embed is None
    source = embeds if context is None else context
    outputs, full_states, final = [], None, None
    if full_blocks:
        clean = BlockContext(full_blocks, keep_cross=not single, keep_final=bool(tail))
        clean_rows = source[:, :full_blocks * size].reshape(rows * full_blocks, size, hidden)
        if single:
            out, full_states = model._backbone(clean_rows, None, output_hidden_states, block_context=clean)
        else:
            zero = None if t is None else torch.zeros(rows * full_blocks, dtype=torch.float64, device=embeds.device)
            model._backbone(clean_rows, _condition(model, zero, rows * full_blocks, embeds.device), False,
                            block_context=clean)
            noisy_rows = embeds[:, :full_blocks * size].reshape(rows * full_blocks, size, hidden)
            cond = _condition(model, None if t is None else t[:, :full_blocks], rows * full_blocks, embeds.device)
            out, full_states = model._backbone(noisy_rows, cond, output_hidden_states,
                                               block_context=BlockContext(full_blocks, replay=clean.cross))
        outputs.append(out.reshape(rows, full_blocks * size, -1))
        final = clean.final or None
    tail_states = None
    if tail:
        cond = _condition(model, None if t is None else t[:, full_blocks], rows, embeds.device)
        reader = BlockContext(1, final) if final is not None else None
        out, tail_states = model._backbone(embeds[:, full_blocks * size:], cond, output_hidden_states,
                                           block_context=reader)
        outputs.append(out)
    states = _merge_states(full_states, tail_states, rows) if output_hidden_states else None
    return torch.cat(outputs, dim=1), states


def block_stage_lengths(model, length: int) -> list[int]:
    """Length of every stage output for a sequence of `length` tokens in block mode (pooling within blocks)."""
    size = model.config.block_size
    per_block, tail = model._stage_lengths(size), model._stage_lengths(length % size)
    return [(length // size) * full + rest for full, rest in zip(per_block, tail)]


def block_causal_backbone(model, embeds: torch.Tensor, attention_mask, timesteps, output_hidden_states: bool,
                          clean_input_ids: torch.Tensor | None = None):
    """`SFDLMModel.forward` in block mode: (hidden (B, L, H), stage outputs or None).

    Blocks are counted from each row's first real token; padding never influences a real position. Block j
    reads blocks < j of `clean_input_ids` (default: the input itself) at t = 0, and its own tokens at its t.
    """
    batch, length, _ = embeds.shape
    size = model.config.block_size
    t = block_timesteps(timesteps, batch, num_blocks(length, size), embeds.device)
    if t is None and model.time_embed is not None:
        raise ValueError("This model is noise-conditioned (`time_conditioning=True`): pass `timesteps` (a float, "
                         f"a ({batch},) tensor, or ({batch}, blocks) with one noise level per block of {size}).")
    context = None
    if clean_input_ids is not None:
        if not isinstance(clean_input_ids, torch.Tensor) or clean_input_ids.shape != embeds.shape[:2]:
            raise ValueError(f"`clean_input_ids` must be ids of shape {tuple(embeds.shape[:2])} (the clean "
                             f"sequence the blocks are conditioned on), got "
                             f"{getattr(clean_input_ids, 'shape', type(clean_input_ids).__name__)}.")
        model.check_inputs(clean_input_ids.long(), attention_mask)
        context = model.embed_tokens(clean_input_ids.long())
    if attention_mask is None or bool(attention_mask.all()):
        return run_blocks(model, embeds, t, output_hidden_states, context)
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    hidden = embeds.new_zeros(embeds.shape)
    states_out = None
    for n in lengths.unique().tolist():
        if n == 0:
            continue
        rows = (lengths == n).nonzero().squeeze(-1)
        pick = lambda x: x[rows][mask[rows]].view(len(rows), n, -1)  # noqa: E731
        out, row_states = run_blocks(model, pick(embeds), None if t is None else t[rows, :num_blocks(n, size)],
                                     output_hidden_states, None if context is None else pick(context))
        hidden[rows] = model._scatter_rows(hidden[rows], mask[rows], out)
        if row_states is not None:
            if states_out is None:
                states_out = [embeds.new_zeros(batch, n_stage, embeds.shape[-1])
                              for n_stage in block_stage_lengths(model, length)]
            for state, row_state in zip(states_out, row_states):
                if row_state.shape[1] == n:
                    state[rows] = model._scatter_rows(state[rows], mask[rows], row_state)
                else:  # a pooled stage: the row's own pooled sequence, from position 0
                    state[rows, :row_state.shape[1]] = row_state.to(state.dtype)
    return hidden, None if states_out is None else tuple(states_out)


# ------------------------------------------------------------------------------------------------ objective
def block_index(ids: torch.Tensor, attention_mask: torch.Tensor | None, block_size: int) -> torch.Tensor:
    """(B, L) block of every position of ids (B, L), counted from each row's first real token (padding before
    it: block 0)."""
    real = torch.ones_like(ids, dtype=torch.long) if attention_mask is None else attention_mask.long()
    return ((real.cumsum(-1) - 1).clamp_min(0) // block_size)


def block_rows(x0: torch.Tensor, scored: torch.Tensor, attention_mask: torch.Tensor | None, block_size: int):
    """Every block as a row of the per-row NELBO estimators: `(x0 rows, scored rows, slots)`.

    The rows are (B * nb, b): row i * nb + j holds block j of sequence i (its real positions in order; a shorter
    last block and the blocks past a short row's end are filled with unscored 0s), so `draw_for_estimator`
    draws one noise level per block, stratified over the rows, and the masked count counts the block's scored
    positions. `slots` (B, L) is each position's index into the flattened rows, -1 at padding (which is in no
    row: it is never corrupted). A single block (b >= L) is the row itself, padding included, so that it draws
    exactly what the full canvas draws."""
    batch, length = x0.shape
    num = num_blocks(length, block_size)
    if num == 1:
        return x0, scored, torch.arange(batch * length, device=x0.device).view(batch, length)
    real = torch.ones_like(x0, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rank = real.long().cumsum(-1) - 1  # block j, column c <=> real rank j * b + c
    slots = torch.arange(batch, device=x0.device).unsqueeze(-1) * (num * block_size) + rank
    slots = torch.where(real, slots, torch.full_like(slots, -1))
    x0_rows = x0.new_zeros(batch * num * block_size)
    scored_rows = torch.zeros(batch * num * block_size, dtype=torch.bool, device=x0.device)
    x0_rows[slots[real]] = x0[real]
    scored_rows[slots[real]] = scored[real]
    return x0_rows.view(batch * num, block_size), scored_rows.view(batch * num, block_size), slots


def per_position_draw(draw: NoiseDraw, blocks: torch.Tensor, num: int) -> NoiseDraw:
    """A (B * num,) draw of one noise level per block, spread over the (B, L) positions' blocks, flattened."""
    batch = blocks.shape[0]
    flat = (blocks + num * torch.arange(batch, device=blocks.device).unsqueeze(-1)).reshape(-1)

    def spread(x):
        return None if x is None else x.to(blocks.device)[flat]

    return NoiseDraw(t=spread(draw.t), s=spread(draw.s), weight=spread(draw.weight),
                     reconstruction=spread(draw.reconstruction))


def block_denoise(model, noisy: torch.Tensor, t: torch.Tensor | None, attention_mask, clean: torch.Tensor,
                  positions: torch.Tensor | None = None):
    """Logits (B, L, V) of every block from its noisy tokens at its t (B, nb) and the clean earlier blocks
    (a model with its own `denoise_blocks`, as the Transformer denoiser, does it its way). `positions` (B, L)
    bool: only the (N, V) rows at its `True` entries, row-major, the output head run there only."""
    if hasattr(model, "denoise_blocks"):
        return model.denoise_blocks(noisy, t, attention_mask, clean, positions)
    hidden = model.model(noisy, attention_mask=attention_mask, timesteps=t, clean_input_ids=clean).last_hidden_state
    if positions is not None:
        hidden = hidden[positions]
    return model.diffusion.restrict_logits(model.lm_head(hidden))


def block_terms(model, x0, scored, attention_mask, generator, u: torch.Tensor | None = None,
                estimator: str = "uniform_t", head_only: bool = False, tables: dict | None = None):
    """One draw of the block NELBO: corrupt each block at its own noise level, denoise all blocks in two
    passes, and return (per-position terms (B, L), logits (B, L, V), x_t, t (B, nb)).

    Each block is a row of the per-row estimator `estimator` (resolved, see `diffusion.NELBO_ESTIMATORS`), at
    the quantiles `u` (B * nb,) or (B, nb) (default: stratified over all blocks of the batch). `head_only`
    (absorbing x_0 models): the output head runs at the masked positions only, and the returned logits are the
    carry-over onehot(x_t) elsewhere, as in `diffusion.training_loss`. `tables`: the discrete masked-count
    tables, shared between draws."""
    process = model.diffusion
    batch, length = x0.shape
    size = model.config.block_size
    num = num_blocks(length, size)
    if u is None:
        u = stratified_quantiles(batch * num, generator)
    x0_rows, scored_rows, slots = block_rows(x0, scored, attention_mask, size)
    noisy_rows, draw = draw_for_estimator(process, estimator, x0_rows, scored_rows, u.reshape(-1), generator, tables)
    noisy = torch.where(slots >= 0, noisy_rows.reshape(-1)[slots.clamp_min(0)], x0)
    # One row of length 1 per position, with its block's draw: `loss_terms` and `head_only_terms` per position.
    spread = per_position_draw(draw, block_index(x0, attention_mask, size), num)
    t = draw.t.view(batch, num)
    t_in = t if getattr(model.config, "time_conditioning", True) else None
    column = (batch * length, 1)
    if head_only:
        def denoise(ids, _t, positions):
            return block_denoise(model, noisy, t_in, attention_mask, x0, positions.view(batch, length))

        sums, rows, positions = head_only_terms(process, denoise, x0.reshape(column), scored.reshape(column),
                                                noisy.reshape(column), spread)
        logits = _carry_over_logits(noisy, process.vocab_size, rows, positions.view(batch, length))
        return sums.view(batch, length), logits, noisy, t
    logits = block_denoise(model, noisy, t_in, attention_mask, x0)
    terms = process.loss_terms(logits.reshape(batch * length, 1, -1), x0.reshape(column), noisy.reshape(column),
                               spread, scored=scored.reshape(column)).view(batch, length)
    return terms, logits, noisy, t


def infer_block_timesteps(model, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """(B, blocks) noise levels of an absorbing block model's input, read from each block's masked fraction
    (the maximum-likelihood estimate of 1 - alpha(t), inverted as `DiffusionLMMixin.infer_timesteps` does for
    a whole row); on the step grid for discrete-time models."""
    model.check_inputs(input_ids, attention_mask)
    batch, length = input_ids.shape
    num = num_blocks(length, model.config.block_size)
    maskable = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
    masked = (input_ids == model.diffusion.mask_token_id) & maskable
    blocks = block_index(input_ids, attention_mask, model.config.block_size)
    counts = torch.zeros(batch, num, dtype=torch.float64, device=input_ids.device)
    total = counts.clone().scatter_add_(1, blocks, maskable.double())
    counts.scatter_add_(1, blocks, masked.double())
    t = invert_one_minus_alpha(model.diffusion.schedule, counts / total.clamp_min(1))
    steps = getattr(model.config, "num_timesteps", None)
    if steps is not None:
        t = (t * steps).round() / steps
    return t.float()


def check_block_objective(model) -> None:
    if getattr(model.diffusion, "objective", None) == "score_entropy":
        raise ValueError("Block mode (`block_size`) supports objective='elbo' and 'ce', not 'score_entropy'.")


def block_training_forward(model, input_ids, attention_mask, labels, timesteps, generator, inputs_embeds,
                           output_hidden_states, num_items_in_batch):
    """`forward(labels=...)` in block mode: the BD3-LM loss, the sum of every block's NELBO draw per scored
    token (see the module docstring). Each block's noise is drawn as the full canvas draws a row's
    (`model.training_estimator`, stratified over all blocks of the batch), and absorbing models run the head at
    masked positions only where the full canvas does. `timesteps`: fixed noise levels, a number, (B,) or
    (B, blocks), used as given."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
    if inputs_embeds is not None:
        raise ValueError("`labels` need `input_ids`: the forward process corrupts token ids, so a training "
                         "loss cannot start from `inputs_embeds`.")
    check_block_objective(model)
    x0, scored = model._clean_batch(input_ids, attention_mask, labels)
    num = num_blocks(x0.shape[1], model.config.block_size)
    u = None
    if timesteps is not None:
        u = block_timesteps(timesteps, x0.shape[0], num, "cpu")
    # the full canvas's law of t and head-only rule, each block a row (b = L: the full-canvas loss, draw for draw)
    estimator = resolve_training_estimator(model.diffusion, getattr(model, "training_estimator", "uniform_t"),
                                           fixed=u is not None)
    head_only = model._uses_head_only_loss(output_hidden_states)
    terms, logits, noisy, t = block_terms(model, x0, scored, attention_mask, generator, u, estimator, head_only)
    loss = terms.sum() / scored.sum().clamp_min(1)
    if num_items_in_batch is not None:
        total = torch.as_tensor(num_items_in_batch, device=loss.device).clamp_min(1)
        loss = loss * scored.sum().clamp_min(1) / total
    hidden_states = None
    if output_hidden_states:
        if not hasattr(model, "model"):
            raise ValueError(f"{type(model).__name__} does not report hidden states in block mode.")
        t_in = t if model.model.time_embed is not None else None
        hidden_states = model.model(noisy, attention_mask=attention_mask, timesteps=t_in, clean_input_ids=x0,
                                    output_hidden_states=True).hidden_states
    return model.output_class(loss=loss, logits=logits, noisy_input_ids=noisy, timesteps=t,
                              hidden_states=hidden_states)


@torch.no_grad()
def block_nelbo(model, input_ids, attention_mask=None, labels=None, num_samples: int = 16, generator=None,
                return_samples: bool = False, estimator: str = "auto") -> torch.Tensor:
    """`nelbo` in block mode: (B,) mean (or (B, num_samples)) of the sum over blocks of each block's NELBO
    draw. Each block is a row of the per-row estimator `estimator` (the names of `DiffusionLMMixin.nelbo`,
    "auto" resolved the same way; masked_count counts the block's own scored positions), and draw k of every
    block uses u = (k + U) / num_samples (stratified per block), as `diffusion.monte_carlo_nelbo` does per row."""
    # `num_samples`, the objective, the estimator's name and `generator` are checked by `nelbo`, the caller.
    estimator = resolve_estimator(model.diffusion, estimator)
    check_block_objective(model)
    x0, scored = model._clean_batch(input_ids, attention_mask, labels)
    batch = x0.shape[0]
    num = num_blocks(x0.shape[1], model.config.block_size)
    head_only = uses_head_only(model.diffusion, model._denoise_takes_positions())  # as the full-canvas `nelbo`
    offset = torch.rand(batch * num, generator=generator, dtype=torch.float64,
                        device=generator.device if generator is not None else "cpu").cpu()
    tables: dict = {}
    samples = []
    for k in range(num_samples):
        u = ((k + offset) / num_samples).clamp(max=1 - 1e-12)
        terms = block_terms(model, x0, scored, attention_mask, generator, u, estimator, head_only, tables)[0]
        samples.append(terms.double().sum(-1))
    samples = torch.stack(samples, dim=-1)
    return samples if return_samples else samples.mean(-1)


__all__ = ["BlockCache", "BlockContext", "block_causal_backbone", "block_nelbo", "block_training_forward",
           "run_blocks", "ssm_factors"]
