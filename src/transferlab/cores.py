"""The CPU threads a process computes with: fixed before its first step, never changed by its neighbours.

Float sums split over a different number of threads come out different, and training amplifies the
difference, so the thread count is part of what defines a run: ``runtime.threads`` in params.yaml (DVC
sees it; runs that differ in it are different experiments), and the count it came to is written next to
the run's metrics. :func:`use` fixes it once, when a stage starts, for torch and for the BLAS and OpenMP
pools numpy and scikit-learn compute in; nothing counts again later, so a process that starts or stops
beside a run changes none of its numbers.

``0`` (the default) is this machine's cores, split evenly between the ``dvc queue`` workers running
when the process starts and between the data-parallel processes of one run (``runtime.processes``): two
trainings that each start one thread per core run 2.2x slower side by side than one after the other
(measured on this project's 2-core machine), so ``dvc queue start -j 2`` gives each worker's runs half
the cores. Such a run computes with fewer threads than the same run alone: the count it used is in its
metrics (``threads``), and ``-S runtime.threads=1`` makes the two the same computation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("transferlab.cores")
_threads: int | None = None  # the count use() fixed for this process


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def share(cores: int, processes: int) -> int:
    """Threads for each of ``processes`` processes on ``cores`` cores (at least one)."""
    return max(1, cores // max(1, processes))


def queue_workers() -> int:
    """``dvc queue`` workers running on this machine (``dvc exp queue-worker``): each may be computing."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            count += b"queue-worker" in cmdline.read_bytes()
    return count


def resolve(setting: int, processes: int = 1) -> int:
    """The thread count ``runtime.threads`` comes to on this machine, now (0: the cores, shared)."""
    if setting:
        return setting
    return share(available_cores(), max(1, queue_workers()) * processes)


def use(setting: int, processes: int = 1) -> int:
    """Fix this process's thread count (torch, and the BLAS / OpenMP pools of numpy and scikit-learn) for
    the rest of its life; return it."""
    global _threads
    from threadpoolctl import threadpool_limits

    _threads = resolve(setting, processes)
    torch.set_num_threads(_threads)
    threadpool_limits(_threads)
    log.info("%d compute thread(s) (runtime.threads: %s; %d cores)", _threads, setting, available_cores())
    return _threads


def threads() -> int:
    """The count :func:`use` fixed (torch's own count in a process that never called it)."""
    return _threads or torch.get_num_threads()
