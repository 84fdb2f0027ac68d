"""The diffusion-LM head, once for every backbone: input checks, `forward(labels=...)`, `nelbo`.

A model class mixes in `DiffusionLMMixin` and implements only `denoise(noisy_input_ids, timesteps,
attention_mask, positions=None)` returning logits (B, L, V) of p_hat(x_0 | x_t) (or log-score outputs for
SEDD); with `positions` (B, L) bool it returns only the (N, V) rows at the N `True` entries, row-major, and
runs the output head there only (generation asks for the positions it samples). The mixin
builds the model's process (`self.diffusion`) from its config and owns the one rule of which positions
are scored (`scored_positions`): labels -100 and padding are neither corrupted nor scored.

This file is "remote code": it imports only torch, transformers and its sibling files.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .diffusion import (DiscreteDiffusion, invert_one_minus_alpha, NoiseSchedule, monte_carlo_nelbo, resolve_estimator, training_loss,
                        uses_head_only)


@dataclass
class DiffusionLMOutput(ModelOutput):
    """Output of a diffusion LM's `forward`.

    Args:
        loss: NELBO (or CE) per scored token, in nats, when `labels` were given.
        logits: (B, L, V) logits of p_hat(x_0 | x_t). For absorbing models the mask logit is -inf.
        noisy_input_ids: the corrupted x_t the network saw (when `labels` were given).
        timesteps: (B,) noise levels t of each row: drawn (with `labels`), or read from the input (an
            absorbing model called without `timesteps`, see `DiffusionLMMixin.infer_timesteps`).
        hidden_states: with `output_hidden_states=True`, the backbone's hidden states (for SFDLM, every
            U-Net stage's output; see `SFDLMModelOutput`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    noisy_input_ids: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def scored_positions(input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) bool: the positions whose likelihood is measured. Labels -100 and padding (`attention_mask`
    0) are neither corrupted nor scored; without labels every real position is."""
    scored = torch.ones_like(input_ids, dtype=torch.bool) if labels is None else labels != -100
    if attention_mask is not None:
        scored = scored & attention_mask.bool()
    return scored


def clean_and_scored(input_ids: torch.Tensor, labels: torch.Tensor | None,
                     attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, scored) from a batch: labels give the clean ids to score; elsewhere `input_ids` stay as
    conditioning (see `scored_positions`)."""
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"`labels` shape {tuple(labels.shape)} does not match `input_ids` {tuple(input_ids.shape)}.")
    scored = scored_positions(input_ids, labels, attention_mask)
    x0 = input_ids if labels is None else torch.where(scored, labels.to(input_ids.dtype), input_ids)
    return x0, scored


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def check_inputs(config, input_ids, attention_mask=None, timesteps=None) -> None:
    """Raise a clear TypeError/ValueError before any compute when ids, mask or noise levels are not what
    the model accepts. Types and shapes are checked always; values (id range, 0/1 mask, finite t in
    [0, 1]) with one host synchronisation; while `torch.compile` traces, only the id range is checked, by a
    device-side assert (no graph break)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"`input_ids` must be an integer tensor of shape (batch, length), got "
                        f"{type(input_ids).__name__} {getattr(input_ids, 'dtype', '')}.")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"`input_ids` must have shape (batch, length) with both > 0, got {tuple(input_ids.shape)}.")
    max_length = getattr(config, "max_position_embeddings", None)
    if max_length is not None and input_ids.shape[1] > max_length:
        raise ValueError(f"Sequence length {input_ids.shape[1]} exceeds `max_position_embeddings`={max_length}.")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"`attention_mask` must be a tensor of 0/1 of shape {tuple(input_ids.shape)}, "
                            f"got {type(attention_mask).__name__}.")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"`attention_mask` shape {tuple(attention_mask.shape)} does not match "
                             f"`input_ids` shape {tuple(input_ids.shape)}.")
        if attention_mask.is_complex():
            raise TypeError(f"`attention_mask` must hold 0/1 (bool, integer or float), got {attention_mask.dtype}.")
    if timesteps is not None:
        if isinstance(timesteps, bool) or not isinstance(timesteps, (numbers.Real, torch.Tensor)):
            raise TypeError(f"`timesteps` must be a float tensor of shape ({input_ids.shape[0]},) or a number, "
                            f"got {type(timesteps).__name__}.")
        if isinstance(timesteps, torch.Tensor):
            if timesteps.dtype == torch.bool or timesteps.is_complex():
                raise TypeError(f"`timesteps` must be real numbers in [0, 1], got dtype {timesteps.dtype}.")
            if timesteps.dim() > 1 or timesteps.numel() not in (1, input_ids.shape[0]):
                raise ValueError(f"`timesteps` must be a scalar or have shape ({input_ids.shape[0]},) (one noise "
                                 f"level per row), got shape {tuple(timesteps.shape)}.")
    if _is_compiling():
        # A check that raises in Python needs the values on the host: a graph break. Inside a compiled
        # graph the id range is asserted on the device instead (a RuntimeError with this message).
        torch._assert_async(((input_ids >= 0) & (input_ids < config.vocab_size)).all(),
                            f"Token ids must lie in [0, vocab_size={config.vocab_size}).")
        return
    _check_values(config, input_ids, attention_mask, timesteps)


def _check_values(config, input_ids, attention_mask, timesteps) -> None:
    """The value checks of `check_inputs`, all read back in one host synchronisation."""
    checks = [input_ids.min(), input_ids.max()]
    if attention_mask is not None:
        checks.append(((attention_mask != 0) & (attention_mask != 1)).any())
    t = None
    if timesteps is not None:
        t = torch.as_tensor(timesteps, dtype=torch.float64)
        checks.append((~torch.isfinite(t) | (t < 0) | (t > 1)).any())
    values = torch.stack([c.to(device=checks[0].device, dtype=torch.float64) for c in checks]).tolist()
    low, high = int(values[0]), int(values[1])
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"Token id {low if low < 0 else high} is outside [0, vocab_size={config.vocab_size}) "
                         "in `input_ids`.")
    rest = values[2:]
    if attention_mask is not None and rest.pop(0):
        raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (real tokens); got other values.")
    if t is not None and rest.pop(0):
        raise ValueError(f"`timesteps` must be finite noise levels in [0, 1], got {t.flatten().tolist()[:8]}.")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")


def _invert_one_minus_alpha(schedule: NoiseSchedule, target: torch.Tensor, iterations: int = 64) -> torch.Tensor:
    """t in [0, 1] with schedule.one_minus_alpha(t) = target (float64 bisection; 1 - alpha increases)."""
    return invert_one_minus_alpha(schedule, target, iterations)


def _reachable(t: torch.Tensor, has_masked: torch.Tensor, has_unmasked: torch.Tensor,
               steps: int | None) -> torch.Tensor:
    """`t` (float32) moved onto the nearest time at which an absorbing x_t with (B,) `has_masked` /
    `has_unmasked` positions is possible: t > 0 with a mask, t < 1 with an unmasked maskable position
    (the grid's 1/T and 1 - 1/T in discrete time). Rounding to the grid (or to float32) can break that."""
    if steps is not None:
        low, high = 1.0 / steps, 1.0 - 1.0 / steps
    else:  # the float32 neighbours of 0 and 1
        low, high = float(torch.finfo(torch.float32).tiny), float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    t = torch.where(has_unmasked & (t > high), torch.full_like(t, high), t)
    return torch.where(has_masked & (t < low), torch.full_like(t, low), t)  # wins for T = 1: t = 1


class DiffusionLMMixin:
    """Diffusion-LM head: `forward(labels=...)` returns the NELBO per scored token, `nelbo` estimates each
    sequence's. The host class provides `config` (with the diffusion fields of `SFDLMConfig`) and
    `denoise(noisy_input_ids, timesteps=None, attention_mask=None, positions=None)` (see the module
    docstring for `positions`), which validates its inputs with
    `self.check_inputs`; call `self.init_diffusion()` in `__init__`."""

    diffusion: DiscreteDiffusion
    output_class = DiffusionLMOutput

    def init_diffusion(self) -> None:
        """Build the model's process from its config (again after the vocabulary changed)."""
        self.diffusion = DiscreteDiffusion.from_config(self.config)

    @property
    def noise_schedule(self) -> NoiseSchedule:
        return self.diffusion.schedule

    def resize_token_embeddings(self, *args, **kwargs):
        """`PreTrainedModel.resize_token_embeddings`, then the diffusion process is rebuilt for the new
        vocabulary (the uniform prior is 1/V)."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        self.init_diffusion()
        return embeddings

    def check_inputs(self, input_ids, attention_mask=None, timesteps=None) -> None:
        """Raise before any compute when the inputs are not what the model accepts (see `check_inputs`)."""
        check_inputs(self.config, input_ids, attention_mask, timesteps)

    def _check_clean_ids(self, x0: torch.Tensor, scored: torch.Tensor) -> None:
        self.check_inputs(x0)
        self.diffusion.check_clean_ids(x0, scored)

    def _clean_batch(self, input_ids, attention_mask, labels):
        """Checked (x_0, scored) with long ids."""
        self.check_inputs(input_ids, attention_mask)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.is_floating_point()
                                   or labels.is_complex() or labels.dtype == torch.bool):
            raise TypeError(f"`labels` must be an integer tensor (clean ids, -100 where not scored), got "
                            f"{type(labels).__name__} {getattr(labels, 'dtype', '')}.")
        if labels is not None and not _is_compiling():
            bad = labels[(labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))]
            if bad.numel():
                raise ValueError(f"Token id {int(bad[0])} is outside [0, vocab_size={self.config.vocab_size}) in "
                                 "`labels` (use -100 for positions that are not scored).")
        x0, scored = clean_and_scored(input_ids.long(), None if labels is None else labels.long(), attention_mask)
        self._check_clean_ids(x0, scored)
        return x0, scored

    # The training loss's noise draws (see `diffusion.NELBO_ESTIMATORS`; discrete-time models use "uniform_t"):
    # "importance" had the lowest measured gradient variance (benchmarks/grad_variance.py: 0.64-0.68x uniform-t's
    # on sfdlm-absorbing, whose uniform-t gradients are heavy-tailed; 0.97x on sfdlm-uniform). And whether an
    # absorbing x_0 model runs its output head at masked positions only (the same loss and gradients, less
    # work). Class attributes, so an experiment can switch them per instance.
    training_estimator = "importance"
    head_only_loss = True

    # `forward` honours `num_items_in_batch`, so `transformers.Trainer` passes it and leaves the loss
    # unscaled under gradient accumulation (the model divides by the whole accumulated batch's count).
    accepts_loss_kwargs = True

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, timesteps: torch.Tensor | float | None = None,
                generator: torch.Generator | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, **kwargs):
        """
        Without `labels`: `input_ids` are corrupted ids x_t at noise levels `timesteps`; returns logits.
        Without `timesteps` either, an absorbing model reads each row's noise level from its input
        (`infer_timesteps`), so clients that call `model(input_ids, attention_mask)` (the `fill-mask`
        pipeline, `AutoModelForMaskedLM` users) work; a uniform model raises, saying what to pass.

        With `labels` (clean ids, -100 where a position is not scored): positions with a label are
        corrupted at a random noise level (stratified over the batch; or at `timesteps` when given), the
        rest (prompts, padding) stay as given in `input_ids` and condition the prediction. `loss` is the
        NELBO (or CE) per scored token in nats, so `Trainer` and a plain accelerate loop both work.

        Args:
            inputs_embeds: (B, L, H) embeddings instead of `input_ids`, without `labels` (corruption acts
                on ids) and, for noise-conditioned models, with `timesteps`. Models whose backbone does
                not take embeddings raise a ValueError.
            output_hidden_states: also return the backbone's hidden states (`hidden_states`).
            return_dict: `False` returns the output's non-None fields as a tuple, as transformers models do.
            num_items_in_batch: scored tokens in the whole accumulated batch (`Trainer` passes it); the loss
                is then this micro-batch's NELBO sum divided by it, so micro-batch losses add up to the
                full batch's per-token NELBO. `labels` at padding must be -100, as the collators here set.
        """
        if kwargs.get("output_attentions"):
            raise ValueError(f"{type(self).__name__} has no attention layers: `output_attentions=True` is not "
                             "supported (use `output_hidden_states=True`).")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_hidden_states = bool(self.config.output_hidden_states if output_hidden_states is None
                                    else output_hidden_states)
        if labels is None:
            if timesteps is None and input_ids is not None:
                timesteps = self.infer_timesteps(input_ids, attention_mask)
            logits, hidden_states = self.denoise_with_outputs(input_ids, timesteps, attention_mask, inputs_embeds,
                                                              output_hidden_states)
            t = None if timesteps is None else torch.as_tensor(timesteps, device=logits.device)
            output = self.output_class(logits=logits, timesteps=t, hidden_states=hidden_states)
        else:
            output = self._training_forward(input_ids, attention_mask, labels, timesteps, generator, inputs_embeds,
                                            output_hidden_states, num_items_in_batch)
        return output if return_dict else output.to_tuple()

    def _training_forward(self, input_ids, attention_mask, labels, timesteps, generator, inputs_embeds,
                          output_hidden_states, num_items_in_batch):
        if getattr(self.config, "block_size", None) is not None:  # block diffusion: the sum of block NELBOs
            from .block_diffusion import block_training_forward

            return block_training_forward(self, input_ids, attention_mask, labels, timesteps, generator, inputs_embeds,
                                          output_hidden_states, num_items_in_batch)
        _check_generator(generator)
        if inputs_embeds is not None:
            raise ValueError("`labels` need `input_ids`: the forward process corrupts token ids, so a training "
                             "loss cannot start from `inputs_embeds`.")
        x0, scored = self._clean_batch(input_ids, attention_mask, labels)
        u = None
        if timesteps is not None:  # fixed noise levels instead of drawn ones
            self.check_inputs(input_ids, attention_mask, timesteps)
            u = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).expand(x0.shape[0])
        hidden_states = []
        head_only = self._uses_head_only_loss(output_hidden_states)

        def denoise(ids, t, positions=None):
            if positions is not None:
                hidden_states.append(None)
                return self.denoise(ids, t, attention_mask, positions=positions)
            logits, states = self.denoise_with_outputs(ids, t, attention_mask, None, output_hidden_states)
            hidden_states.append(states)
            return logits

        loss, logits, noisy, t = training_loss(self.diffusion, denoise, x0, scored, generator, u=u,
                                               estimator=self.training_estimator, head_only=head_only)
        if num_items_in_batch is not None:
            total = torch.as_tensor(num_items_in_batch, device=loss.device)
            if total.numel() != 1 or not (torch.isfinite(total) & (total >= 0)).all():
                raise ValueError(f"`num_items_in_batch` must be a finite count >= 0 of the scored tokens in the "
                                 f"accumulated batch, got {num_items_in_batch!r}.")
            total = total.clamp_min(1)
            loss = loss * scored.sum().clamp_min(1) / total
        return self.output_class(loss=loss, logits=logits, noisy_input_ids=noisy, timesteps=t,
                                 hidden_states=hidden_states[-1])

    def _uses_head_only_loss(self, output_hidden_states: bool) -> bool:
        """Whether the training loss runs the output head at masked positions only (full canvas and block mode)."""
        # Head-only selects the masked positions: a data-dependent shape, so a compiled graph keeps the canvas.
        return bool(self.head_only_loss and not output_hidden_states and not _is_compiling()
                    and uses_head_only(self.diffusion, self._denoise_takes_positions()))

    def _denoise_takes_positions(self) -> bool:
        """Whether `denoise` accepts `positions` (a replaced or wrapped `denoise` may not)."""
        try:
            parameters = inspect.signature(self.denoise).parameters
        except (TypeError, ValueError):
            return False
        return "positions" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def denoise_with_outputs(self, input_ids, timesteps=None, attention_mask=None, inputs_embeds=None,
                             output_hidden_states: bool = False):
        """`(logits, hidden_states or None)`: `denoise`, for backbones that take neither embeddings nor
        report hidden states (a backbone that does overrides this)."""
        if inputs_embeds is not None or output_hidden_states:
            raise ValueError(f"{type(self).__name__} supports neither `inputs_embeds` nor `output_hidden_states`; "
                             "pass `input_ids` (SFDLMForDiffusionLM supports both).")
        return self.denoise(input_ids, timesteps, attention_mask), None

    def infer_timesteps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Each row's noise level t read from its input, or None when the model is not noise-conditioned.

        Absorbing process: every maskable position (a real one: `attention_mask` 1) of x_t is masked
        independently with probability 1 - alpha(t), so the fraction f of masked ones among them is the
        maximum-likelihood estimate of 1 - alpha(t), and t = alpha^-1(1 - f) inverts the schedule exactly
        (bisection in float64; on the step grid i / T for discrete-time models). The result is always a
        state the process can reach: t > 0 when a position is masked and t < 1 when a maskable one is not
        (on the grid: 1/T <= t <= 1 - 1/T; for T = 1, where a partly masked input is reachable at no t, the
        model's one step t = 1). Uniform process: a corrupted token looks like any other, so the noise level
        is not identifiable and this raises.
        """
        if not getattr(self.config, "time_conditioning", False):
            return None
        if getattr(self.config, "block_size", None) is not None and self.diffusion.process == "absorbing":
            from .block_diffusion import infer_block_timesteps  # one noise level per block, (B, blocks)

            return infer_block_timesteps(self, input_ids, attention_mask)
        if self.diffusion.process != "absorbing":
            raise ValueError(
                "This uniform-process model is noise-conditioned and its noise level cannot be read from the "
                "input (a corrupted token looks like any other): pass `timesteps` (a float or a (batch,) tensor "
                "in [0, 1]) for logits, or `labels` (clean ids) for the training loss; a collator without labels "
                "(DataCollatorWithPadding) gives no loss, use hf_sfdlm.data.DiffusionCollator. Clients that call "
                "`model(input_ids, attention_mask)` only, such as transformers pipelines, need an absorbing model "
                "(its noise level is read from the masked fraction) or one with `time_conditioning=False`.")
        self.check_inputs(input_ids, attention_mask)
        maskable = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        masked = (input_ids == self.diffusion.mask_token_id) & maskable
        fraction = masked.sum(-1).double() / maskable.sum(-1).clamp_min(1).double()
        t = _invert_one_minus_alpha(self.diffusion.schedule, fraction)
        steps = getattr(self.config, "num_timesteps", None)
        if steps is not None:
            t = (t * steps).round() / steps
        return _reachable(t.float(), masked.any(-1), (maskable & ~masked).any(-1), steps)

    def prepare_inputs_for_generation(self, input_ids=None, **kwargs) -> dict:
        """The inputs unchanged. PEFT's `CAUSAL_LM` wrapper reads this attribute (and swaps it during its
        `generate`); diffusion `generate` denoises whole sequences and never calls it."""
        return {"input_ids": input_ids, **kwargs}

    @torch.no_grad()
    def nelbo(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, num_samples: int = 16,
              generator: torch.Generator | None = None, return_samples: bool = False,
              estimator: str = "auto") -> torch.Tensor:
        """Each sequence's NELBO in nats (an upper bound on -log p(x)), by Monte Carlo over noise levels.

        The `num_samples` draws of each row are stratified. Positions with `labels == -100` (or padding)
        condition the prediction and are not scored.

        Args:
            estimator: how the noise of a draw is chosen, all unbiased for the same bound (see
                `hf_sfdlm.diffusion.NELBO_ESTIMATORS`). ``"auto"`` (default) is ``"masked_count"`` wherever it
                applies (continuous time; discrete-time absorbing): the number of masked (absorbing) or resampled
                (uniform) tokens stratified over the draws and the noise level from its conditional law, so one
                draw is bounded (finite variance); discrete-time uniform models use ``"uniform_t"`` (stratified
                steps; a finite sum of bounded terms). ``"importance"``: 1 - alpha(t) = u^2, also finite.
                ``"uniform_t"`` is the historical estimator (t uniform), whose single-draw variance is infinite
                in continuous time for schedules with alpha'(0) != 0 (loglinear, linear, geometric).

        Returns:
            (B,) mean NELBO per sequence, or (B, num_samples) single-draw estimates if `return_samples` (not
            independent: stratified; take error bars from independent calls).
            In block mode (`config.block_size`) the sum over blocks of each block's NELBO given the clean
            earlier blocks, each block a row of the same `estimator` (its own scored count for masked_count),
            its draws stratified on their own (`block_diffusion.block_nelbo`).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
        if not self.diffusion.is_likelihood_bound:
            raise ValueError(f"`nelbo` needs objective='elbo' or 'score_entropy', got {self.config.objective!r}; "
                             "a 'ce' model's loss is not a likelihood bound.")
        estimator = resolve_estimator(self.diffusion, estimator)
        _check_generator(generator)
        if getattr(self.config, "block_size", None) is not None:
            from .block_diffusion import block_nelbo

            return block_nelbo(self, input_ids, attention_mask, labels, num_samples, generator, return_samples,
                               estimator=estimator)
        x0, scored = self._clean_batch(input_ids, attention_mask, labels)

        head_only = uses_head_only(self.diffusion, self._denoise_takes_positions())

        def denoise(ids, t, positions=None):
            if positions is None:
                return self.denoise(ids, t, attention_mask)
            return self.denoise(ids, t, attention_mask, positions=positions)

        samples = monte_carlo_nelbo(self.diffusion, denoise, x0, scored, num_samples, generator, estimator=estimator,
                                    head_only=head_only)
        return samples if return_samples else samples.mean(-1)


__all__ = ["DiffusionLMMixin", "DiffusionLMOutput", "check_inputs", "clean_and_scored", "scored_positions"]
