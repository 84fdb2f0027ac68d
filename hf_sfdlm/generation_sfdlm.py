"""Generation for SFDLM: iterative denoising of a whole canvas in a fixed number of steps.

Prompting and infilling are one operation. Every position given in the input stays fixed; the positions
to generate are the mask tokens anywhere in the input plus `max_new_tokens` positions appended after it.
Generation runs the reverse chain on the sampler's time grid (t = k / steps, s = (k - 1) / steps for
k = steps..1 by default), per block with semi-autoregressive `block_length`; at each step a *sampler*
(`sampling_sfdlm.py`) turns x_t into x_s.

This file holds the generation config (`SFDLMGenerationConfig`), the output, and the mixin whose
`generate` plans the canvas, then runs `_denoising_step` until every block is done. The network is seen
through a `Denoiser`: logits at the positions a sampler asks for, MDLM's cache, the pass counters and the
logits processors.

This file is "remote code": it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.utils import ModelOutput, logging

from .sampling_sfdlm import (  # noqa: F401  (re-exported: the public names of generation)
    CONFIDENCE_MEASURES,
    GREEDY_SEED,
    MIN_TEMPERATURE,
    SAMPLERS,
    AncestralSampler,
    ConfidenceSampler,
    EulerSampler,
    Sampler,
    SamplingStep,
    ThresholdSampler,
    TweedieSampler,
    UniformSampler,
    confidence,
    default_sampler,
    filter_logits,
    register_sampler,
)

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

# Fields that set the same thing another way (ours and DiffusionGemma's): where one is set, at a higher
# priority (kwargs > given config > the model's config > defaults), the others are not taken.
_ALTERNATIVES = {
    "steps": ("max_denoising_steps",),
    "max_denoising_steps": ("steps",),
    "temperature": ("t_min", "t_max"),
    "t_min": ("temperature",),
    "t_max": ("temperature",),
}
# DiffusionGemma's default bound on the mean entropy for its stable-and-confident stop.
DIFFUSION_GEMMA_CONFIDENCE_THRESHOLD = 0.005


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
            Number of denoising steps (network evaluations at most), shared among the semi-AR blocks. The
            `"uniform"` sampler adds Duo's greedy tail, one argmax pass at t_min, per block.
        max_denoising_steps (`int`, *optional*):
            DiffusionGemma's name: the number of denoising steps of *each* block (DiffusionGemma's canvas), in
            place of `steps` (set one of the two).
        sampler (`str`, *optional*):
            Name of a sampler in `SAMPLERS`: `"ancestral"`, `"uniform"`, `"confidence"` or `"threshold"`.
            Unset: `"ancestral"` for absorbing models, `"uniform"` for uniform ones.
        do_sample (`bool`, *optional*):
            As in transformers: `False` means greedy decoding (the same as `temperature=0`), `True` sampling
            at `temperature`. Unset: sampling unless `temperature` is 0. Greedy output is a deterministic
            function of the input for every sampler (no draws; where a step would unmask or change a random
            set of positions, it changes the expected number of them, the most probable first; see
            `sampling_sfdlm`), whatever `generator` is given.
        temperature (`float`, *optional*, defaults to 1.0):
            Logits are divided by it before p_hat(x_0 | x_t) is formed. `0`, and any temperature below
            `MIN_TEMPERATURE` (1e-3, where float32 logits would overflow), means greedy: tokens are the
            argmax of p_hat (confidences still use the untempered probabilities).
        t_min (`float`, *optional*), t_max (`float`, *optional*):
            DiffusionGemma's linear temperature schedule, in place of `temperature` (set both, 0 <= t_min <
            t_max): at the step with n of a block's N steps left (n = N first, n = 1 last) logits are divided by
            t_min + (t_max - t_min) n / N (at least `MIN_TEMPERATURE`). Greedy decoding ignores it.
        top_k (`int`, *optional*, defaults to 0):
            Keep only the k most probable clean tokens per position (0: all).
        top_p (`float`, *optional*, defaults to 1.0):
            Nucleus filtering of p_hat per position, in (0, 1].
        confidence_measure (`str`, *optional*, defaults to `"max_prob"`):
            Confidence of a position for the remasking samplers, in [0, 1] with 1 = certain: `"max_prob"`
            (MaskGIT, Dream's maskgit_plus), `"margin"` (top-1 minus top-2 probability, Dream's topk_margin)
            or `"entropy"` (exp(-H(p_hat)), Dream's entropy).
        confidence_threshold (`float`, *optional*, defaults to 0.9, or 0.005 with `stability_threshold`):
            `"threshold"` sampler: positions whose confidence is at least this are unmasked at once (in (0, 1]).
            With `stability_threshold` set it is DiffusionGemma's: the bound (in nats, > 0) on the mean entropy
            of the block's p_hat below which the stable-and-confident stop fires; the two meanings do not mix
            (`sampler="threshold"` with `stability_threshold` is refused).
        stability_threshold (`int`, *optional*):
            DiffusionGemma's stable-and-confident stop (`StableAndConfidentStoppingCriteria`), per row and
            block: before each step, the block's argmax canvas (the argmax of the processed p_hat at every
            position still to generate, the token elsewhere) is compared with those of the previous steps; when
            it has not changed for `stability_threshold` steps (0: at once) and the mean entropy of p_hat over
            the block's positions (0 at unmasked ones) is below `confidence_threshold`, the block takes its
            argmax canvas and is done. The check uses the step's own network evaluation (no extra pass).
        block_length (`int`, *optional*):
            Semi-autoregressive decoding (LLaDA, BD3-LM): the appended positions are denoised in blocks of
            this many positions, left to right, each block with its share of `steps`. Mask tokens inside the
            input belong to the first block. Unset: one block.
        stop_when_stable (`int`, *optional*, defaults to 0):
            Finish a row's block once its canvas holds no mask token and has not changed for this many
            consecutive steps (0: never; the criterion of DiffusionGemma's stable-and-confident stop).

        compute_dtype (`str`, *optional*):
            `"bfloat16"` or `"float16"`: run the network under `torch.autocast` of that dtype (the SSM's FFTs
            stay float32; logits are cast to float32 before sampling). Unset or `"float32"`: the model's own
            dtype. On CPU float32 is the default and usually the faster (see the README's sampling-speed
            table); on a GPU bfloat16 is the usual choice.

        > Output

        num_return_sequences (`int`, *optional*, defaults to 1):
            Independent samples per input row.
        output_history (`bool`, *optional*, defaults to `False`):
            Return the canvas after every step (implies `return_dict_in_generate`).
        return_dict_in_generate (`bool`, *optional*, defaults to `False`):
            Return an [`SFDLMGenerationOutput`] (with `num_forward_passes` and `tokens_per_forward`) instead of
            the ids alone.

        > Special tokens

        mask_token_id (`int`, *optional*):
            The mask token; defaults to the model's. Absorbing models need one. For uniform models, mask tokens
            in the input mark positions to fill (they start from random tokens) and are never generated.
        pad_token_id (`int`, *optional*), eos_token_id (`int` or `list[int]`, *optional*), bos_token_id (`int`, *optional*):
            Generated positions after a row's first generated EOS are set to `pad_token_id` (EOS if unset).

    **DiffusionGemma's generation config** (`transformers`' `DiffusionGemmaGenerationConfig`): a plain
    `GenerationConfig` carrying its fields drives SFDLM the same way:

    | DiffusionGemma | here |
    |---|---|
    | `max_denoising_steps` (steps per canvas) | `max_denoising_steps` (steps per block) |
    | `t_min`, `t_max` (`LinearTemperatureScheduleLogitsProcessor`) | the same schedule, same formula |
    | `stability_threshold`, `confidence_threshold` (`StableAndConfidentStoppingCriteria`) | the same stop |
    | `tokens_per_forward` in the output | `SFDLMGenerationOutput.tokens_per_forward` |
    | `max_new_tokens`, `max_length`, special tokens | the same |

    Not taken: `sampler_config` (DiffusionGemma's entropy-bound sampler renoises a uniform canvas; here the
    sampler is `sampler`), `cache_implementation`/`cache_config` (no KV cache), `disable_compile`. As in
    transformers' other models and unlike DiffusionGemma, `return_dict_in_generate` defaults to `False`.
    """

    def __init__(self, **kwargs):
        # Like `DiffusionGemmaGenerationConfig`, do not call `super().__init__()`: most autoregressive
        # fields (beams, caches, penalties) mean nothing here.
        self.max_new_tokens: int | None = kwargs.pop("max_new_tokens", None)
        self.max_length: int | None = kwargs.pop("max_length", None)

        self.steps: int | None = kwargs.pop("steps", None)
        self.max_denoising_steps: int | None = kwargs.pop("max_denoising_steps", None)
        self.sampler: str | None = kwargs.pop("sampler", None)
        self.do_sample: bool | None = kwargs.pop("do_sample", None)
        self.temperature: float | None = kwargs.pop("temperature", None)
        self.t_min: float | None = kwargs.pop("t_min", None)
        self.t_max: float | None = kwargs.pop("t_max", None)
        self.top_k: int | None = kwargs.pop("top_k", None)
        self.top_p: float | None = kwargs.pop("top_p", None)
        self.confidence_measure: str | None = kwargs.pop("confidence_measure", None)
        self.confidence_threshold: float | None = kwargs.pop("confidence_threshold", None)
        self.block_length: int | None = kwargs.pop("block_length", None)
        self.stop_when_stable: int | None = kwargs.pop("stop_when_stable", None)
        self.stability_threshold: int | None = kwargs.pop("stability_threshold", None)
        compute_dtype = kwargs.pop("compute_dtype", None)
        if isinstance(compute_dtype, torch.dtype):
            compute_dtype = str(compute_dtype).removeprefix("torch.")
        self.compute_dtype: str | None = compute_dtype

        self.num_return_sequences: int | None = kwargs.pop("num_return_sequences", None)
        self.output_history: bool | None = kwargs.pop("output_history", None)
        self.return_dict_in_generate: bool | None = kwargs.pop("return_dict_in_generate", None)

        self.mask_token_id: int | None = kwargs.pop("mask_token_id", None)
        self.pad_token_id: int | None = kwargs.pop("pad_token_id", None)
        self.eos_token_id: int | list[int] | None = kwargs.pop("eos_token_id", None)
        self.bos_token_id: int | None = kwargs.pop("bos_token_id", None)

        kwargs.pop("_commit_hash", None)
        for name in ("output_attentions", "output_hidden_states"):  # False in files written by transformers 5.0
            if not kwargs.get(name, True):
                kwargs.pop(name)
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
            "confidence_threshold": 0.9,  # 0.005 (DiffusionGemma's) with `stability_threshold`
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

        for name in ("steps", "max_denoising_steps", "max_length", "num_return_sequences", "block_length"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value <= 0):
                fail(name, "a positive integer")
        for name in ("max_new_tokens", "top_k", "stop_when_stable", "stability_threshold"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                fail(name, "a non-negative integer")
        if self.temperature is not None and (not is_number(self.temperature) or not 0 <= self.temperature < math.inf):
            fail("temperature", "a finite number >= 0 (0 means greedy)")
        if self.top_p is not None and (not is_number(self.top_p) or not 0 < self.top_p <= 1):
            fail("top_p", "a number in (0, 1]")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not 0 <= value < math.inf):
                fail(name, "a finite number >= 0 (DiffusionGemma's temperature schedule)")
        self._validate_combinations()
        if self.stability_threshold is not None:  # DiffusionGemma's meaning: a mean-entropy bound in nats
            if self.confidence_threshold is not None and (
                not is_number(self.confidence_threshold) or not 0 < self.confidence_threshold < math.inf
            ):
                fail("confidence_threshold", "a finite number > 0 (with `stability_threshold`: DiffusionGemma's "
                                             "bound on the mean entropy of p_hat, in nats)")
        elif self.confidence_threshold is not None and (
            not is_number(self.confidence_threshold) or not 0 < self.confidence_threshold <= 1
        ):
            fail("confidence_threshold", "a number in (0, 1]")
        if self.confidence_measure is not None and self.confidence_measure not in CONFIDENCE_MEASURES:
            fail("confidence_measure", f"one of {CONFIDENCE_MEASURES}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            fail("sampler", f"one of {sorted(SAMPLERS)}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            fail("compute_dtype", f"one of {COMPUTE_DTYPES}")
        if self.do_sample is True and self.temperature is not None and self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"`do_sample=True` asks for sampling but `temperature`={self.temperature} means greedy "
                             f"(below {MIN_TEMPERATURE}); pass `do_sample=False` for greedy decoding.")
        for name in ("do_sample", "output_history", "return_dict_in_generate"):
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

    def _validate_combinations(self) -> None:
        """Fields that say the same thing twice, or two things at once."""
        if self.steps is not None and self.max_denoising_steps is not None:
            raise ValueError(f"`steps`={self.steps} (shared among the blocks) and `max_denoising_steps`="
                             f"{self.max_denoising_steps} (DiffusionGemma's, per block) are both set; set one.")
        if (self.t_min is None) != (self.t_max is None):
            raise ValueError(f"DiffusionGemma's temperature schedule needs both `t_min` and `t_max`, got t_min="
                             f"{self.t_min!r} and t_max={self.t_max!r}.")
        if self.t_min is not None and not self.t_max > self.t_min:
            raise ValueError(f"`t_max` must be greater than `t_min` (the schedule starts at t_max and falls towards "
                             f"t_min), got t_min={self.t_min} and t_max={self.t_max}.")
        if self.t_min is not None and self.temperature is not None and self.temperature >= MIN_TEMPERATURE:
            raise ValueError(f"`temperature`={self.temperature} and the schedule `t_min`={self.t_min}, `t_max`="
                             f"{self.t_max} both set the temperature; set one (temperature 0 / do_sample=False "
                             "still means greedy).")
        if self.stability_threshold is not None and self.sampler == "threshold":
            raise ValueError("`sampler='threshold'` reads `confidence_threshold` as a per-position confidence, but "
                             f"`stability_threshold`={self.stability_threshold} makes it DiffusionGemma's mean-entropy "
                             "bound; use another sampler with DiffusionGemma's stop.")

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields that are set (unset fields mean "use the defaults" and need no saving). Without
        `_from_model_config`, which would make a plain `GenerationConfig.from_pretrained` drop our fields."""
        return {key: value for key, value in super().to_diff_dict().items()
                if value is not None and key != "_from_model_config"}

    @classmethod
    def from_generation_config(cls, config: GenerationConfig) -> "SFDLMGenerationConfig":
        """The fields of a plain `GenerationConfig` that this class has and that are set (a plain config
        loaded by `GenerationConfig.from_pretrained` from a saved SFDLM model carries all of ours)."""
        names = [name for name in vars(cls()) if not name.startswith("_") and name != "transformers_version"]
        return cls(**{name: getattr(config, name) for name in names if getattr(config, name, None) is not None})

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
        tokens_per_forward (`torch.FloatTensor` of shape `(batch_size * num_return_sequences,)`):
            DiffusionGemma's secondary metric: each row's generated positions (not counting the padding after
            its first generated EOS) per forward pass (`num_forward_passes`; 0 when nothing was generated).
        history (`tuple[torch.LongTensor]`, *optional*):
            With `output_history=True`: the canvas after every denoising step, each `(batch, length)`.
    """

    sequences: torch.LongTensor | None = None
    num_forward_passes: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    tokens_per_forward: torch.FloatTensor | None = None


