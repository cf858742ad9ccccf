"""Weights combined in weight space: interpolation between two networks' weights (WiSE-FT) and their
moving average over training (EMA). Both give one network of the same size: no inference cost."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# the mixing weights at which the holdout twin of a fine-tuned run scores the interpolation
# (0: the start, 1: the end)
CURVE_POINTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def interpolate(
    start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """``start + weight * (end - start)`` for every floating-point tensor (exactly ``start`` at 0 and ``end``
    at 1, as :func:`torch.lerp` computes it); other tensors (batch-norm step counters) are taken from
    ``end``."""
    return {
        key: torch.lerp(start[key].to(value.device, value.dtype), value, weight)
        if value.is_floating_point()
        else value
        for key, value in end.items()
    }


def moving_average(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and floating-point buffers:
    ``update_parameters(model)`` after every step sets ``average = decay * average + (1 - decay) * weights``
    (the first call copies them).

    Integer buffers (batch-norm step counters, index tables) are copied, not averaged: torch's EMA function
    would truncate the average of integers. The average forgets a step's weights with time constant
    1 / (1 - decay) steps.
    """
    ema = get_ema_multi_avg_fn(decay)

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], steps: torch.Tensor) -> None:
        # torch groups the tensors by dtype: one group is all float or all integer
        if averaged[0].is_floating_point():
            ema(averaged, current, steps)
        else:
            torch._foreach_copy_(averaged, current)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of ``model``'s state dict, on the CPU."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
