"""Generation for SFDLM: iterative denoising of a whole canvas in a fixed number of steps.

Prompting and infilling are one operation. Every position given in the input stays fixed; the positions
to generate are the mask tokens anywhere in the input plus `max_new_tokens` positions appended after it.
Generation runs the reverse chain on a time grid t = k / steps, s = (k - 1) / steps for k = steps..1
(per block, with semi-autoregressive `block_length`); at each step a *sampler* turns x_t into x_s.

Samplers are small classes in the `SAMPLERS` registry, keyed by name:

    "ancestral"   x_s ~ p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p_hat(x0 | x_t) (D3PM/MDLM), both processes
    "uniform"     the same for the uniform process, with Duo's greedy final step (x_0 = argmax p_hat)
    "confidence"  absorbing: unmask the most confident positions, a per-row budget that follows the
                  noise schedule (MaskGIT / LLaDA low-confidence / Dream's max-prob, margin and entropy)
    "threshold"   absorbing: also unmask every position whose confidence passes a threshold (Fast-dLLM)
    "tweedie"     score models (SEDD, objective="score_entropy"): Tweedie tau-leaping, both processes
    "euler"       score models: SEDD's Euler step, both processes

To add one, subclass `Sampler`, give it a `name` and the `processes` it supports, implement
`__call__(step: SamplingStep) -> new canvas`, and decorate it with `@register_sampler`. A `SamplingStep`
gives the canvas x_t, the positions the step may change, t, s and their alphas, the (processed) logits
and x_0 probabilities of the denoiser, the model's raw denoise function, the diffusion maths
(`DiscreteDiffusion.reverse_probs`, ...) and one `torch.Generator` per row with helpers that draw from it.

Randomness is drawn per row, from that row's own generator and only at that row's generated positions,
so a row gives exactly the result it gives alone with the same generator, whatever the padding.

This file is "remote code": it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.utils import ModelOutput, logging

from .diffusion import DiscreteDiffusion

logger = logging.get_logger(__name__)

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")
DEFAULT_MAX_NEW_TOKENS = 128

# Fields of a plain `GenerationConfig` that carry over when one is passed to `generate`.
_SHARED_FIELDS = ("max_new_tokens", "max_length", "temperature", "top_k", "top_p", "num_return_sequences",
                  "return_dict_in_generate", "bos_token_id", "pad_token_id", "eos_token_id")


class SFDLMGenerationConfig(GenerationConfig):
    r"""Parameters of [`SFDLMGenerationMixin.generate`]. Every field defaults to `None` ("unset"): unset
    fields take the model's `generation_config.json` value, then the defaults of
    `_get_default_generation_params`. Every bad value raises a `ValueError` that names it.

    Args:
        > Length of the output

        max_new_tokens (`int`, *optional*):
            Positions appended after the input to generate. Unset (and `max_length` unset): 0 when the input
            contains mask tokens (pure infilling), otherwise 128.
        max_length (`int`, *optional*):
            Total length of the output; used when `max_new_tokens` is unset.

        > The reverse chain

        steps (`int`, *optional*, defaults to 64):
            Number of denoising steps (network evaluations at most), shared among the semi-AR blocks.
        sampler (`str`, *optional*):
            Name of a sampler in `SAMPLERS`: `"ancestral"`, `"uniform"`, `"confidence"` or `"threshold"`.
            Unset: `"ancestral"` for absorbing models, `"uniform"` for uniform ones.
        temperature (`float`, *optional*, defaults to 1.0):
            Logits are divided by it before p_hat(x_0 | x_t) is formed. `0` means greedy: tokens are the
            argmax of p_hat (confidences still use the untempered probabilities).
        top_k (`int`, *optional*, defaults to 0):
            Keep only the k most probable clean tokens per position (0: all).
        top_p (`float`, *optional*, defaults to 1.0):
            Nucleus filtering of p_hat per position, in (0, 1].
        confidence_measure (`str`, *optional*, defaults to `"max_prob"`):
            Confidence of a position for the remasking samplers, in [0, 1] with 1 = certain: `"max_prob"`
            (MaskGIT, Dream's maskgit_plus), `"margin"` (top-1 minus top-2 probability, Dream's topk_margin)
            or `"entropy"` (exp(-H(p_hat)), Dream's entropy).
        confidence_threshold (`float`, *optional*, defaults to 0.9):
            `"threshold"` sampler: positions whose confidence is at least this are unmasked at once.
        block_length (`int`, *optional*):
            Semi-autoregressive decoding (LLaDA, BD3-LM): the appended positions are denoised in blocks of
            this many positions, left to right, each block with its share of `steps`. Mask tokens inside the
            input belong to the first block. Unset: one block.
        stop_when_stable (`int`, *optional*, defaults to 0):
            Finish a row's block once its canvas holds no mask token and has not changed for this many
            consecutive steps (0: never; the criterion of DiffusionGemma's stable-and-confident stop).

        > Output

        num_return_sequences (`int`, *optional*, defaults to 1):
            Independent samples per input row.
        output_history (`bool`, *optional*, defaults to `False`):
            Return the canvas after every step (implies `return_dict_in_generate`).
        return_dict_in_generate (`bool`, *optional*, defaults to `False`):
            Return an [`SFDLMGenerationOutput`] instead of the ids alone.

        > Special tokens

        mask_token_id (`int`, *optional*):
            The mask token; defaults to the model's. Absorbing models need one. For uniform models, mask tokens
            in the input mark positions to fill (they start from random tokens) and are never generated.
        pad_token_id (`int`, *optional*), eos_token_id (`int` or `list[int]`, *optional*), bos_token_id (`int`, *optional*):
            Generated positions after a row's first generated EOS are set to `pad_token_id` (EOS if unset).
    """

    def __init__(self, **kwargs):
        # Like `DiffusionGemmaGenerationConfig`, do not call `super().__init__()`: most autoregressive
        # fields (beams, caches, penalties) mean nothing here.
        self.max_new_tokens: int | None = kwargs.pop("max_new_tokens", None)
        self.max_length: int | None = kwargs.pop("max_length", None)

        self.steps: int | None = kwargs.pop("steps", None)
        self.sampler: str | None = kwargs.pop("sampler", None)
        self.temperature: float | None = kwargs.pop("temperature", None)
        self.top_k: int | None = kwargs.pop("top_k", None)
        self.top_p: float | None = kwargs.pop("top_p", None)
        self.confidence_measure: str | None = kwargs.pop("confidence_measure", None)
        self.confidence_threshold: float | None = kwargs.pop("confidence_threshold", None)
        self.block_length: int | None = kwargs.pop("block_length", None)
        self.stop_when_stable: int | None = kwargs.pop("stop_when_stable", None)

        self.num_return_sequences: int | None = kwargs.pop("num_return_sequences", None)
        self.output_history: bool | None = kwargs.pop("output_history", None)
        self.return_dict_in_generate: bool | None = kwargs.pop("return_dict_in_generate", None)

        self.mask_token_id: int | None = kwargs.pop("mask_token_id", None)
        self.pad_token_id: int | None = kwargs.pop("pad_token_id", None)
        self.eos_token_id: int | list[int] | None = kwargs.pop("eos_token_id", None)
        self.bos_token_id: int | None = kwargs.pop("bos_token_id", None)

        kwargs.pop("_commit_hash", None)
        self._from_model_config: bool | None = kwargs.pop("_from_model_config", None)
        self.transformers_version: str | None = kwargs.pop("transformers_version", None)
        if kwargs:
            raise ValueError(f"Unexpected arguments for SFDLMGenerationConfig: {sorted(kwargs)}.")
        self.validate()

    @staticmethod
    def _get_default_generation_params() -> dict[str, Any]:
        """Values for fields that neither the call, the given config nor the model's config set."""
        return {
            "steps": 64,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "confidence_measure": "max_prob",
            "confidence_threshold": 0.9,
            "stop_when_stable": 0,
            "num_return_sequences": 1,
            "output_history": False,
            "return_dict_in_generate": False,
        }

    @classmethod
    def from_model_config(cls, model_config) -> "SFDLMGenerationConfig":
        """The special token ids of an `SFDLMConfig` (or its dict), nothing else."""
        values = model_config if isinstance(model_config, dict) else model_config.to_dict()
        ids = {name: values.get(name) for name in ("mask_token_id", "pad_token_id", "eos_token_id", "bos_token_id")}
        config = cls(**{name: value for name, value in ids.items() if value is not None})
        config._from_model_config = True
        config._original_object_hash = hash(config)
        return config

    def validate(self, strict: bool = False, **unused_kwargs) -> None:
        """Raise `ValueError` naming the first field whose value cannot work."""

        def fail(name: str, expected: str) -> None:
            raise ValueError(f"`{name}` must be {expected}, got {getattr(self, name)!r}.")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        for name in ("steps", "max_length", "num_return_sequences", "block_length"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                fail(name, "a positive integer")
        for name in ("max_new_tokens", "top_k", "stop_when_stable"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                fail(name, "a non-negative integer")
        if self.temperature is not None and (not is_number(self.temperature) or not 0 <= self.temperature < math.inf):
            fail("temperature", "a finite number >= 0 (0 means greedy)")
        if self.top_p is not None and (not is_number(self.top_p) or not 0 < self.top_p <= 1):
            fail("top_p", "a number in (0, 1]")
        if self.confidence_threshold is not None and (
            not is_number(self.confidence_threshold) or not 0 < self.confidence_threshold <= 1
        ):
            fail("confidence_threshold", "a number in (0, 1]")
        if self.confidence_measure is not None and self.confidence_measure not in CONFIDENCE_MEASURES:
            fail("confidence_measure", f"one of {CONFIDENCE_MEASURES}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            fail("sampler", f"one of {sorted(SAMPLERS)}")
        for name in ("output_history", "return_dict_in_generate"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                fail(name, "a bool")
        for name in ("mask_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                fail(name, "a non-negative integer token id")
        eos = self.eos_token_id
        if eos is not None:
            ids = eos if isinstance(eos, (list, tuple)) else [eos]
            if not ids or not all(is_int(i) and i >= 0 for i in ids):
                fail("eos_token_id", "a token id or a non-empty list of token ids")

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields that are set (unset fields mean "use the defaults" and need no saving)."""
        return {key: value for key, value in super().to_diff_dict().items() if value is not None}

    def get_generation_mode(self, *args, **kwargs):
        raise NotImplementedError("SFDLMGenerationConfig drives SFDLM's iterative denoising, not a GenerationMode.")


@dataclass
class SFDLMGenerationOutput(ModelOutput):
    """Output of [`SFDLMGenerationMixin.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size * num_return_sequences, length)`):
            The input (padding in place) followed by the appended positions, every generated position filled.
        num_forward_passes (`torch.LongTensor` of shape `(batch_size * num_return_sequences,)`):
            How many times each row went through the network (steps where nothing changed and the model is
            not noise-conditioned reuse the previous prediction, as in MDLM, and cost none).
        history (`tuple[torch.LongTensor]`, *optional*):
            With `output_history=True`: the canvas after every denoising step, each `(batch, length)`.
    """

    sequences: torch.LongTensor | None = None
    num_forward_passes: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None


# ---------------------------------------------------------------------------------------------- sampling steps
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
        greedy: temperature 0: tokens should be the argmax of p_hat (see `choose`).
        diffusion: the model's `DiscreteDiffusion` (`reverse_probs`, `x0_probs`, `process`, `mask_token_id`).
        generators: one `torch.Generator` per row; draw only through `uniform`/`categorical`/`choose`
            (or in row order at the row's own positions) to keep rows independent of the batch.
        config: the resolved `SFDLMGenerationConfig`.
    """

    canvas: torch.LongTensor
    update_mask: torch.BoolTensor
    t: torch.Tensor
    s: torch.Tensor
    alpha_t: torch.Tensor
    alpha_s: torch.Tensor
    is_last: bool
    greedy: bool
    diffusion: DiscreteDiffusion
    generators: list
    config: SFDLMGenerationConfig
    _logits_at: Callable[..., torch.Tensor]
    _denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @property
    def mask_token_id(self) -> int | None:
        return self.diffusion.mask_token_id

    def masked(self) -> torch.BoolTensor:
        """(B, L) positions of `update_mask` that still hold the mask token."""
        if self.mask_token_id is None:
            return torch.zeros_like(self.update_mask)
        return self.update_mask & (self.canvas == self.mask_token_id)

    def logits(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N, V) processed logits (logits processors, top-k, top-p, temperature) at `positions` (B, L),
        in row-major order. Calls the network only for rows whose prediction is not cached."""
        return self._logits_at(positions)

    def raw_logits(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N, V) the network's outputs at `positions`, unprocessed (for samplers of score-parameterised
        models, whose outputs are log-scores rather than logits of p_hat)."""
        return self._logits_at(positions, processed=False)

    def x0_probs(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N, V) p_hat(x_0 | x_t) at `positions`, via `DiscreteDiffusion.x0_probs` (absorbing: the mask is
        never a clean token and unmasked positions carry over)."""
        return self.diffusion.x0_probs(self.logits(positions), self.canvas[positions])

    def rows(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N,) row index of each selected position."""
        return positions.nonzero()[:, 0]

    def denoise(self, canvas: torch.LongTensor, t: torch.Tensor) -> torch.Tensor:
        """Raw logits (B, L, V) of the network for another canvas and noise levels (counted as a forward
        pass of every row), for samplers that need more than one evaluation per step."""
        return self._denoise(canvas, t)

    def uniform(self, positions: torch.BoolTensor) -> torch.Tensor:
        """(N,) float64 uniforms in [0, 1) for `positions`, each row's drawn from its own generator."""
        counts = positions.sum(-1).tolist()
        draws = [torch.rand(n, generator=g, dtype=torch.float64, device=g.device)
                 for n, g in zip(counts, self.generators) if n]
        if not draws:
            return torch.zeros(0, dtype=torch.float64, device=positions.device)
        return torch.cat([d.to(positions.device) for d in draws])

    def categorical(self, probs: torch.Tensor, positions: torch.BoolTensor) -> torch.LongTensor:
        """(N,) ids drawn from the rows of `probs` (N, V) (inverse CDF with each row's generator).
        Zero-probability ids are never drawn, also when the rows do not sum to one exactly."""
        cdf = probs.cumsum(-1)
        target = self.uniform(positions).to(cdf.dtype) * cdf[:, -1]
        ids = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
        # rounding can land u * total on the flat tail of zero-probability ids: take the last possible id
        impossible = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1) <= 0
        if impossible.any():
            last = probs.shape[-1] - 1 - (probs[impossible] > 0).flip(-1).long().argmax(-1)
            ids[impossible] = last
        return ids

    def choose(self, probs: torch.Tensor, positions: torch.BoolTensor) -> torch.LongTensor:
        """Clean tokens from p_hat (N, V): the argmax when greedy, else a draw."""
        return probs.argmax(-1) if self.greedy else self.categorical(probs, positions)


class Sampler:
    """One reverse step of the chain. Subclass, set `name`, `processes` and `parameterizations`, implement
    `__call__`, and register with `@register_sampler`.

    `__call__(step)` gets a [`SamplingStep`] and returns the new canvas x_s (B, L); it may change only
    positions in `step.update_mask` (the generation loop raises otherwise), and at the last step of a block
    (`step.is_last`) it must leave no mask token there.
    """

    name: ClassVar[str] = ""
    processes: ClassVar[tuple[str, ...]] = ("absorbing", "uniform")
    # what the network's outputs must be: "x0" (logits of p_hat(x_0 | x_t)) or "score" (SEDD log-scores)
    parameterizations: ClassVar[tuple[str, ...]] = ("x0",)

    def __init__(self, config: SFDLMGenerationConfig):
        self.config = config

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
    """x_s ~ p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p_hat(x0 | x_t) at every updatable position (D3PM, MDLM).

    Absorbing: masked positions unmask with probability (alpha_s - alpha_t) / (1 - alpha_t) to a draw of
    p_hat, unmasked ones stay. Uniform: every position may change at every step. The posterior is
    `DiscreteDiffusion.reverse_probs`; at s = 0 it equals p_hat, so the last step draws from p_hat.
    """

    name = "ancestral"
    greedy_last_step = False

    def __call__(self, step: SamplingStep) -> torch.LongTensor:
        positions = step.masked() if step.diffusion.process == "absorbing" else step.update_mask
        if not positions.any():
            return step.canvas
        x0 = step.x0_probs(positions)
        new = step.canvas.clone()
        if step.is_last and self.greedy_last_step:
            new[positions] = x0.argmax(-1)
            return new
        if step.greedy:
            x0 = F.one_hot(x0.argmax(-1), x0.shape[-1]).to(x0.dtype)
        rows = step.rows(positions)
        probs = step.diffusion.reverse_probs(x0.unsqueeze(1), step.canvas[positions].unsqueeze(1),
                                             step.alpha_s[rows], step.alpha_t[rows]).squeeze(1)
        new[positions] = step.categorical(probs, positions)
        return new


@register_sampler
class UniformSampler(AncestralSampler):
    """The uniform process's sampler: generated positions start from random tokens, every one of them may
    change at every ancestral step, and the final step is greedy (x_0 = argmax p_hat), as in Duo."""

    name = "uniform"
    processes = ("uniform",)
    greedy_last_step = True


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


@register_sampler
class ConfidenceSampler(Sampler):
    """Absorbing: unmask the most confident masked positions (MaskGIT, LLaDA, Dream).

    Each row unmasks round(m * (alpha_s - alpha_t) / (1 - alpha_t)) of its m masked positions, its own
    share under the noise schedule (not the batch average: Dream's bug with ragged prompts), all at the
    last step. Ties go to the leftmost position. Chosen positions get a draw of p_hat (argmax if greedy).
    """

    name = "confidence"
    processes = ("absorbing",)

    def budget(self, step: SamplingStep, masked: torch.BoolTensor) -> torch.Tensor:
        """(B,) number of positions each row unmasks at this step."""
        count = masked.sum(-1)
        if step.is_last:
            return count
        ratio = ((step.alpha_s - step.alpha_t) / (1 - step.alpha_t).clamp_min(1e-30)).clamp(0, 1)
        return torch.floor(count.double() * ratio.to(count.device) + 0.5).long()

    def select(self, step: SamplingStep, masked: torch.BoolTensor, conf: torch.Tensor) -> torch.BoolTensor:
        scores = _scatter_rows(conf.double(), masked, -math.inf)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order).contiguous())
        return masked & (rank < self.budget(step, masked).unsqueeze(-1))

    def __call__(self, step: SamplingStep) -> torch.LongTensor:
        masked = step.masked()
        if not masked.any():
            return step.canvas
        probs = step.x0_probs(masked)
        chosen = self.select(step, masked, confidence(probs, self.config.confidence_measure))
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

    def select(self, step: SamplingStep, masked: torch.BoolTensor, conf: torch.Tensor) -> torch.BoolTensor:
        scores = _scatter_rows(conf.double(), masked, -math.inf)
        first = torch.zeros_like(masked).scatter_(1, scores.argmax(-1, keepdim=True), True)  # leftmost maximum
        sure = scores >= self.config.confidence_threshold
        return masked & (super().select(step, masked, conf) | sure | first)


class _ScoreSampler(Sampler):
    """Base of SEDD's samplers for score models (`objective="score_entropy"`, `score_entropy.py`): the
    network's raw outputs parameterise log-scores, every updatable position moves independently
    (tau-leaping), and the fixed positions condition the scores (SEDD's `proj_fun` is the update mask).
    The maths is `ScoreEntropy.<method>`. Temperature 0 (greedy): the last step takes each position's most
    probable token (for the uniform process, Duo's greedy tail), and an absorbing position that unmasks
    earlier takes its most probable token (as the ancestral sampler's greedy mode). Other temperatures, top-k/top-p and logits processors act on logits of
    p_hat(x_0 | x_t), which a score model has not, so they are refused (processors are not applied)."""

    parameterizations = ("score",)
    method: ClassVar[str] = ""

    def __init__(self, config: SFDLMGenerationConfig):
        super().__init__(config)
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
        new = step.canvas.clone()
        drawn = step.categorical(probs, positions)
        if step.greedy and step.is_last:
            drawn = probs.argmax(-1)
        elif step.greedy and absorbing:  # an unmasking position takes the most probable token
            drawn = torch.where(drawn != x_t.squeeze(1), probs.scatter(-1, x_t, 0.0).argmax(-1), drawn)
        new[positions] = drawn
        return new


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


def _default_sampler(process: str, parameterization: str) -> str:
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


# ---------------------------------------------------------------------------------------------- logits processing
def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature (skipped when 0: greedy keeps the untempered distribution), top-k and top-p filtering of
    logits (..., V); filtered entries become -inf. The most probable entry always survives."""
    if temperature and temperature != 1.0:
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


# ---------------------------------------------------------------------------------------------- the mixin
class SFDLMGenerationMixin:
    """`generate` for SFDLM models (iterative denoising), in place of transformers' `GenerationMixin`.

    The model class provides `config` (`vocab_size`, `mask_token_id`, `max_position_embeddings`, optionally
    `time_conditioning`), `diffusion` (a `DiscreteDiffusion`: `process`, `schedule`, `mask_token_id`,
    `x0_probs`, `reverse_probs`) and `denoise(ids, timesteps, attention_mask)` returning (B, L, V) logits of
    p_hat(x_0 | x_t), independent for each row. Put it first among the bases so its `generate` wins.
    """

    generation_config_class = SFDLMGenerationConfig

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: SFDLMGenerationConfig | None = None,
        streamer=None,
        logits_processor=None,
        stopping_criteria=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        **kwargs,
    ) -> torch.LongTensor | SFDLMGenerationOutput:
        r"""Fill the mask tokens of `input_ids` and `max_new_tokens` appended positions by iterative denoising.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, length)`, *optional*):
                The prompt / the text to infill. Every token stays fixed except mask tokens. `None`: generate
                `max_new_tokens` tokens unconditionally (one row, or `num_return_sequences`).
            attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*):
                1 for real tokens, 0 for padding (left or right). Padding stays in place in the output and
                never influences a row: each row gives exactly the result it gives alone.
            generation_config ([`SFDLMGenerationConfig`], *optional*):
                Overrides the model's `generation_config`; `**kwargs` naming its fields override both.
            streamer (*optional*):
                Gets `put(ids)` with the canvas before the first generated position, `put_draft(ids)` with the
                rest of the canvas after every step (if it has `put_draft`, as transformers'
                `TextDiffusionStreamer`), `put(ids)` with the final rest, then `end()`.
            logits_processor (`LogitsProcessorList`, *optional*):
                Applied first as `processor(canvas, logits)` with logits of shape (B, L, V).
            stopping_criteria (`StoppingCriteriaList`, *optional*):
                Called as `criteria(canvas, None)` after every step; rows for which it returns True stop.
            generator (`torch.Generator` or list of them, *optional*):
                One generator per output row (`batch * num_return_sequences`) makes each row reproducible on
                its own; a single generator (or the global RNG when `None`) seeds one generator per row.

        Returns:
            `torch.LongTensor` `(batch * num_return_sequences, length + new)`, or an [`SFDLMGenerationOutput`]
            with `return_dict_in_generate=True`.
        """
        config = self._prepare_generation_config(generation_config, **kwargs)
        plan = self._plan_generation(input_ids, attention_mask, config, generator)
        sampler = SAMPLERS[plan.sampler_name](config)
        return self._denoise_loop(plan, sampler, config, streamer, logits_processor, stopping_criteria)

    # ------------------------------------------------------------------ configuration
    def _prepare_generation_config(self, generation_config, **kwargs) -> SFDLMGenerationConfig:
        """Priority: kwargs > `generation_config` > `self.generation_config` > global defaults."""
        if generation_config is None:
            config = SFDLMGenerationConfig()
        elif isinstance(generation_config, SFDLMGenerationConfig):
            config = copy.deepcopy(generation_config)
        elif isinstance(generation_config, GenerationConfig):
            config = SFDLMGenerationConfig(**{name: getattr(generation_config, name) for name in _SHARED_FIELDS
                                              if getattr(generation_config, name, None) is not None})
        else:
            raise TypeError(f"`generation_config` must be an SFDLMGenerationConfig, got {type(generation_config).__name__}.")
        unknown = sorted(name for name in kwargs if not hasattr(config, name) or name.startswith("_"))
        if unknown:
            raise ValueError(f"`generate` got unexpected arguments {unknown}; generation options are the fields "
                             "of SFDLMGenerationConfig.")
        for name, value in kwargs.items():
            setattr(config, name, value)
        model_config = getattr(self, "generation_config", None)
        if isinstance(model_config, SFDLMGenerationConfig):
            for name, value in model_config.to_dict().items():
                if hasattr(config, name) and getattr(config, name) is None and not name.startswith("_"):
                    setattr(config, name, value)
        for name, value in config._get_default_generation_params().items():
            if getattr(config, name) is None:
                setattr(config, name, value)
        config.validate()
        return config

    def _plan_generation(self, input_ids, attention_mask, config: SFDLMGenerationConfig, generator) -> "_Plan":
        """Check every input and build the starting canvas, before any forward pass."""
        model_config = self.config
        process = self.diffusion.process
        mask_id = config.mask_token_id if config.mask_token_id is not None else model_config.mask_token_id
        vocab = model_config.vocab_size
        if process == "absorbing" and (mask_id is None or self.diffusion.mask_token_id is None):
            raise ValueError("This absorbing-process model has no mask token (`mask_token_id` is None in its config): "
                             "it cannot generate.")
        if process == "absorbing" and mask_id != self.diffusion.mask_token_id:
            raise ValueError(f"`mask_token_id`={mask_id} differs from the absorbing state of the model "
                             f"({self.diffusion.mask_token_id}).")
        if mask_id is not None and not 0 <= mask_id < vocab:
            raise ValueError(f"`mask_token_id`={mask_id} is not a token of this model (vocab_size={vocab}): mask "
                             "tokens in the input could not be filled.")
        parameterization = "score" if getattr(self.diffusion, "objective", None) == "score_entropy" else "x0"
        sampler_name = config.sampler or _default_sampler(process, parameterization)
        sampler_cls = SAMPLERS[sampler_name]
        if process not in sampler_cls.processes:
            raise ValueError(f"sampler={sampler_name!r} works for the {' and '.join(sampler_cls.processes)} "
                             f"process, but this model uses the {process!r} process.")
        if parameterization not in sampler_cls.parameterizations:
            raise ValueError(f"sampler={sampler_name!r} needs a model whose outputs are "
                             f"{' or '.join(sampler_cls.parameterizations)}-parameterised, but this model's are "
                             f"{parameterization!r} (objective={self.config.objective!r}).")

        # --- inputs
        if input_ids is None:
            if attention_mask is not None:
                raise ValueError("`attention_mask` was given without `input_ids`.")
            input_ids = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"`input_ids` must be an integer tensor, got {type(input_ids).__name__} "
                            f"{getattr(input_ids, 'dtype', '')}.")
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError(f"`input_ids` must have shape (batch, length) with batch > 0, got {tuple(input_ids.shape)}.")
        input_ids = input_ids.long().to(self.device)
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"`attention_mask` shape {tuple(attention_mask.shape)} does not match `input_ids` "
                             f"shape {tuple(input_ids.shape)}.")
        attention_mask = attention_mask.to(self.device).bool()
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            bad = int(input_ids.min()) if int(input_ids.min()) < 0 else int(input_ids.max())
            raise ValueError(f"Token id {bad} in `input_ids` is outside [0, vocab_size={vocab}).")
        masked_input = attention_mask & (input_ids == mask_id) if mask_id is not None else torch.zeros_like(attention_mask)

        if config.max_new_tokens is not None:
            new = config.max_new_tokens
        elif config.max_length is not None:
            new = config.max_length - length
            if new < 0:
                raise ValueError(f"The input is {length} tokens long, longer than `max_length`={config.max_length}.")
        else:
            new = 0 if bool(masked_input.any()) else DEFAULT_MAX_NEW_TOKENS
        total = length + new
        if total > model_config.max_position_embeddings:
            raise ValueError(f"Input length {length} + {new} new tokens = {total} exceeds the model's "
                             f"`max_position_embeddings`={model_config.max_position_embeddings}.")
        if total == 0:
            raise ValueError("Nothing to generate: no `input_ids` and `max_new_tokens`=0.")

        repeats = config.num_return_sequences
        rows = batch * repeats
        input_ids = input_ids.repeat_interleave(repeats, 0)
        attention_mask = attention_mask.repeat_interleave(repeats, 0)
        masked_input = masked_input.repeat_interleave(repeats, 0)
        generators = self._row_generators(generator, rows)

        # --- canvas: input, then `new` appended positions; `free` marks the positions to generate
        appended = torch.zeros(rows, total, dtype=torch.bool, device=self.device)
        appended[:, length:] = True
        free = appended.clone()
        free[:, :length] = masked_input
        attention = torch.cat([attention_mask, torch.ones(rows, new, dtype=torch.bool, device=self.device)], 1)
        canvas = torch.cat([input_ids, torch.zeros(rows, new, dtype=torch.long, device=self.device)], 1)
        if process == "absorbing":
            canvas[free] = mask_id
        else:  # the uniform prior, each row from its own generator
            counts = free.sum(-1).tolist()
            draws = [torch.randint(vocab, (n,), generator=g, device=g.device) for n, g in zip(counts, generators) if n]
            if draws:
                canvas[free] = torch.cat([d.to(self.device) for d in draws])

        # --- semi-autoregressive blocks over the appended positions; input masks join the first block
        block_length = config.block_length or max(new, 1)
        block = torch.full((rows, total), -1, dtype=torch.long, device=self.device)
        block[:, length:] = torch.arange(new, device=self.device) // block_length
        block[free & ~appended] = 0
        num_blocks = max(-(-new // block_length), 1)
        if config.steps < num_blocks:
            raise ValueError(f"`steps`={config.steps} is fewer than the {num_blocks} blocks of `block_length`="
                             f"{block_length}: every block needs at least one step.")
        steps = [config.steps // num_blocks + (b < config.steps % num_blocks) for b in range(num_blocks)]

        eos = config.eos_token_id
        eos_ids = None if eos is None else torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos],
                                                        device=self.device)
        pad_id = config.pad_token_id if config.pad_token_id is not None else (
            None if eos_ids is None else int(eos_ids[0]))
        for name, value in (("pad_token_id", pad_id), ("eos_token_id", None if eos_ids is None else int(eos_ids.max()))):
            if value is not None and value >= vocab:
                raise ValueError(f"`{name}`={value} is outside [0, vocab_size={vocab}).")
        return _Plan(canvas=canvas, free=free, attention=attention, block=block, steps=steps,
                     generators=generators, sampler_name=sampler_name, mask_id=mask_id, eos_ids=eos_ids,
                     pad_id=pad_id, prompt_length=length)

    @staticmethod
    def _row_generators(generator, rows: int) -> list:
        if isinstance(generator, (list, tuple)):
            if len(generator) != rows or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"`generator` as a list needs one torch.Generator per output row "
                                 f"(batch * num_return_sequences = {rows}), got {len(generator)} items.")
            return list(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2**62, (rows,), generator=generator, device=device).tolist()
        return [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]

    # ------------------------------------------------------------------ the loop
    def _denoise_loop(self, plan: "_Plan", sampler: Sampler, config: SFDLMGenerationConfig, streamer,
                      logits_processor, stopping_criteria):
        canvas, free, attention = plan.canvas, plan.free, plan.attention
        rows = canvas.shape[0]
        device = canvas.device
        schedule = self.diffusion.schedule
        padded = not bool(attention.all())
        model_attention = attention if padded else None
        time_conditioned = bool(getattr(self.config, "time_conditioning", True))
        passes = torch.zeros(rows, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        history: list[torch.Tensor] = []
        # prediction cache: raw logits of each row, the canvas and t they were computed for
        cache = {"logits": None, "canvas": torch.full_like(canvas, -1), "t": torch.full((rows,), -1.0, dtype=torch.float64)}
        start = int(free.any(0).nonzero()[0]) if free.any() else canvas.shape[1]
        if streamer is not None:
            streamer.put(canvas[:, :start].cpu())

        def denoise(ids: torch.Tensor, t: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
            passes[which] += 1
            mask = None if model_attention is None else model_attention[which]
            return self.denoise(ids, t.to(device=device, dtype=torch.float32), mask)

        def logits_at(step_canvas, t, positions, processed=True):
            # MDLM's cache: a row is evaluated again only if its canvas (or, for noise-conditioned models, t) moved
            stale = (cache["canvas"] != step_canvas).any(-1)
            if time_conditioned:
                stale |= cache["t"].to(device) != t
            stale &= positions.any(-1)
            if stale.any():
                which = stale.nonzero().squeeze(-1)
                fresh = denoise(step_canvas[which], t[which], which)
                if len(which) == rows:
                    cache["logits"] = fresh
                else:
                    if cache["logits"] is None:
                        cache["logits"] = torch.zeros(rows, *fresh.shape[1:], dtype=fresh.dtype, device=device)
                    cache["logits"][which] = fresh
                cache["canvas"][which] = step_canvas[which]
                cache["t"][which.cpu()] = t[which].cpu()
            logits = cache["logits"]
            if not processed:
                return logits[positions]
            if logits_processor is not None:
                logits = logits_processor(step_canvas, logits.clone())
            logits = logits[positions]
            if self.diffusion.process == "uniform" and plan.mask_id is not None:
                logits = logits.clone()
                logits[:, plan.mask_id] = -math.inf  # a uniform model never writes the mask token
            return filter_logits(logits.float(), config.temperature, config.top_k, config.top_p)

        for block_index, num_steps in enumerate(plan.steps):
            in_block = free & (plan.block == block_index)
            stable_for = torch.zeros(rows, dtype=torch.long, device=device)
            block_done = torch.zeros(rows, dtype=torch.bool, device=device)
            for k in range(num_steps, 0, -1):
                if self.diffusion.process == "absorbing":  # a block without masks has nothing left to do
                    block_done |= ~(in_block & (canvas == plan.mask_id)).any(-1)
                update = in_block & ~(finished | block_done).unsqueeze(-1)
                if not update.any():
                    break
                t = torch.full((rows,), k / num_steps, dtype=torch.float64, device=device)
                s = torch.full((rows,), (k - 1) / num_steps, dtype=torch.float64, device=device)
                step = SamplingStep(
                    canvas=canvas, update_mask=update, t=t, s=s, alpha_t=schedule.alpha(t), alpha_s=schedule.alpha(s),
                    is_last=k == 1, greedy=config.temperature == 0, diffusion=self.diffusion,
                    generators=plan.generators, config=config,
                    _logits_at=lambda positions, processed=True, c=canvas, t=t: logits_at(c, t, positions, processed),
                    _denoise=lambda ids, t_: denoise(ids, t_, torch.arange(rows, device=device)),
                )
                new = sampler(step)
                if new.shape != canvas.shape or bool(((new != canvas) & ~update).any()):
                    raise RuntimeError(f"Sampler {sampler.name!r} changed positions outside `update_mask`.")
                changed = (new != canvas).any(-1)
                canvas = new
                if config.stop_when_stable:
                    clean = ~(in_block & (canvas == plan.mask_id)).any(-1) if plan.mask_id is not None else True
                    stable_for = torch.where(changed, torch.zeros_like(stable_for), stable_for + 1)
                    block_done |= (stable_for >= config.stop_when_stable) & clean
                if stopping_criteria is not None:
                    finished |= stopping_criteria(canvas, None).to(device)
                if config.output_history:
                    history.append(canvas.clone())
                if streamer is not None and hasattr(streamer, "put_draft"):
                    streamer.put_draft(canvas[:, start:].cpu())
            if plan.eos_ids is not None and len(plan.steps) > 1:
                # a row whose generated text has ended skips the later blocks (they become padding)
                done = free & (plan.block <= block_index) & torch.isin(canvas, plan.eos_ids)
                finished |= done.any(-1)
                if finished.all():
                    break

        canvas = self._pad_after_eos(canvas, free, plan)
        if streamer is not None:
            streamer.put(canvas[:, start:].cpu())
            streamer.end()
        if not (config.return_dict_in_generate or config.output_history):
            return canvas
        return SFDLMGenerationOutput(sequences=canvas, num_forward_passes=passes,
                                     history=tuple(history) if config.output_history else None)

    @staticmethod
    def _pad_after_eos(canvas: torch.Tensor, free: torch.Tensor, plan: "_Plan") -> torch.Tensor:
        """Generated positions after a row's first generated EOS become padding."""
        if plan.eos_ids is None:
            return canvas
        is_eos = free & torch.isin(canvas, plan.eos_ids)
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
        return canvas.masked_fill(free & after_eos, plan.pad_id)

    # ------------------------------------------------------------------ loading
    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             *args, **kwargs):
        """At `from_pretrained` time: use the given generation config, else the checkpoint's
        `generation_config.json` as an `SFDLMGenerationConfig` (else keep the one built from the model config)."""
        if generation_config is not None:
            self.generation_config = self.generation_config_class.from_dict(
                {k: v for k, v in generation_config.to_dict().items() if hasattr(SFDLMGenerationConfig(), k)})
            return
        if pretrained_model_name_or_path is None:
            return
        names = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        loading = {name: kwargs[name] for name in names if name in kwargs}
        try:
            self.generation_config = self.generation_config_class.from_pretrained(
                pretrained_model_name_or_path, _from_auto=from_auto_class, _from_pipeline=from_pipeline, **loading)
        except OSError:
            logger.info("No generation_config.json found; using the generation config built from the model config.")


@dataclass
class _Plan:
    canvas: torch.Tensor
    free: torch.Tensor
    attention: torch.Tensor
    block: torch.Tensor
    steps: list
    generators: list
    sampler_name: str
    mask_id: int | None
    eos_ids: torch.Tensor | None
    pad_id: int | None
    prompt_length: int


__all__ = [
    "AncestralSampler",
    "ConfidenceSampler",
    "SAMPLERS",
    "SFDLMGenerationConfig",
    "SFDLMGenerationMixin",
    "SFDLMGenerationOutput",
    "Sampler",
    "SamplingStep",
    "ThresholdSampler",
    "TweedieSampler",
    "EulerSampler",
    "UniformSampler",
    "confidence",
    "filter_logits",
    "register_sampler",
]