# ---------------------------------------------------------------------------------------------- the mixin
def requested_new_tokens(config, length: int, default: int) -> int:
    """New positions a call asks for: `max_new_tokens`, else `max_length` minus the input's `length`, else
    `default`. The caller applies its own limits (the canvas in full-canvas mode, none in block mode)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is not None:
        if config.max_length < length:
            raise ValueError(f"The input is {length} tokens long, longer than `max_length`={config.max_length}.")
        return config.max_length - length
    return default


class SFDLMGenerationMixin:
    """`generate` for SFDLM models (iterative denoising), in place of transformers' `GenerationMixin`.

    The model class provides `config` (`vocab_size`, `mask_token_id`, `max_position_embeddings`, optionally
    `time_conditioning`), `diffusion` (`process`, `schedule`, `mask_token_id`, `x0_probs`, `reverse_probs`)
    and `denoise(ids, timesteps, attention_mask, positions=None)` returning logits of p_hat(x_0 | x_t),
    independent for each row: (B, L, V), or (N, V) at the N `True` entries of a (B, L) bool `positions` in
    row-major order (the LM head then runs at those positions only). Put it first among the bases so its
    `generate` wins.
    """

    generation_config_class = SFDLMGenerationConfig

    def post_init(self):
        super().post_init()
        # transformers 5.0 ignores `generation_config_class` and gives every model a plain
        # `GenerationConfig.from_model_config` (later versions build ours).
        if not isinstance(getattr(self, "generation_config", None), SFDLMGenerationConfig):
            self.generation_config = SFDLMGenerationConfig.from_model_config(self.config)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
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
            generation_config ([`SFDLMGenerationConfig`] or a plain `GenerationConfig`, *optional*):
                Overrides the model's `generation_config`; `**kwargs` naming its fields override both. Of a
                plain `GenerationConfig` the fields that `SFDLMGenerationConfig` has are used (`do_sample`,
                `temperature`, `top_k`, `top_p`, `max_new_tokens`, ...).
            streamer (*optional*):
                Gets `put(ids)` with the canvas before the first generated position, `put_draft(ids)` with the
                rest of the canvas after every step (if it has `put_draft`, as transformers'
                `TextDiffusionStreamer`), `put(ids)` with the final rest, then `end()`.
            logits_processor (`LogitsProcessorList`, *optional*):
                Called as transformers calls them, `processor(input_ids, scores)`, once per network evaluation,
                on the N positions a sampler draws at: `scores` (N, V) float32 logits of those positions and
                `input_ids` (N, length) the current canvas of each position's row. Runs before the filters.
            stopping_criteria (`StoppingCriteriaList`, *optional*):
                Called as `criteria(canvas, None)` after every step; rows for which it returns True stop.
            generator (`torch.Generator` or list of them, *optional*):
                One generator per output row (`batch * num_return_sequences`) makes each row reproducible on
                its own; a single generator (or the global RNG when `None`) seeds one generator per row.

        Returns:
            `torch.LongTensor` `(batch * num_return_sequences, length + new)`, or an [`SFDLMGenerationOutput`]
            with `return_dict_in_generate=True`.
        """
        if getattr(self.config, "block_size", None) is not None:  # block diffusion: block by block, cached states
            from .generation_block import generate_blocks

            return generate_blocks(self, input_ids, attention_mask, generation_config, streamer, logits_processor,
                                   stopping_criteria, generator, **kwargs)
        config = self._prepare_generation_config(generation_config, **kwargs)
        plan = self._plan_generation(input_ids, attention_mask, config, generator)
        sampler = SAMPLERS[plan.sampler_name](config)
        run = _Run.start(plan, Denoiser(self, plan, config, logits_processor), streamer, stopping_criteria)
        for block, num_steps in enumerate(plan.steps):
            run.start_block()
            grid = sampler.time_grid(num_steps)
            for index, (t, s) in enumerate(grid):
                run.network.temperature = _step_temperature(config, steps_left=len(grid) - index, steps=len(grid))
                if not self._denoising_step(run, plan, sampler, block, t, s):
                    break
            if run.all_finished_after(plan, block):
                break
        return run.finish(plan)

    def _denoising_step(self, run: "_Run", plan: "_Plan", sampler: Sampler, block: int, t: float, s: float) -> bool:
        """One reverse step x_t -> x_s of the current block; False when the block has nothing left to do."""
        update = run.updatable(plan, block, self.diffusion.process)
        if not update.any():
            return False
        step = self._sampling_step(run, plan, update, t, s)
        stopped = None
        if plan.config.stability_threshold is not None:  # DiffusionGemma's stop, on this step's evaluation
            argmax_canvas, stopped = run.stable_and_confident(step, plan)
            step = dataclasses.replace(step, update_mask=update & ~stopped.unsqueeze(-1))
        new = sampler(step) if step.update_mask.any() else run.canvas
        if new.shape != run.canvas.shape or bool(((new != run.canvas) & ~step.update_mask).any()):
            raise RuntimeError(f"Sampler {sampler.name!r} changed positions outside `update_mask`.")
        if stopped is not None and stopped.any():  # the stopped rows' block ends as its argmax canvas
            new = torch.where(update & stopped.unsqueeze(-1), argmax_canvas, new)
            run.block_done |= stopped
        run.advance(new, plan, block)
        return True

    def _sampling_step(self, run: "_Run", plan: "_Plan", update: torch.Tensor, t: float, s: float) -> SamplingStep:
        rows, device = run.canvas.shape[0], run.canvas.device
        t_rows = torch.full((rows,), t, dtype=torch.float64, device=device)
        s_rows = torch.full((rows,), s, dtype=torch.float64, device=device)
        schedule = self.diffusion.schedule
        return SamplingStep(canvas=run.canvas, update_mask=update, t=t_rows, s=s_rows, alpha_t=schedule.alpha(t_rows),
                            alpha_s=schedule.alpha(s_rows), is_last=s == 0, greedy=plan.greedy,
                            diffusion=self.diffusion, generators=plan.generators, config=plan.config,
                            network=run.network)

    # ------------------------------------------------------------------ configuration
    def _prepare_generation_config(self, generation_config, **kwargs) -> SFDLMGenerationConfig:
        """Priority: kwargs > `generation_config` > `self.generation_config` > global defaults."""
        if generation_config is None:
            config = SFDLMGenerationConfig()
        elif isinstance(generation_config, SFDLMGenerationConfig):
            config = copy.deepcopy(generation_config)
        elif isinstance(generation_config, GenerationConfig):
            config = SFDLMGenerationConfig.from_generation_config(generation_config)
        else:
            raise TypeError(f"`generation_config` must be an SFDLMGenerationConfig or a GenerationConfig, got "
                            f"{type(generation_config).__name__}.")
        unknown = sorted(name for name in kwargs if not hasattr(config, name) or name.startswith("_"))
        if unknown:
            raise ValueError(f"`generate` got unexpected arguments {unknown}; generation options are the fields "
                             "of SFDLMGenerationConfig.")
        for name, value in kwargs.items():
            for other in _ALTERNATIVES.get(name, ()):  # a kwarg replaces what the config said another way
                setattr(config, other, None)
            setattr(config, name, value)
        model_config = getattr(self, "generation_config", None)
        if isinstance(model_config, SFDLMGenerationConfig):
            for name, value in model_config.to_dict().items():
                if (hasattr(config, name) and getattr(config, name) is None and not name.startswith("_")
                        and all(getattr(config, other) is None for other in _ALTERNATIVES.get(name, ()))):
                    setattr(config, name, value)
        if config.do_sample is False:
            config.temperature = 0.0  # transformers' greedy decoding
        defaults = config._get_default_generation_params()
        if config.stability_threshold is not None:
            defaults["confidence_threshold"] = DIFFUSION_GEMMA_CONFIDENCE_THRESHOLD
        for name, value in defaults.items():
            if getattr(config, name) is None and all(getattr(config, other) is None
                                                     for other in _ALTERNATIVES.get(name, ())):
                setattr(config, name, value)
        config.validate()
        return config

    # ------------------------------------------------------------------ the plan: checks and the first canvas
    def _plan_generation(self, input_ids, attention_mask, config: SFDLMGenerationConfig, generator) -> "_Plan":
        """Check every input and build the starting canvas, before any forward pass."""
        mask_id = self._resolve_mask_id(config)
        sampler_name = self._resolve_sampler(config)
        input_ids, attention_mask = self._checked_inputs(input_ids, attention_mask)
        length = input_ids.shape[1]
        masked_input = attention_mask & (input_ids == mask_id) if mask_id is not None else torch.zeros_like(attention_mask)
        new = self._new_positions(config, length, bool(masked_input.any()))

        repeats = config.num_return_sequences
        rows = input_ids.shape[0] * repeats
        input_ids, attention_mask, masked_input = (x.repeat_interleave(repeats, 0)
                                                   for x in (input_ids, attention_mask, masked_input))
        generators = self._row_generators(generator, rows)

        # the canvas: input, then `new` appended positions; `free` marks the positions to generate
        free = torch.zeros(rows, length + new, dtype=torch.bool, device=self.device)
        free[:, length:] = True
        free[:, :length] = masked_input
        attention = torch.cat([attention_mask, torch.ones(rows, new, dtype=torch.bool, device=self.device)], 1)
        canvas = torch.cat([input_ids, torch.zeros(rows, new, dtype=torch.long, device=self.device)], 1)
        if self.diffusion.process == "absorbing":
            canvas[free] = mask_id
        else:  # the uniform prior, each row from its own generator (greedy: from the fixed `GREEDY_SEED`)
            greedy = _is_greedy(config)
            draws = [torch.randint(self.config.vocab_size, (int(n),), device=g.device,
                                   generator=torch.Generator(g.device).manual_seed(GREEDY_SEED) if greedy else g)
                     for n, g in zip(free.sum(-1).tolist(), generators) if n]
            if draws:
                canvas[free] = torch.cat([d.to(self.device) for d in draws])

        block, steps = self._blocks(config, free, length, new)
        eos_ids, pad_id = self._special_ids(config)
        return _Plan(canvas=canvas, free=free, attention=attention, block=block, steps=steps,
                     generators=generators, sampler_name=sampler_name, mask_id=mask_id, eos_ids=eos_ids,
                     pad_id=pad_id, config=config, greedy=_is_greedy(config))

    def _resolve_mask_id(self, config: SFDLMGenerationConfig) -> int | None:
        mask_id = config.mask_token_id if config.mask_token_id is not None else self.config.mask_token_id
        vocab = self.config.vocab_size
        if self.diffusion.process == "absorbing":
            if mask_id is None or self.diffusion.mask_token_id is None:
                raise ValueError("This absorbing-process model has no mask token (`mask_token_id` is None in its "
                                 "config): it cannot generate.")
            if mask_id != self.diffusion.mask_token_id:
                raise ValueError(f"`mask_token_id`={mask_id} differs from the absorbing state of the model "
                                 f"({self.diffusion.mask_token_id}).")
        if mask_id is not None and not 0 <= mask_id < vocab:
            raise ValueError(f"`mask_token_id`={mask_id} is not a token of this model (vocab_size={vocab}): mask "
                             "tokens in the input could not be filled.")
        return mask_id

    def _resolve_sampler(self, config: SFDLMGenerationConfig) -> str:
        process = self.diffusion.process
        parameterization = "score" if getattr(self.diffusion, "objective", None) == "score_entropy" else "x0"
        name = config.sampler or default_sampler(process, parameterization)
        sampler_cls = SAMPLERS[name]
        if process not in sampler_cls.processes:
            raise ValueError(f"sampler={name!r} works for the {' and '.join(sampler_cls.processes)} "
                             f"process, but this model uses the {process!r} process.")
        if parameterization not in sampler_cls.parameterizations:
            raise ValueError(f"sampler={name!r} needs a model whose outputs are "
                             f"{' or '.join(sampler_cls.parameterizations)}-parameterised, but this model's are "
                             f"{parameterization!r} (objective={self.config.objective!r}).")
        return name

    def _checked_inputs(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
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
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"`attention_mask` must be a tensor of the shape of `input_ids` {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}.")
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            bad = int(input_ids.min()) if int(input_ids.min()) < 0 else int(input_ids.max())
            raise ValueError(f"Token id {bad} in `input_ids` is outside [0, vocab_size={vocab}).")
        return input_ids, attention_mask.to(self.device).bool()

    def _new_positions(self, config: SFDLMGenerationConfig, length: int, has_masks: bool) -> int:
        new = requested_new_tokens(config, length, default=0 if has_masks else DEFAULT_MAX_NEW_TOKENS)
        total = length + new
        if total > self.config.max_position_embeddings:
            raise ValueError(f"Input length {length} + {new} new tokens = {total} exceeds the model's "
                             f"`max_position_embeddings`={self.config.max_position_embeddings}.")
        if total == 0:
            raise ValueError("Nothing to generate: no `input_ids` and `max_new_tokens`=0.")
        return new

    def _blocks(self, config: SFDLMGenerationConfig, free: torch.Tensor, length: int, new: int):
        """Semi-autoregressive blocks over the appended positions (input masks join the first block): the
        (rows, total) block index of every generated position (-1 elsewhere) and the steps of each block."""
        block_length = config.block_length or max(new, 1)
        block = torch.full(free.shape, -1, dtype=torch.long, device=free.device)
        block[:, length:] = torch.arange(new, device=free.device) // block_length
        block[:, :length][free[:, :length]] = 0
        num_blocks = max(-(-new // block_length), 1)
        if config.max_denoising_steps is not None:  # DiffusionGemma's: steps per block
            return block, [config.max_denoising_steps] * num_blocks
        if config.steps < num_blocks:
            raise ValueError(f"`steps`={config.steps} is fewer than the {num_blocks} blocks of `block_length`="
                             f"{block_length}: every block needs at least one step.")
        return block, [config.steps // num_blocks + (b < config.steps % num_blocks) for b in range(num_blocks)]

    def _special_ids(self, config: SFDLMGenerationConfig) -> tuple[torch.Tensor | None, int | None]:
        eos = config.eos_token_id
        eos_ids = None if eos is None else torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos],
                                                        device=self.device)
        pad_id = config.pad_token_id if config.pad_token_id is not None else (
            None if eos_ids is None else int(eos_ids[0]))
        vocab = self.config.vocab_size
        for name, value in (("pad_token_id", pad_id), ("eos_token_id", None if eos_ids is None else int(eos_ids.max()))):
            if value is not None and value >= vocab:
                raise ValueError(f"`{name}`={value} is outside [0, vocab_size={vocab}).")
        return eos_ids, pad_id

    @staticmethod
    def _row_generators(generator, rows: int) -> list:
        if isinstance(generator, (list, tuple)):
            wrong = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
            if wrong:
                raise TypeError(f"`generator` as a list must hold torch.Generator objects, got {wrong[0]}.")
            if len(generator) != rows:
                raise ValueError(f"`generator` as a list needs one torch.Generator per output row "
                                 f"(batch * num_return_sequences = {rows}), got {len(generator)} items.")
            return list(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {type(generator).__name__}.")
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2**62, (rows,), generator=generator, device=device).tolist()
        return [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]

    # ------------------------------------------------------------------ loading
    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             *args, **kwargs):
        """At `from_pretrained` time: use the given generation config, else the checkpoint's
        `generation_config.json` as an `SFDLMGenerationConfig` (else keep the one built from the model config)."""
        if generation_config is not None:
            self.generation_config = SFDLMGenerationConfig.from_generation_config(generation_config)
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


