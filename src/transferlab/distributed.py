"""Data-parallel training with PyTorch's DistributedDataParallel, started by torchrun: one stage command
for one CPU, one GPU or N GPUs.

``runtime.processes: N`` (> 1) makes ``python -m transferlab.stages.train <run>`` start itself N times on this
machine with ``torchrun --standalone``. Across machines, start that same command under ``torchrun`` on each
(``--nnodes``, ``--nproc-per-node`` equal to ``runtime.processes``, a rendezvous endpoint): a process that
torchrun started joins its process group instead of launching more.

Each global batch of ``train.batch_size`` images is split into one equal shard per process (the sharding a
distributed sampler does, applied to the run's one seeded order), and DDP averages the gradients: N
processes step on the same images as one process. Without random augmentation, dropout or batch statistics
the steps are the same up to rounding (tested); with them, each process draws its own randomness and
normalises over its own shard. Validation and feature passes are sharded too and gathered, so every logged
metric covers the whole split. Rank 0 alone logs, checkpoints and writes outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError

STOP_CHECK_STEPS = 10  # processes agree on a stop request every this many steps (each check makes a GPU wait)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes
    (one process: rank 0 of 1, and every method is a no-op)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module whose backward pass averages gradients across processes (DDP), for training
        steps only."""
        if self.size == 1:
            return module
        return DistributedDataParallel(
            module, device_ids=[self.local_rank] if self.device.type == "cuda" else None
        )

    def share_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers on every process. DDP sends them before each training forward, which then
        updates each process's batch-norm statistics from its own shard: without this, processes would
        validate different models."""
        if self.size > 1:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch: every size-th index from its rank."""
        return indices[self.rank :: self.size]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over the processes."""
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def stop_now(self, requested: bool, step: int, steps: int) -> bool:
        """Whether to stop after ``step`` of an epoch of ``steps``: at once with one process; with several,
        every STOP_CHECK_STEPS steps and at the epoch's last, True on all if any was asked to (torchrun
        signals each one, not at the same step)."""
        if self.size == 1:
            return requested
        if step % STOP_CHECK_STEPS and step != steps:
            return False
        return bool(self.sum(torch.tensor([int(requested)], device=self.device)).item())

    def gather(self, value) -> list:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def from_main(self, value):
        """Rank 0's ``value`` on every process."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def map_rows(self, compute: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray) -> torch.Tensor:
        """``compute(rows)`` (a CPU tensor, one row per input row), each process computing every
        size-th row."""
        if self.size == 1:
            return compute(rows)
        parts = self.gather(compute(rows[self.rank :: self.size]))
        shape = next((part.shape[1:] for part in parts if len(part)), (0,))
        result = torch.empty((len(rows), *shape), dtype=parts[0].dtype)
        for rank, part in enumerate(parts):
            if len(part):
                result[rank :: self.size] = part
        return result


def launched_by_torchrun() -> bool:
    return "LOCAL_WORLD_SIZE" in os.environ


def launch(processes: int, module: str, args: list[str]) -> int:
    """Run ``python -m module args`` as ``processes`` processes on this machine with torchrun; their exit
    code.

    On the CPU each process gets its share of the cores (torchrun alone would give each one thread). torchrun
    runs in its own session and this process passes Ctrl-C and SIGTERM on to it, once: torchrun then stops its
    workers with the same signal, they save at the same step and exit, and a re-run resumes.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        module,
        *args,
    ]
    launcher = subprocess.Popen(command, env=env, start_new_session=True)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: launcher.send_signal(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        return launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def process_group(
    device: torch.device, processes: int, batch_size: int, batch_key: str = "train.batch_size"
) -> Iterator[World]:
    """This process's :class:`World`: a process group when torchrun started it, else a single process.

    ``device`` is the resolved ``runtime.device``; with CUDA each process takes the GPU of its local rank.
    """
    if not launched_by_torchrun():
        yield World(device=device)
        return
    local_size, size = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    if local_size != processes:
        raise ConfigError(
            f"runtime.processes is {processes} but torchrun started {local_size} processes per node; "
            "make them equal"
        )
    if batch_size % size:
        raise ConfigError(
            f"{batch_key} ({batch_size}) must be divisible by the {size} processes: "
            "it is the global batch, split evenly"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if torch.cuda.device_count() < local_size:
            raise ConfigError(
                f"runtime.processes: {local_size} processes per node, "
                f"but this machine has {torch.cuda.device_count()} GPU(s)"
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(
            f"runtime.processes: distributed training runs on cuda or cpu, not {device.type}; "
            "set runtime.processes: 1"
        )
    dist.init_process_group(backend)
    world = World(dist.get_rank(), size, local_rank, device)
    if not world.main:  # one process reports
        logging.getLogger("transferlab").setLevel(logging.WARNING)
    try:
        yield world
    finally:
        dist.destroy_process_group()
