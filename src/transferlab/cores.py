"""Sharing the CPU cores between the processes that compute at the same time.

Two training processes that each start one compute thread per core run far slower side by side than one
after the other (2.2x measured on this project's 2-core machine: two `dvc queue` workers); with a share of
the cores each they keep their speed. So a process holds a slot while it computes (:func:`shared`: a lock
file in a folder of the temp directory, released by the OS too if the process dies) and runs
``cores // sharers`` threads, where sharers is the number of slots held or, if larger, of ``dvc queue``
workers running on the machine (each runs one experiment at a time). The count is taken again every few
seconds (:func:`refresh`): when a neighbour finishes, the others take its cores back.
``TRANSFERLAB_THREADS=N`` sets the count instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ConfigError

THREADS_ENV = "TRANSFERLAB_THREADS"
SLOTS_ENV = "TRANSFERLAB_CPU_SLOTS"  # the slots folder (default: transferlab-cpu-slots in the temp directory)
MAX_SLOTS = 256
RECOUNT_SECONDS = 5.0

log = logging.getLogger("transferlab.cores")
_slot: int | None = None  # this process's open, locked slot file, while it computes
_depth = 0  # nested shared() blocks (validation inside a training run)
_pinned = False  # the thread count stays as the outermost block set it
_counted_at = float("-inf")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def slots_dir() -> Path:
    return Path(os.environ.get(SLOTS_ENV) or Path(tempfile.gettempdir()) / "transferlab-cpu-slots")


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding the lock of ``path``, or None if another holder has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def holders(folder: Path) -> int:
    """How many slots of ``folder`` are held now (this process's included)."""
    count = 0
    for path in folder.glob("slot-*"):
        fd = _try_lock(path)
        if fd is None:
            count += 1
        else:
            os.close(fd)  # closing releases the lock
    return count


def claim(folder: Path) -> int:
    """Lock a free slot of ``folder``; the descriptor stays open (and the slot held) until the process
    ends."""
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(MAX_SLOTS):
        fd = _try_lock(folder / f"slot-{number}")
        if fd is not None:
            return fd
    raise RuntimeError(f"all {MAX_SLOTS} CPU slots in {folder} are held")


def share(cores: int, processes: int) -> int:
    """Threads for each of ``processes`` processes on ``cores`` cores (at least one)."""
    return max(1, cores // max(1, processes))


def fixed_threads() -> int | None:
    value = os.environ.get(THREADS_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(
            f"{THREADS_ENV}={value!r}: give a whole number of threads >= 1 (or unset it to share the cores)"
        )
    return int(value)


def queue_workers() -> int:
    """``dvc queue`` workers running on this machine (``dvc exp queue-worker``): each may be computing."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            count += b"queue-worker" in cmdline.read_bytes()
    return count


@contextlib.contextmanager
def shared(pin: bool = False) -> Iterator[int]:
    """Hold a slot while the block computes, with this process's share of the cores (the thread count it
    yields).

    ``pin``: keep the count this block starts with, inner blocks included (``torch.compile`` would compile
    again).
    """
    global _slot, _depth, _pinned
    outermost = _depth == 0
    if fixed_threads() is None and outermost:
        _slot = claim(slots_dir())
    _depth += 1
    try:
        threads = refresh(force=True)
        _pinned = _pinned or pin
        yield threads
    finally:
        _depth -= 1
        if outermost:
            _pinned = False
            if _slot is not None:
                os.close(_slot)  # releases the lock
                _slot = None


def refresh(force: bool = False) -> int:
    """Inside :func:`shared`, set torch's thread count to this process's share of the cores and return it;
    cheap to call every step (the count is taken again every few seconds)."""
    global _counted_at
    fixed = fixed_threads()
    if fixed is not None:
        if torch.get_num_threads() != fixed:
            torch.set_num_threads(fixed)
        return fixed
    now = time.monotonic()
    if _slot is None or _pinned or (not force and now - _counted_at < RECOUNT_SECONDS):
        return torch.get_num_threads()
    _counted_at = now
    threads = share(available_cores(), max(holders(slots_dir()), queue_workers()))
    if threads != torch.get_num_threads():
        log.info("%d compute thread(s): this process's share of %d cores", threads, available_cores())
        torch.set_num_threads(threads)
    return threads
