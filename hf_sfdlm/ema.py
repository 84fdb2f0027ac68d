"""Exponential moving average of model weights, on top of `torch.optim.swa_utils.AveragedModel`.

`AveragedModel` deep-copies the model and is itself an `nn.Module`, so its `state_dict` (weights and the
`n_averaged` counter) checkpoints with everything else. We only supply the averaging rule: EMA with the
usual warm-up, decay_n = min(decay, (1 + n) / (10 + n)) after n updates, so that short runs are not
dominated by the random initialisation (the fixed-decay rule of `get_ema_multi_avg_fn` would be).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, num_updates: int) -> float:
    """Decay used for the update after `num_updates` earlier ones: min(decay, (1 + n) / (10 + n))."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def _warmup_ema_update(decay: float):
    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], model_params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # AveragedModel copies the weights on its first update, so num_averaged >= 1 here.
        weight = 1.0 - ema_decay(decay, int(num_averaged))
        torch._foreach_lerp_(ema_params, model_params, weight)

    return update


def create_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of `model` (same device, no gradients). Call `.update_parameters(model)` after every
    optimizer step; `.module` is the averaged model, used for evaluation and saving."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA `decay` must be in (0, 1), got {decay!r}.")
    ema = AveragedModel(model, multi_avg_fn=_warmup_ema_update(decay), use_buffers=False)
    ema.requires_grad_(False)
    ema.module.eval()
    return ema


__all__ = ["create_ema", "ema_decay"]
