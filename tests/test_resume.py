"""Never lose a run: a training process killed mid-run (SIGKILL, Ctrl-C) resumes and ends exactly where an
uninterrupted run ends; a changed param starts fresh instead."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from conftest import run_command
from transferlab import training

pytestmark = pytest.mark.slow  # every test here runs dvc or training stages end to end

TRAIN = [sys.executable, "-m", "transferlab.stages.train", "finetune"]


def set_train(repo: Path, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def repo(project_repo):
    # 6 batches an epoch, 8 epochs: long enough to be stopped in the middle
    set_train(project_repo, epochs=8, batch_size=2)
    run_command(["dvc", "repro", "prepare"], project_repo)
    return project_repo


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def saved_epoch(repo: Path) -> int:
    try:
        return torch.load(repo / "data/resume/finetune.pt", weights_only=True)["progress"]["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def is_trainer(process: psutil.Process) -> bool:
    """The Python training process itself: DVC's shell wrapper around it may or may not exec it,
    depending on the system."""
    try:
        return process.cmdline()[1:3] == ["-m", "transferlab.stages.train"]
    except psutil.Error:
        return False


def results(repo: Path) -> dict:
    """Everything a finished run leaves: curves, summary, weights."""
    curves = repo / "metrics/train_finetune/plots/metrics"
    summary = json.loads((repo / "metrics/train_finetune/metrics.json").read_text())
    checkpoint = torch.load(repo / "data/models/finetune/model.pt", weights_only=True)
    return {
        "curves": {
            str(p.relative_to(curves)): [line.split("\t")[:2] for line in p.read_text().splitlines()]
            for p in sorted(curves.rglob("*.tsv"))
        },
        "summary": {k: v for k, v in summary.items() if k != "wall_time_s"},
        "weights": checkpoint["model"],
        "epoch": checkpoint["epoch"],
    }


def assert_same_results(got: dict, expected: dict) -> None:
    assert got["curves"] == expected["curves"]
    assert got["summary"] == expected["summary"] and got["epoch"] == expected["epoch"]
    for key, value in expected["weights"].items():
        assert torch.equal(got["weights"][key], value), key


def uninterrupted(repo: Path, monkeypatch) -> dict:
    """The same run from the start, without interruption (in this process: no second start-up)."""
    monkeypatch.chdir(repo)
    training.fit("finetune")
    return results(repo)


def test_sigkill_mid_run_then_dvc_repro_resumes_and_matches_an_uninterrupted_run(repo, monkeypatch):
    dvc = subprocess.Popen(
        ["dvc", "repro", "train_finetune"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(lambda: saved_epoch(repo) >= 2, "the second epoch's saved state")
    trainers = [p for p in psutil.Process(dvc.pid).children(recursive=True) if is_trainer(p)]
    assert len(trainers) == 1, "the training process should still be running"
    trainers[0].send_signal(signal.SIGKILL)
    dvc.wait(timeout=120)
    assert dvc.returncode != 0
    killed_at = saved_epoch(repo)
    assert 2 <= killed_at < 8

    again = run_command(["dvc", "repro", "train_finetune"], repo)
    assert f"resuming finetune from epoch {killed_at + 1}" in again.stderr
    resumed = results(repo)
    steps = [int(step) for step, _ in resumed["curves"]["train/loss.tsv"][1:]]
    assert steps == list(range(8)), "dvclive curves continue without gaps or duplicates"
    assert not (repo / "data/resume/finetune.pt").exists(), "a finished run leaves no state to resume"
    assert "up to date" in run_command(["dvc", "status", "train_finetune"], repo).stdout
    assert_same_results(resumed, uninterrupted(repo, monkeypatch))


def test_ctrl_c_saves_mid_epoch_and_the_next_run_finishes_exactly(repo, monkeypatch):
    trainer = subprocess.Popen(TRAIN, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: saved_epoch(repo) >= 1, "the first epoch's saved state")
    trainer.send_signal(signal.SIGINT)
    _, stderr = trainer.communicate(timeout=120)
    assert trainer.returncode == 1 and "stopped: finetune saved at epoch" in stderr
    progress = torch.load(repo / "data/resume/finetune.pt", weights_only=True)["progress"]
    assert progress["step"] >= 1, "saved in the middle of an epoch"

    resumed = run_command(TRAIN, repo)
    assert f"resuming finetune from epoch {progress['epoch'] + 1}, step {progress['step']}" in resumed.stderr
    assert_same_results(results(repo), uninterrupted(repo, monkeypatch))


def test_a_changed_param_starts_fresh_instead_of_resuming(repo, monkeypatch, caplog):
    trainer = subprocess.Popen(TRAIN, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: saved_epoch(repo) >= 1, "the first epoch's saved state")
    trainer.send_signal(signal.SIGINT)
    trainer.communicate(timeout=120)
    assert (repo / "data/resume/finetune.pt").exists()

    set_train(repo, lr=0.03, epochs=2)
    monkeypatch.chdir(repo)
    with caplog.at_level("INFO"):
        training.fit("finetune")
    assert "params, data or code changed" in caplog.text and "resuming" not in caplog.text
    lrs = results(repo)["curves"]["lr/head.tsv"]
    assert [float(lr) for _, lr in lrs[1:2]] == [0.03] and len(lrs) == 1 + 2
