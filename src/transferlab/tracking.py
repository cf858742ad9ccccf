"""Where a training run's curves go: dvclive always; TensorBoard event files too with
``logging.tensorboard``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import yaml
from dvclive import Live

from .fileio import atomic_dir, write_csv


class TrainingLog:
    """One epoch's metrics reach every logger at the same step (dvclive's step = TensorBoard's global step).

    The logs are written to ``<folder>.partial`` and take ``folder``'s place when the run completes: a
    killed or stopped run never leaves a half-written log there (a resumed run replays its history).
    An inactive log (every data-parallel process but the first) writes nothing.
    """

    def __init__(self, folder: Path, tensorboard: bool, active: bool = True):
        self.folder, self.tensorboard, self.active = Path(folder), tensorboard, active
        self.live, self.writer = None, None
        self._closing = contextlib.ExitStack()

    def __enter__(self) -> TrainingLog:
        if not self.active:
            return self
        with contextlib.ExitStack() as opening:  # a logger that fails to start closes those already started
            staging = opening.enter_context(atomic_dir(self.folder))
            self.live = Live(str(staging), dvcyaml=False, save_dvc_exp=False)
            opening.callback(self.live.end)
            if self.tensorboard:
                # imports the tensorboard package: only when asked for
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(staging / "tensorboard"))
                opening.callback(self.writer.close)
            self._closing = opening.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.__exit__(*exc)

    @property
    def summary(self) -> dict:
        return self.live.summary

    def log_params(self, params: dict) -> None:
        if self.live is None:
            return
        self.live.log_params(params)
        if self.writer is not None:
            self.writer.add_text("params", f"```\n{yaml.safe_dump(params, sort_keys=False)}```")

    def log_epoch(self, metrics: dict) -> None:
        if self.live is None:
            return
        for key, value in metrics.items():
            self.live.log_metric(key, value)
            if self.writer is not None:
                self.writer.add_scalar(key, value, self.live.step)
        self.live.next_step()
        if self.writer is not None:
            self.writer.flush()

    def write_csv(self, name: str, header: list[str], rows) -> None:
        """A table next to the curves (``metrics/train_<run>/<name>``)."""
        if self.live is not None:
            write_csv(Path(self.live.dir) / name, header, rows)

    def log_images(self, tag: str, images: np.ndarray) -> None:
        """A few cached uint8 images (N x H x W x 3), for TensorBoard's image tab."""
        if self.writer is not None:
            self.writer.add_images(tag, torch.from_numpy(np.array(images)), 0, dataformats="NHWC")