def _is_greedy(config: SFDLMGenerationConfig) -> bool:
    return config.temperature is not None and config.temperature < MIN_TEMPERATURE


def _step_temperature(config: SFDLMGenerationConfig, steps_left: int, steps: int) -> float:
    """The temperature of a step: `temperature`, or DiffusionGemma's linear schedule t_min + (t_max - t_min)
    n / N with n = `steps_left` of the block's N = `steps` (kept at least `MIN_TEMPERATURE`, below which
    logits are not divided at all). Greedy steps take no temperature."""
    if _is_greedy(config) or config.t_min is None:
        return config.temperature if config.temperature is not None else 1.0
    return max(config.t_min + (config.t_max - config.t_min) * steps_left / steps, MIN_TEMPERATURE)


@dataclass
class _Plan:
    """The checked inputs of one `generate` call: the first canvas and everything fixed during the run."""

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
    config: SFDLMGenerationConfig
    greedy: bool


class Denoiser:
    """The network as the samplers see it during one `generate` call.

    `denoiser(canvas, t, positions, processed=True)` returns (N, V) float32 logits at the N `True` entries of
    `positions` (B, L), row-major: the model's LM head runs at those positions only, rows without one make
    no forward pass, and a row whose canvas (and, for noise-conditioned models, t) has not changed since its
    last evaluation reuses the logits computed then if they cover the positions asked for (MDLM's cache; for
    noise-conditioned models it serves a second request within one step).
    Processed logits went through the logits processors, the uniform process's mask-token ban and the
    temperature / top-k / top-p filters. Counts forward passes and head positions per row.
    """

    def __init__(self, model, plan: _Plan, config: SFDLMGenerationConfig, logits_processor=None):
        rows, length = plan.canvas.shape
        device = plan.canvas.device
        self.model = model
        self.config = config
        self.attention = None if bool(plan.attention.all()) else plan.attention
        self.time_conditioned = bool(getattr(model.config, "time_conditioning", True))
        if isinstance(logits_processor, (list, tuple)) and not callable(logits_processor):
            logits_processor = LogitsProcessorList(logits_processor)  # a plain list works, as in transformers
        self.processors = logits_processor
        self.temperature = config.temperature if config.temperature is not None else 1.0  # set per step
        parameters = inspect.signature(model.denoise).parameters
        self.head_on_positions = "positions" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self.banned = plan.mask_id if model.diffusion.process == "uniform" and plan.mask_id is not None else None
        low_precision = config.compute_dtype in ("bfloat16", "float16")
        self.autocast = (torch.autocast(device.type, dtype=getattr(torch, config.compute_dtype)) if low_precision
                         else contextlib.nullcontext())
        self.passes = torch.zeros(rows, dtype=torch.long, device=device)
        self.head_positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.cache_canvas = torch.full_like(plan.canvas, -1)
        self.cache_t = torch.full((rows,), math.nan, dtype=torch.float64, device=device)
        self.cache_positions = torch.zeros(rows, length, dtype=torch.bool, device=device)
        self.cache_logits: torch.Tensor | None = None  # (cache_positions.sum(), V), row-major

    def __call__(self, canvas: torch.Tensor, t: torch.Tensor, positions: torch.Tensor,
                 processed: bool = True) -> torch.Tensor:
        logits = self.raw_logits(canvas, t, positions)
        if not processed:
            return logits
        if self.processors is not None:
            logits = self.processors(canvas[positions.nonzero()[:, 0]], logits)
        if self.banned is not None:
            logits[:, self.banned] = -math.inf  # a uniform model never writes the mask token
        return filter_logits(logits, self.temperature, self.config.top_k, self.config.top_p)

    def raw_logits(self, canvas: torch.Tensor, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        asked = positions.any(-1)
        if not asked.any():
            return torch.zeros(0, self.model.config.vocab_size, device=canvas.device)
        valid = (self.cache_canvas == canvas).all(-1)
        if self.time_conditioned:  # a new t means a new evaluation
            valid &= self.cache_t == t
        self._forget(~valid)
        hit = asked & valid & ~(positions & ~self.cache_positions).any(-1)
        stale = asked & ~hit
        fresh = self._evaluate(canvas, t, positions, stale) if stale.any() else None
        if not hit.any():
            logits = fresh
        else:
            logits = torch.empty(int(positions.sum()), self.cache_logits.shape[-1], device=canvas.device)
            row_of = positions.nonzero()[:, 0]
            if fresh is not None:
                logits[stale[row_of]] = fresh
            logits[hit[row_of]] = self.cache_logits[self._cache_index()[positions & hit.unsqueeze(-1)]]
        self._remember(canvas, t, positions, asked, logits)
        return logits.clone()  # callers may change it in place; the cache keeps the raw logits

    def _evaluate(self, canvas, t, positions, rows) -> torch.Tensor:
        which = rows.nonzero().squeeze(-1)
        self.passes[which] += 1
        self.head_positions[which] += positions[which].sum(-1)
        mask = None if self.attention is None else self.attention[which]
        with self.autocast:
            if self.head_on_positions:
                logits = self.model.denoise(canvas[which], t[which].float(), mask, positions=positions[which])
            else:  # a `denoise` without `positions` (B, L, V)
                logits = self.model.denoise(canvas[which], t[which].float(), mask)[positions[which]]
        return logits.float()

    def _cache_index(self) -> torch.Tensor:
        return self.cache_positions.flatten().cumsum(0).view_as(self.cache_positions) - 1

    def _forget(self, rows: torch.Tensor) -> None:
        """Drop the cached logits of `rows` (B,) (their canvas or t moved on), freeing them before evaluating."""
        drop = self.cache_positions & rows.unsqueeze(-1)
        if not drop.any():
            return
        keep = self.cache_positions & ~drop
        self.cache_logits = self.cache_logits[keep[self.cache_positions]] if keep.any() else None
        self.cache_positions = keep

    def _remember(self, canvas, t, positions, asked, logits) -> None:
        """The logits of the rows just asked replace theirs in the cache; other rows' entries stay."""
        keep = self.cache_positions & ~asked.unsqueeze(-1)
        if keep.any():
            merged = positions | keep
            index = merged.flatten().cumsum(0).view_as(merged) - 1
            values = torch.empty(int(merged.sum()), logits.shape[-1], dtype=logits.dtype, device=logits.device)
            values[index[positions]] = logits
            values[index[keep]] = self.cache_logits[self._cache_index()[keep]]
            self.cache_positions, self.cache_logits = merged, values
        else:
            self.cache_positions, self.cache_logits = positions.clone(), logits
        self.cache_canvas[asked] = canvas[asked]
        self.cache_t[asked] = t[asked].to(self.cache_t)


@dataclass
class _Run:
    """The mutable state of one `generate` call: the canvas, finished rows, history and stream."""

    canvas: torch.Tensor
    finished: torch.Tensor
    network: Denoiser
    streamer: Any
    stopping_criteria: Any
    first_generated: int  # the streamer gets the canvas before this position once
    history: list = field(default_factory=list)
    stable_for: torch.Tensor | None = None
    block_done: torch.Tensor | None = None
    last_argmax: torch.Tensor | None = None  # DiffusionGemma's stop: the previous step's argmax canvas
    argmax_same_for: torch.Tensor | None = None  # and for how many steps before it it was the same

    @classmethod
    def start(cls, plan: _Plan, network: Denoiser, streamer, stopping_criteria) -> "_Run":
        canvas = plan.canvas
        first = int(plan.free.any(0).nonzero()[0]) if plan.free.any() else canvas.shape[1]
        if streamer is not None:
            streamer.put(canvas[:, :first].cpu())
        finished = torch.zeros(canvas.shape[0], dtype=torch.bool, device=canvas.device)
        return cls(canvas, finished, network, streamer, stopping_criteria, first)

    def start_block(self) -> None:
        self.stable_for = torch.zeros_like(self.finished, dtype=torch.long)
        self.block_done = torch.zeros_like(self.finished)
        self.last_argmax = None
        self.argmax_same_for = torch.full_like(self.finished, -1, dtype=torch.long)

    def stable_and_confident(self, step: SamplingStep, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffusionGemma's `StableAndConfidentStoppingCriteria` for the rows of `step`: the argmax canvas
        (B, L) (the argmax of the processed p_hat(x_0 | x_t) at the positions still to generate: the masked
        ones for the absorbing process, every updatable one for the uniform process; the canvas elsewhere) and
        (B,) whether it has been the same for `stability_threshold` steps before this one and the mean entropy
        of p_hat over the row's updatable positions (0 where an absorbing token carries over) is below
        `confidence_threshold`. Uses the network evaluation the sampler then reuses (`Denoiser` cache)."""
        config = plan.config
        open_positions = step.masked() if step.diffusion.process == "absorbing" else step.update_mask
        probs = step.x0_probs(open_positions)
        argmax_canvas = step.canvas.clone()
        argmax_canvas[open_positions] = probs.argmax(-1)
        entropy = torch.zeros(open_positions.shape[0], dtype=torch.float64, device=probs.device)
        entropy.index_add_(0, step.rows(open_positions), -torch.special.xlogy(probs, probs).sum(-1).double())
        mean_entropy = entropy / step.update_mask.sum(-1).clamp_min(1)
        rows = step.update_mask.any(-1)
        if self.last_argmax is None:
            same = torch.zeros_like(rows)
        else:
            same = ((argmax_canvas == self.last_argmax) | ~step.update_mask).all(-1)
        self.argmax_same_for = torch.where(rows, torch.where(same, self.argmax_same_for + 1, 0), self.argmax_same_for)
        self.last_argmax = torch.where(rows.unsqueeze(-1), argmax_canvas, step.canvas if self.last_argmax is None
                                       else self.last_argmax)
        stable = self.argmax_same_for >= config.stability_threshold
        return argmax_canvas, rows & stable & (mean_entropy < config.confidence_threshold)

    def masked_in_block(self, plan: _Plan, block: int) -> torch.Tensor:
        """(B,) whether a row's block still holds a mask token."""
        if plan.mask_id is None:
            return torch.zeros_like(self.finished)
        return (plan.free & (plan.block == block) & (self.canvas == plan.mask_id)).any(-1)

    def updatable(self, plan: _Plan, block: int, process: str) -> torch.Tensor:
        """(B, L) the positions the next step may change: the block's, in rows neither finished nor done."""
        if process == "absorbing":  # a block without masks has nothing left to do
            self.block_done |= ~self.masked_in_block(plan, block)
        return plan.free & (plan.block == block) & ~(self.finished | self.block_done).unsqueeze(-1)

    def advance(self, new: torch.Tensor, plan: _Plan, block: int) -> None:
        """Take the sampler's canvas; update the stability counters, stopping criteria, history, stream."""
        changed = (new != self.canvas).any(-1)
        self.canvas = new
        config = plan.config
        if config.stop_when_stable:
            self.stable_for = torch.where(changed, torch.zeros_like(self.stable_for), self.stable_for + 1)
            self.block_done |= (self.stable_for >= config.stop_when_stable) & ~self.masked_in_block(plan, block)
        if self.stopping_criteria is not None:
            self.finished |= self.stopping_criteria(new, None).to(new.device)
        if config.output_history:
            self.history.append(new.clone())
        if self.streamer is not None and hasattr(self.streamer, "put_draft"):
            self.streamer.put_draft(new[:, self.first_generated:].cpu())

    def all_finished_after(self, plan: _Plan, block: int) -> bool:
        """With several blocks, a row whose generated text has ended skips the later ones (they become padding)."""
        if plan.eos_ids is None or len(plan.steps) == 1:
            return False
        self.finished |= (plan.free & (plan.block <= block) & torch.isin(self.canvas, plan.eos_ids)).any(-1)
        return bool(self.finished.all())

    def finish(self, plan: _Plan):
        canvas = self.canvas
        if plan.eos_ids is not None:  # generated positions after a row's first generated EOS become padding
            is_eos = plan.free & torch.isin(canvas, plan.eos_ids)
            after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
            canvas = canvas.masked_fill(plan.free & after_eos, plan.pad_id)
        if self.streamer is not None:
            self.streamer.put(canvas[:, self.first_generated:].cpu())
            self.streamer.end()
        config = plan.config
        if not (config.return_dict_in_generate or config.output_history):
            return canvas
        generated = plan.free.sum(-1)
        if plan.eos_ids is not None:  # not counting the padding after the first generated EOS
            generated = generated - (plan.free & after_eos).sum(-1)
        return SFDLMGenerationOutput(sequences=canvas, num_forward_passes=self.network.passes,
                                     tokens_per_forward=generated / self.network.passes.clamp_min(1),
                                     history=tuple(self.history) if config.output_history else None)


__all__ = [
    "AncestralSampler",
    "ConfidenceSampler",
    "Denoiser",
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
