"""Sharing the CPU cores between processes that compute at once (``dvc queue start -j 2``, DDP on a CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from transferlab import cores
from transferlab.errors import ConfigError


@pytest.fixture
def slots(tmp_path, monkeypatch):
    """A private slots folder, this process holding no slot yet, torch's thread count put back afterwards."""
    monkeypatch.setenv(cores.SLOTS_ENV, str(tmp_path / "slots"))
    monkeypatch.delenv(cores.THREADS_ENV, raising=False)
    monkeypatch.setattr(cores, "_counted_at", float("-inf"))
    monkeypatch.setattr(cores, "queue_workers", lambda: 0)
    threads = torch.get_num_threads()
    yield tmp_path / "slots"
    torch.set_num_threads(threads)


def test_each_process_takes_its_share_and_takes_cores_back_when_a_neighbour_ends(slots, monkeypatch):
    monkeypatch.setattr(cores, "available_cores", lambda: 4)
    with cores.shared() as threads:
        assert threads == 4 and torch.get_num_threads() == 4, "alone: every core"
        neighbours = [
            cores.claim(slots),
            cores.claim(slots),
        ]  # two other processes' slots (each lock is its own)
        assert cores.holders(slots) == 3
        assert cores.refresh() == 4, "counted again only every few seconds"
        assert cores.refresh(force=True) == 1 and torch.get_num_threads() == 1, (
            "three processes on four cores: one thread each"
        )
        os.close(neighbours.pop())  # a neighbour ends, however it ends: the OS releases its lock
        assert cores.refresh(force=True) == 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(
            cores, "queue_workers", lambda: 4
        )  # four dvc queue workers, each about to compute
        assert cores.refresh(force=True) == 1
    assert cores.holders(slots) == 1, "the slot is released when the block ends"
    assert cores.share(2, 2) == 1 and cores.share(2, 3) == 1 and cores.share(16, 2) == 8


def test_another_process_sees_this_ones_slot(slots):
    cores.claim(slots)
    code = (
        "from transferlab import cores; cores.available_cores = lambda: 2; cores.queue_workers = lambda: 0\n"
        "with cores.shared() as n: print(n)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert result.stdout.strip() == "1", "two processes on two cores: one thread each"


def test_a_fixed_thread_count_from_the_environment(slots, monkeypatch):
    monkeypatch.setenv(cores.THREADS_ENV, "1")
    with cores.shared() as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert not slots.exists(), "a fixed count takes no slot"
    monkeypatch.setenv(cores.THREADS_ENV, "two")
    with (
        pytest.raises(ConfigError, match="TRANSFERLAB_THREADS='two': give a whole number of threads >= 1"),
        cores.shared(),
    ):
        pass


def test_dvc_queue_workers_are_counted_from_the_process_table():
    before = cores.queue_workers()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "print(flush=True); import time; time.sleep(30)",
            "exp",
            "queue-worker",
            "x@localhost",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        worker.stdout.readline()  # started: its command line is the one given
        assert cores.queue_workers() == before + 1
    finally:
        worker.kill()
        worker.wait()


def test_a_pinned_block_keeps_its_thread_count_through_inner_blocks(slots, monkeypatch):
    """A compiled training run: validation inside it must not
    change the count (torch.compile would compile again)."""
    monkeypatch.setattr(cores, "available_cores", lambda: 4)
    with cores.shared(pin=True) as threads:
        neighbour = cores.claim(slots)
        with cores.shared() as inner:  # validation's pass
            assert threads == inner == 4 and cores.refresh(force=True) == 4 and torch.get_num_threads() == 4
        assert cores.refresh(force=True) == 4
    with cores.shared() as threads:
        assert threads == 2, "a new block counts the neighbour"
    os.close(neighbour)
