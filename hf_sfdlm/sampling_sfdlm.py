"""Samplers for SFDLM's iterative denoising: one reverse step x_t -> x_s each, in the `SAMPLERS` registry.

    "ancestral"   x_s ~ p(x_s | x_t), the model's reverse kernel (`DiscreteDiffusion.reverse_probs`: the
                  normalised D3PM kernel, proportional to q(x_t | x_s) sum_x0 q(x_s | x0) p_hat(x0 | x_t);
                  for the absorbing process MDLM's posterior mixture), both processes
    "uniform"     the same for the uniform process (UDLM/Duo), then Duo's greedy tail (one argmax at t_min)
    "confidence"  absorbing: unmask the most confident positions, a per-row budget that follows the
                  noise schedule (MaskGIT / LLaDA low-confidence / Dream's max-prob, margin and entropy)
    "threshold"   absorbing: also unmask every position whose confidence passes a threshold (Fast-dLLM)
    "tweedie"     score models (SEDD, objective="score_entropy"): Tweedie tau-leaping, both processes
    "euler"       score models: SEDD's Euler step, both processes

To add one, subclass `Sampler`, give it a `name` and the `processes` it supports, implement
`__call__(step: SamplingStep) -> new canvas`, and decorate it with `@register_sampler`.

Only the work a step needs. A sampler asks `SamplingStep.logits / x0_probs / raw_logits` for the positions it
will draw at, and the network's LM head, the logits processors, the filters and the softmax run at those
positions only; a row asked for no position costs no forward pass. For the absorbing process which masked
positions unmask between t and s does not depend on the network (each with probability
(alpha_s - alpha_t) / (1 - alpha_t)), so the ancestral sampler draws that set first
(`SamplingStep.unmasking`) and asks for p_hat only there: the same distribution as drawing from
`reverse_probs` at every masked position, at a fraction of the cost.

Greedy decoding (`do_sample=False`, temperature 0) is a deterministic function of the input for every
sampler: no sampler draws, every choice is the most probable one with ties to the leftmost position (and
the lowest token id). Where a step's outcome is random in more than the token (which positions unmask or
change), the greedy step makes the expected number of changes, the most probable ones
(`greedy_changes`): the ancestral absorbing step unmasks round(m (alpha_s - alpha_t) / (1 - alpha_t)) of its
m masked positions, the most confident, like the confidence sampler. A uniform model's starting canvas is a
draw from the uniform prior with the fixed seed `GREEDY_SEED`.

Randomness is drawn per row, from that row's own generator and only at that row's positions (row-major),
so a row gives exactly the result it gives alone with the same generator, whatever the padding.

This file is "remote code": it imports only torch and its sibling files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .diffusion import DiscreteDiffusion

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")
# Temperatures below this (0 included) mean greedy: dividing float32 logits by less overflows to NaN.
MIN_TEMPERATURE = 1e-3
# Duo's greedy tail: the uniform sampler's ancestral steps stop at t_min, then one argmax pass there.
UNIFORM_T_MIN = 1e-5
# Greedy decoding of a uniform model starts from the uniform prior drawn with this seed (every row alike).
GREEDY_SEED = 0


@dataclass
class SamplingStep:
    """Everything a sampler sees at one reverse step x_t -> x_s (rows are the batch, B rows of length L).

    Attributes:
        canvas: (B, L) the current x_t. Positions outside `update_mask` must be returned unchanged.
        update_mask: (B, L) bool, the positions this step may change: generated positions of the current
            block, in rows that are not finished. (Absorbing samplers act on its masked subset.)
        t, s: (B,) float64 times of x_t and of the target x_s (s = 0 at a block's last step).
        alpha_t, alpha_s: (B,) float64 signal levels alpha(t), alpha(s) of the model's noise schedule.
        is_last: whether s == 0 (the block's final step: every position must end clean).
        greedy: temperature 0 (or below `MIN_TEMPERATURE`): tokens should be the argmax of p_hat (`choose`).
        diffusion: the model's diffusion process (`reverse_probs`, `x0_probs`, `process`, `mask_token_id`).
        generators: one `torch.Generator` per row; draw only through `uniform`/`categorical`/`choose`
            (or in row order at the row's own positions) to keep rows independent of the batch.
        config: the resolved `SFDLMGenerationConfig`.
        network: the generation loop's `Denoiser` (`network(canvas, t, positions, processed)`).
    """

    canvas: torch.LongTensor
    update_mask: torch.BoolTensor
    t: torch.Tensor
    s: torch.Tensor
    alpha_t: torch.Tensor
    alpha_s: torch.Tensor
    is_last: bool
    greedy: bool
    diffusion: "DiscreteDiffusion"
    generators: list
    config: Any
    network: Any

    @property
    def mask_token_id(self) -> int | None:
        return self.diffusion.mask_token_id

    def masked(self) -> torch.BoolTensor:
        """(B, L) positions of `update_mask` that still hold the mask token."""
        if self.mask_token_id is None:
            return torch.zeros_like(self.update_mask)
        return self.update_mask & (self.canvas == self.mask_token_id)

    def unmask_probability(self) -> torch.Tensor:
        """(B,) float64 probability that a masked position unmasks in this step, (alpha_s - alpha_t) / (1 - alpha_t)."""
        if self.is_last:
            return torch.ones_like(self.alpha_t)
        return ((self.alpha_s - self.alpha_t) / (1 - self.alpha_t).clamp_min(1e-300)).clamp(0, 1)

    def unmasking(self) -> torch.BoolTensor:
        """(B, L) the masked positions that unmask in this step under the absorbing reverse process: one
        uniform per masked position (row-major, each row's generator) below `unmask_probability`; at the last
        step every masked position, with no draw."""
        masked = self.masked()
        if self.is_last or not masked.any():
            return masked
        draws = _scatter_rows(self.uniform(masked), masked, 2.0)
        return masked & (draws < self.unmask_probability().to(draws.device).unsqueeze(-1))

    def logits(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N, V) float32 processed logits (logits processors, top-k, top-p, temperature) at `positions`
        (B, L), in row-major order. The network runs only for rows with a position (and no cached prediction)."""
        return self.network(self.canvas, self.t, positions)

    def raw_logits(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N, V) the network's float32 outputs at `positions`, unprocessed (for samplers of score-parameterised
        models, whose outputs are log-scores rather than logits of p_hat)."""
        return self.network(self.canvas, self.t, positions, processed=False)

    def x0_probs(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N, V) p_hat(x_0 | x_t) at `positions`, via `x0_probs` of the diffusion process (absorbing: the
        mask is never a clean token and unmasked positions carry over)."""
        return self.diffusion.x0_probs(self.logits(positions), self.canvas[positions])

    def draw_unmasked(self, positions: torch.BoolTensor) -> torch.LongTensor:
        """(N,) clean tokens for masked `positions`: the argmax of p_hat when greedy, else a draw (inverse CDF
        with each row's generator, as `categorical`). At a masked position p_hat is the softmax of the logits
        without the mask token (`x0_probs`); here it is formed in place of the logits, unnormalised."""
        logits = self.logits(positions)
        if self.mask_token_id is not None:
            logits[:, self.mask_token_id] = -math.inf
        if self.greedy:
            return logits.argmax(-1)
        weights = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
        return inverse_cdf(weights, self.uniform(positions), overwrite=True)

    def rows(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N,) row index of each selected position."""
        return positions.nonzero()[:, 0]

    def uniform(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N,) float64 uniforms in [0, 1) for `positions`, each row's drawn from its own generator."""
        counts = positions.sum(-1).tolist()
        draws = [torch.rand(n, generator=g, dtype=torch.float64, device=g.device)
                 for n, g in zip(counts, self.generators) if n]
        if not draws:
            return torch.zeros(0, dtype=torch.float64, device=positions.device)
        return torch.cat(draws).to(positions.device)

    def categorical(self, probs: torch.Tensor, positions: torch.BoolTensor) -> torch.LongTensor:
        """(N,) ids drawn from the rows of `probs` (N, V) (inverse CDF with each row's generator).
        Zero-probability ids are never drawn, also when the rows do not sum to one exactly."""
        return inverse_cdf(probs, self.uniform(positions))

    def choose(self, probs: torch.Tensor, positions: torch.BoolTensor) -> torch.LongTensor:
        """Clean tokens from p_hat (N, V): the argmax when greedy, else a draw."""
        return probs.argmax(-1) if self.greedy else self.categorical(probs, positions)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, overwrite: bool = False) -> torch.LongTensor:
    """(N,) the id where each row of `probs` (N, V, unnormalised) reaches `uniforms` (N,) of its total mass.
    Zero-probability ids are never drawn, also when rounding lands on a flat tail. `overwrite=True` forms
    the CDF in place of `probs` (no second vocabulary-sized tensor)."""
    cdf = probs.cumsum_(-1) if overwrite else probs.cumsum(-1)
    target = uniforms.to(cdf.dtype) * cdf[:, -1]
    ids = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
    # the first id whose CDF exceeds the target has positive mass, unless rounding put the target at the total
    before = torch.where(ids > 0, cdf.gather(-1, (ids - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    impossible = cdf.gather(-1, ids.unsqueeze(-1)).squeeze(-1) <= before
    if impossible.any():  # take the last id with positive mass
        rows = cdf[impossible]
        grows = torch.cat([rows[:, :1] > 0, rows[:, 1:] > rows[:, :-1]], -1)
        ids[impossible] = cdf.shape[-1] - 1 - grows.flip(-1).long().argmax(-1)
    return ids


def uniform_reverse_weights_(p_hat: torch.Tensor, x_t: torch.Tensor, alpha_s: torch.Tensor,
                             alpha_t: torch.Tensor) -> torch.Tensor:
    """The uniform process's reverse kernel (`UniformDiffusion.reverse_probs`, the normalised D3PM/UDLM
    kernel) per position, unnormalised and in place of `p_hat` (N, V): with u = 1/V and m_s = alpha_s p_hat
    + (1 - alpha_s) u, the weight of y is q(x_t | y) m_s(y), where q(x_t | y) = (1 - alpha_t / alpha_s) u for
    y != x_t and alpha_t / alpha_s more at y = x_t (the normaliser m_t(x_t) is left out). x_t: (N,);
    alpha_s, alpha_t: (N,) float64."""
    u = 1.0 / p_hat.shape[-1]
    b, ratio = alpha_s.to(torch.float64), alpha_t.to(torch.float64) / alpha_s.to(torch.float64).clamp_min(1e-300)
    jump = (1 - ratio) * u
    index = x_t.unsqueeze(-1)
    m_s_at_x_t = b * p_hat.gather(-1, index).squeeze(-1).double() + (1 - b) * u
    p_hat.mul_((jump * b).to(p_hat.dtype).unsqueeze(-1)).add_((jump * (1 - b) * u).to(p_hat.dtype).unsqueeze(-1))
    return p_hat.scatter_add_(-1, index, (ratio * m_s_at_x_t).to(p_hat.dtype).unsqueeze(-1))


class Sampler:
    """One reverse step of the chain. Subclass, set `name`, `processes` and `parameterizations`, implement
    `__call__`, and register with `@register_sampler`.

    `__call__(step)` gets a [`SamplingStep`] and returns the new canvas x_s (B, L); it may change only
    positions in `step.update_mask` (the generation loop raises otherwise), and at the last step of a block
    (`step.is_last`) it must leave no mask token there. `time_grid(num_steps)` gives the (t, s) of each step.
    """

    name: ClassVar[str] = ""
    processes: ClassVar[tuple[str, ...]] = ("absorbing", "uniform")
    # what the network's outputs must be: "x0" (logits of p_hat(x_0 | x_t)) or "score" (SEDD log-scores)
    parameterizations: ClassVar[tuple[str, ...]] = ("x0",)

    def __init__(self, config):
        self.config = config

    def time_grid(self, num_steps: int) -> list[tuple[float, float]]:
        """(t, s) of every step of a block: t = k / N, s = (k - 1) / N for k = N..1 (the last s is 0)."""
        return [(k / num_steps, (k - 1) / num_steps) for k in range(num_steps, 0, -1)]

    def __call__(self, step: SamplingStep) -> torch.LongTensor:
        raise NotImplementedError


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator adding a sampler to `SAMPLERS` under `cls.name`."""
    if not cls.name:
        raise ValueError(f"Sampler {cls.__name__} needs a non-empty `name`.")
    SAMPLERS[cls.name] = cls
    return cls


@register_sampler
class AncestralSampler(Sampler):
    """x_s ~ p(x_s | x_t) at every updatable position: the model's reverse kernel, the normalised D3PM kernel
    p(x_s | x_t) proportional to q(x_t | x_s) sum_x0 q(x_s | x0) p_hat(x0 | x_t) (`reverse_probs`; for the
    absorbing process it equals MDLM's posterior mixture sum_x0 q(x_s | x_t, x0) p_hat(x0 | x_t)).

    Absorbing: the set of masked positions that unmask (each with probability (alpha_s - alpha_t) / (1 -
    alpha_t)) is drawn first, then each of them gets a draw of p_hat; unmasked positions stay. p_hat is
    evaluated at the unmasking positions only, and a row where nothing unmasks makes no forward pass.
    Uniform: every position may change at every step, x_s drawn from the process's reverse kernel (formed in
    place of p_hat, `uniform_reverse_weights_`); at s = 0 it is p_hat.
    """

    name = "ancestral"

    def __call__(self, step: SamplingStep) -> torch.LongTensor:
        if step.diffusion.process == "absorbing":
            return self.unmask(step)
        return self.uniform_step(step)

    def unmask(self, step: SamplingStep) -> torch.LongTensor:
        if step.greedy:  # the expected number of unmaskings, the most confident positions (no draw)
            return self.unmask_most_confident(step, self.config.confidence_measure)
        positions = step.unmasking()
        if not positions.any():
            return step.canvas
        new = step.canvas.clone()
        new[positions] = step.draw_unmasked(positions)
        return new

    @staticmethod
    def unmask_most_confident(step: SamplingStep, measure: str) -> torch.LongTensor:
        """Greedy absorbing step: each row unmasks round(m (alpha_s - alpha_t) / (1 - alpha_t)) of its m masked
        positions (all at the last step), those whose p_hat is the most confident under `measure` (ties to
        the leftmost), each to its most probable token. With "max_prob" these are the unmaskings the reverse
        kernel finds most probable (p(x_s = y) = (alpha_s - alpha_t) / (1 - alpha_t) p_hat(y))."""
        masked = step.masked()
        count = masked.sum(-1)
        budget = count if step.is_last else torch.floor(
            count.double() * step.unmask_probability().to(count.device) + 0.5).long()
        masked &= (budget > 0).unsqueeze(-1)  # rows that unmask nothing need no prediction
        if not masked.any():
            return step.canvas
        probs = step.x0_probs(masked)
        chosen = top_per_row(confidence(probs, measure), masked, budget)
        new = step.canvas.clone()
        new[chosen] = probs[chosen[masked]].argmax(-1)
        return new

    @staticmethod
    def uniform_step(step: SamplingStep) -> torch.LongTensor:
        """Every updatable position draws x_s from the uniform reverse kernel, formed in place of p_hat (the
        one (N, V) tensor; `uniform_reverse_weights_`) and drawn by inverse CDF in place too.

        Greedy: every position's target is its argmax of p_hat (at s = 0 every position takes it); before,
        each row moves round(sum of P(x_s = target)) of its positions not at their target, those the kernel
        most probably moves there, and the others stay."""
        positions = step.update_mask
        if not positions.any():
            return step.canvas
        weights = step.x0_probs(positions)
        rows, x_t = step.rows(positions), step.canvas[positions]
        if step.greedy:
            targets = weights.argmax(-1)
            if step.is_last:
                new = step.canvas.clone()
                new[positions] = targets
                return new
            uniform_reverse_weights_(weights, x_t, step.alpha_s[rows], step.alpha_t[rows])
            to_target = weights.gather(-1, targets.unsqueeze(-1)).squeeze(-1) / weights.sum(-1)
            to_target = torch.where(targets == x_t, torch.zeros_like(to_target), to_target)
            return greedy_changes(step, positions, targets, to_target, to_target)
        uniform_reverse_weights_(weights, x_t, step.alpha_s[rows], step.alpha_t[rows])
        new = step.canvas.clone()
        new[positions] = inverse_cdf(weights, step.uniform(positions), overwrite=True)
        return new


@register_sampler
class UniformSampler(AncestralSampler):
    """The uniform process's sampler with Duo's greedy tail: generated positions start from random tokens,
    `steps` ancestral steps run on the grid t_k = t_min + (1 - t_min) k / steps down to t_min, and one extra
    pass at t_min sets every position to the argmax of p_hat(x_0 | x_{t_min}) (Duo, `t_min` =
    `UNIFORM_T_MIN`): `steps + 1` network evaluations per block."""

    name = "uniform"
    processes = ("uniform",)

    def time_grid(self, num_steps: int) -> list[tuple[float, float]]:
        knots = [UNIFORM_T_MIN + (1 - UNIFORM_T_MIN) * k / num_steps for k in range(num_steps, -1, -1)]
        return list(zip(knots[:-1], knots[1:])) + [(UNIFORM_T_MIN, 0.0)]

    def __call__(self, step: SamplingStep) -> torch.LongTensor:
        if not step.is_last:
            return self.uniform_step(step)
        positions = step.update_mask  # the greedy tail: x_0 = argmax p_hat(. | x_{t_min})
        if not positions.any():
            return step.canvas
        new = step.canvas.clone()
        new[positions] = step.logits(positions).argmax(-1)
        return new


def confidence(probs: torch.Tensor, measure: str) -> torch.Tensor:
    """(N,) confidence in [0, 1] of each row of probabilities (N, V); 1 means certain."""
    if measure == "max_prob":
        return probs.max(-1).values
    if measure == "margin":
        top = probs.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    if measure == "entropy":
        return torch.exp(-(-torch.special.xlogy(probs, probs)).sum(-1))
    raise ValueError(f"`confidence_measure` must be one of {CONFIDENCE_MEASURES}, got {measure!r}.")


def _scatter_rows(values: torch.Tensor, positions: torch.BoolTensor, fill: float) -> torch.Tensor:
    out = torch.full(positions.shape, fill, dtype=values.dtype, device=values.device)
    out[positions] = values
    return out


def top_per_row(scores: torch.Tensor, positions: torch.BoolTensor, budget: torch.Tensor) -> torch.BoolTensor:
    """(B, L) the `budget` (B,) highest-scoring of each row's `positions` (B, L); `scores` (N,) are given at
    the N positions, row-major. Ties go to the leftmost position (a stable sort), so the choice is a
    deterministic function of the scores."""
    full = _scatter_rows(scores.double(), positions, -math.inf)
    order = torch.sort(full, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order).contiguous())
    return positions & (rank < budget.unsqueeze(-1))


def expected_count(step: SamplingStep, positions: torch.BoolTensor, probabilities: torch.Tensor) -> torch.Tensor:
    """(B,) round(sum of `probabilities` (N,) over each row's `positions`), halves up: the expected number of
    events (unmaskings, changes) of a row, as a whole number."""
    total = torch.zeros(positions.shape[0], dtype=torch.float64, device=positions.device)
    total.index_add_(0, step.rows(positions), probabilities.double())
    return torch.floor(total + 0.5).long()


def greedy_changes(step: SamplingStep, positions: torch.BoolTensor, targets: torch.Tensor, scores: torch.Tensor,
                   expected: torch.Tensor) -> torch.LongTensor:
    """The greedy form of a reverse step in which each of the N `positions` (row-major) would change to a
    random token: each row makes round(sum `expected`) changes, at its highest-`scores` positions (ties to
    the leftmost), each to its `targets` token. `scores`, `expected`: (N,) probabilities; `targets`: (N,)."""
    chosen = top_per_row(scores, positions, expected_count(step, positions, expected))
    new = step.canvas.clone()
    new[chosen] = targets[chosen[positions]]
    return new


@register_sampler
class ConfidenceSampler(Sampler):
    """Absorbing: unmask the most confident masked positions (MaskGIT, LLaDA, Dream).

    Each row unmasks round(m * (alpha_s - alpha_t) / (1 - alpha_t)) of its m masked positions, its own
    share under the noise schedule (not the batch average: Dream's bug with ragged prompts), all at the
    last step. Ties go to the leftmost position. Chosen positions get a draw of p_hat (argmax if greedy).
    p_hat is evaluated at the masked positions of the rows that unmask something in this step only.
    """

    name = "confidence"
    processes = ("absorbing",)

    def budget(self, step: SamplingStep, masked: torch.BoolTensor) -> torch.Tensor:
        """(B,) number of positions each row unmasks at this step."""
        count = masked.sum(-1)
        ratio = step.unmask_probability().to(count.device)
        return torch.floor(count.double() * ratio + 0.5).long()

    def active_rows(self, step: SamplingStep, masked: torch.BoolTensor, budget: torch.Tensor) -> torch.Tensor:
        """(B,) rows that unmask something in this step (the others need no prediction)."""
        return budget > 0

    def select(self, step: SamplingStep, masked: torch.BoolTensor, conf: torch.Tensor,
               budget: torch.Tensor) -> torch.BoolTensor:
        return top_per_row(conf, masked, budget)

    def __call__(self, step: SamplingStep) -> torch.LongTensor:
        masked = step.masked()
        budget = self.budget(step, masked)
        masked &= self.active_rows(step, masked, budget).unsqueeze(-1)
        if not masked.any():
            return step.canvas
        probs = step.x0_probs(masked)
        chosen = self.select(step, masked, confidence(probs, self.config.confidence_measure), budget)
        new = step.canvas.clone()
        if chosen.any():
            keep = chosen[masked]  # which of the masked positions (row-major order) are chosen
            new[chosen] = step.choose(probs[keep], chosen)
        return new


@register_sampler
class ThresholdSampler(ConfidenceSampler):
    """Fast-dLLM parallel decoding: unmask every masked position whose confidence is at least
    `confidence_threshold`, and at least the confidence sampler's budget (at least one per row), so a block
    finishes in at most its steps and in one step when the model is sure of everything."""

    name = "threshold"

    def active_rows(self, step, masked, budget):
        return masked.any(-1)

    def select(self, step, masked, conf, budget):
        scores = _scatter_rows(conf.double(), masked, -math.inf)
        first = torch.zeros_like(masked).scatter_(1, scores.argmax(-1, keepdim=True), True)  # leftmost maximum
        sure = scores >= self.config.confidence_threshold
        return masked & (super().select(step, masked, conf, budget) | sure | first)


class _ScoreSampler(Sampler):
    """Base of SEDD's samplers for score models (`objective="score_entropy"`, `score_entropy.py`): the
    network's raw outputs parameterise log-scores, every updatable position moves independently
    (tau-leaping), and the fixed positions condition the scores (SEDD's `proj_fun` is the update mask).
    The maths is `ScoreEntropy.<method>`. Other temperatures than 1 and 0 (greedy),
    top-k/top-p and logits processors act on logits of p_hat(x_0 | x_t), which a score model has not, so
    they are refused (processors are not applied). Greedy (temperature 0) makes no draw: see `greedy`."""

    parameterizations = ("score",)
    method: ClassVar[str] = ""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "t_min", None) is not None or getattr(config, "stability_threshold", None) is not None:
            raise ValueError(f"sampler={self.name!r} draws from the reverse process of a score model, whose outputs are "
                             "not logits of p_hat: DiffusionGemma's temperature schedule (t_min/t_max) and its "
                             "stable-and-confident stop (stability_threshold) need an x0 model.")
        if config.temperature not in (0, 1) or config.top_k or config.top_p < 1:
            raise ValueError(f"sampler={self.name!r} draws from the reverse process of a score model as is: it needs "
                             f"temperature 1 (or 0), top_k=0 and top_p=1, got {config.temperature}, {config.top_k} and "
                             f"{config.top_p}.")

    def __call__(self, step: SamplingStep) -> torch.LongTensor:
        absorbing = step.diffusion.process == "absorbing"
        positions = step.masked() if absorbing else step.update_mask
        if not positions.any():
            return step.canvas
        rows = step.rows(positions)
        x_t = step.canvas[positions].unsqueeze(1)
        transition = getattr(step.diffusion, self.method)
        probs = transition(step.raw_logits(positions).unsqueeze(1), x_t, step.t[rows], step.s[rows]).squeeze(1)
        if not absorbing and step.config.mask_token_id is not None:
            probs[:, step.config.mask_token_id] = 0  # a uniform model never writes the mask token
        if step.greedy:
            return self.greedy(step, positions, probs, x_t.squeeze(1), absorbing)
        new = step.canvas.clone()
        new[positions] = step.categorical(probs, positions)
        return new

    @staticmethod
    def greedy(step: SamplingStep, positions, probs, x_t, absorbing: bool) -> torch.LongTensor:
        """Greedy step (no draw): at the last step every position takes its most probable x_s; before, each
        position's target is its most probable token other than x_t, and each row makes the expected number
        of changes (absorbing: of unmaskings; uniform: of moves to the targets), where the move to the target
        is most probable."""
        if step.is_last:
            new = step.canvas.clone()
            new[positions] = probs.argmax(-1)
            return new
        probs = probs / probs.sum(-1, keepdim=True)
        targets = probs.scatter(-1, x_t.unsqueeze(-1), -1.0).argmax(-1)
        to_target = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        expected = 1 - probs.gather(-1, x_t.unsqueeze(-1)).squeeze(-1) if absorbing else to_target
        return greedy_changes(step, positions, targets, to_target, expected)


@register_sampler
class TweedieSampler(_ScoreSampler):
    """SEDD's Tweedie tau-leaping (`analytic` predictor): per position, x_s ~ [exp(-(sigma_bar_t -
    sigma_bar_s) Q) s_theta]_y q(x_t | y), exact per position for exact scores; at s = 0 it is SEDD's
    final noise removal."""

    name = "tweedie"
    method = "tweedie_probs"


@register_sampler
class EulerSampler(_ScoreSampler):
    """SEDD's Euler predictor: per position, jump to y with probability (t - s) sigma(t) Q(y -> x_t) s_theta_y."""

    name = "euler"
    method = "euler_probs"


def default_sampler(process: str, parameterization: str) -> str:
    """"ancestral" (absorbing) or "uniform" (uniform) for x_0 models; for others the first registered
    sampler that fits (e.g. SEDD's samplers for score models)."""
    preferred = {"absorbing": "ancestral", "uniform": "uniform"}[process]
    if parameterization in SAMPLERS[preferred].parameterizations:
        return preferred
    for name, cls in SAMPLERS.items():
        if process in cls.processes and parameterization in cls.parameterizations:
            return name
    raise ValueError(f"No registered sampler handles a {parameterization!r}-parameterised {process!r} model; "
                     f"registered: {sorted(SAMPLERS)}.")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature (skipped below `MIN_TEMPERATURE`: greedy keeps the untempered distribution), top-k and
    top-p filtering of logits (..., V); filtered entries become -inf. The most probable entry always survives."""
    if temperature >= MIN_TEMPERATURE and temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.float().softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


__all__ = [
    "AncestralSampler",
    "CONFIDENCE_MEASURES",
    "ConfidenceSampler",
    "EulerSampler",
    "MIN_TEMPERATURE",
    "SAMPLERS",
    "Sampler",
    "SamplingStep",
    "ThresholdSampler",
    "TweedieSampler",
    "UniformSampler",
    "GREEDY_SEED",
    "confidence",
    "greedy_changes",
    "default_sampler",
    "filter_logits",
    "inverse_cdf",
    "register_sampler",
    "top_per_row",
    "uniform_reverse_weights_",
]
