"""Never lose a run: the training state is saved atomically after every epoch (and on Ctrl-C), and a
re-run with the same params and data picks it up; anything that matters changed, it starts fresh.

The state lives in ``data/resume/<run>.pt``, outside DVC's outputs (DVC deletes a stage's outputs
before running it again), and is removed when the run completes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torchvision

from .checkpoint import load_torch_file
from .distributed import World
from .errors import ModelError
from .fileio import atomic_path
from .paths import PREPARED_DIR
from .run import Run

log = logging.getLogger("transferlab.resume")
PACKAGE_DIR = Path(__file__).parent


@dataclass
class Progress:
    """Where a run stands, in plain values (saved with the weights)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed batches of the current epoch
    loss_sum: float | torch.Tensor = 0.0  # running sums of the current epoch (tensors on the training device)
    correct: int | torch.Tensor = 0
    seen: int = 0
    epoch_lrs: dict = field(default_factory=dict)  # each group's learning rate when the current epoch began
    history: list = field(default_factory=list)  # the metrics logged for each completed epoch

    def start_epoch(self, lrs: dict) -> None:
        self.step, self.loss_sum, self.correct, self.seen, self.epoch_lrs = 0, 0.0, 0, 0, lrs

    def add_batch(self, loss_sum: float, correct: int, seen: int) -> None:
        self.step += 1
        self.loss_sum += loss_sum
        self.correct += correct
        self.seen += seen

    def train_metrics(self) -> dict:
        return {
            **self.epoch_lrs,
            "train/loss": float(self.loss_sum) / self.seen,
            "train/acc": int(self.correct) / self.seen,
        }

    def end_epoch(self, logged: dict) -> None:
        self.epoch, self.step = self.epoch + 1, 0
        self.history.append(logged)


def fingerprint(run: Run, world: World, start_from: list[Path] = ()) -> str:
    """Identifies what a run computes: params, data, code, library versions, device, ``start_from`` (the
    probe's head) and the number of data-parallel processes (all nodes).

    A saved state resumes only under the same fingerprint, so a resumed run never mixes two versions of
    anything.
    """
    digest = hashlib.sha256()
    for path in (
        [PREPARED_DIR / name for name in ("classes.json", "train.csv", "val.csv")]
        + sorted(PACKAGE_DIR.glob("*.py"))
        + list(start_from)
    ):
        digest.update(path.read_bytes())
    for name in ("train.npy", "val.npy"):
        digest.update(str((PREPARED_DIR / name).stat().st_size).encode())
    weights_file = Path(run.weights)
    weights_id = (
        [run.weights, weights_file.stat().st_size, weights_file.stat().st_mtime_ns]
        if weights_file.is_file()
        else run.weights
    )
    payload = {
        "run": run.name,
        "arch": run.arch,
        "weights": weights_id,
        "train": dataclasses.asdict(run.cfg),
        "runtime": dataclasses.asdict(run.runtime),
        "device": str(world.device),
        "processes": world.size,
        "versions": [torch.__version__, torchvision.__version__, timm.__version__],
        "data_and_code": digest.hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, expected_fingerprint: str) -> dict | None:
    """The saved state of an interrupted run with the same fingerprint, else None (a stale one is removed)."""
    if not path.is_file():
        return None
    try:
        state = load_torch_file(path)
    except ModelError as err:  # an unreadable state is never trusted: start fresh
        log.warning("ignoring unreadable training state %s (%s): starting fresh", path, err)
        state = None
    if isinstance(state, dict) and state.get("fingerprint") == expected_fingerprint:
        return state
    if isinstance(state, dict):
        log.info("params, data or code changed since %s was saved: starting fresh", path)
    path.unlink()
    return None


def rng_state(device: torch.device) -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C (or SIGTERM) into a request the loop honours after its current step.

    Yields a function that tells whether a stop was requested. A second Ctrl-C interrupts at once.
    """
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log.warning("stop requested: finishing this step and saving (Ctrl-C again to abort without saving)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(requested)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
