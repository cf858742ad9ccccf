"""Optimizers and learning-rate schedules from ``torch.optim``, chosen by params.

Every schedule except ``plateau`` is stepped once per optimizer step: epoch-based settings
(step size, milestones, exponential decay per epoch, warm-up in epochs) are converted to steps,
so a warm-up can precede any of them, and ``step``, ``multistep`` and ``exponential`` drop the
rate at the same epoch boundaries with or without one. ``plateau`` is stepped per epoch on the
monitored metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim import lr_scheduler

from .config import TrainConfig


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``; each group carries its own lr and weight decay."""
    options = {
        "sgd": (torch.optim.SGD, {"momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0}),
        "adam": (torch.optim.Adam, {}),
        "adamw": (torch.optim.AdamW, {}),
        "rmsprop": (torch.optim.RMSprop, {"momentum": cfg.momentum}),
        "adagrad": (torch.optim.Adagrad, {}),
        "adadelta": (torch.optim.Adadelta, {}),
    }
    optimizer_class, kwargs = options[cfg.optimizer]
    return optimizer_class(groups, lr=cfg.lr, **kwargs)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    total = cfg.epochs * steps_per_epoch
    return min(cfg.warmup_steps or round(cfg.warmup_epochs * steps_per_epoch), total - 1)


def _main_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int, warmup: int):
    """The schedule after the warm-up; its step 0 is the first step after it."""
    remaining = cfg.epochs * steps_per_epoch - warmup
    if cfg.schedule == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=remaining)
    if cfg.schedule == "linear":
        return lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.0, total_iters=remaining)
    drop_epochs = {
        "step": range(cfg.step_epochs, cfg.epochs, cfg.step_epochs),
        "multistep": cfg.milestones,
        "exponential": range(1, cfg.epochs),  # gamma per epoch
    }.get(cfg.schedule)
    if drop_epochs is not None:
        # drops at the same epoch boundaries with or without a warm-up (none while it lasts)
        milestones = [
            epoch * steps_per_epoch - warmup for epoch in drop_epochs if epoch * steps_per_epoch > warmup
        ]
        return lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    # constant, and plateau between its drops
    return lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def _per_step_schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """The recipe's schedule, after its linear warm-up if it has one."""
    warmup = warmup_steps(cfg, steps_per_epoch)
    per_step = _main_schedule(optimizer, cfg, steps_per_epoch, warmup)
    if warmup > 0:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        per_step = lr_scheduler.SequentialLR(optimizer, [ramp, per_step], milestones=[warmup])
    return per_step


class LrSchedule:
    """The per-step schedule (after an optional linear warm-up) and, for ``plateau``, the per-epoch one; or
    the learning-rate range test's sweep."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: TrainConfig,
        steps_per_epoch: int,
        sweep: Sequence[float] | None = None,
    ):
        """``sweep``: the range test's learning rates, one per step, in place of the recipe's schedule: every
        group's lr is its own starting value times ``sweep[step] / cfg.lr``, so the run's lr sweeps them."""
        if sweep is None:
            self.per_step = _per_step_schedule(optimizer, cfg, steps_per_epoch)
        else:
            last = len(sweep) - 1
            self.per_step = lr_scheduler.LambdaLR(optimizer, lambda step: sweep[min(step, last)] / cfg.lr)
        self.plateau = None
        if cfg.schedule == "plateau" and sweep is None:
            mode = "max" if cfg.monitor == "val_acc" else "min"
            self.plateau = lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=cfg.gamma, patience=cfg.plateau_patience
            )

    def step(self) -> None:
        self.per_step.step()

    def end_epoch(self, monitored: float | None) -> None:
        if self.plateau is not None and monitored is not None:
            self.plateau.step(monitored)

    def state_dict(self) -> dict:
        return {
            "per_step": self.per_step.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
