"""Data-parallel training: the stage command started as 2 processes (torchrun, gloo, CPU) on tiny data."""

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
from torch import nn

from transferlab.config import load_params
from transferlab.errors import ConfigError
from transferlab.inference import predict_logits
from transferlab.paths import checkpoint_path, train_dir
from transferlab.splits import load_split
from transferlab.trained_model import TrainedModel


def train_stage(run: str) -> str:
    """The training stage's own command, as dvc runs it; its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "transferlab.stages.train", run], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def outcome(run: str) -> tuple[dict, dict, list[float]]:
    """The saved weights, the training summary, and the logged validation loss of each epoch."""
    state = torch.load(checkpoint_path(run), weights_only=True)
    summary = json.loads((train_dir(run) / "metrics.json").read_text())
    rows = (train_dir(run) / "plots/metrics/val/loss.tsv").read_text().splitlines()[1:]
    return state, summary, [float(row.split("\t")[1]) for row in rows]


def logged_processes(run: str) -> int:
    return yaml.safe_load((train_dir(run) / "params.yaml").read_text())["processes"]


def full_validation_loss(run: str) -> float:
    """The kept model's loss on every validation image, computed here in one process."""
    trained = TrainedModel.load(checkpoint_path(run), device="cpu")
    images, labels = load_split("val")
    logits = predict_logits(trained.model, images, trained.card.eval_input, 64)
    return nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item()


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(project):
    """Same global batch: 2 shards of 4 images, gradients averaged, give the 1-process weights and accuracy.

    Without augmentation, dropout or batch statistics (fine-tuning keeps them frozen) the only difference
    left is the order of floating-point sums.
    """
    project(
        mode="finetune",
        augment=False,
        freeze_bn_stats=True,
        batch_size=8,
        epochs=2,
        lr=0.05,
        runtime={"processes": 1},
    )
    train_stage("finetune")
    single, single_summary, _ = outcome("finetune")
    assert logged_processes("finetune") == 1
    project(runtime={"processes": 2})
    train_stage("finetune")
    double, double_summary, val_losses = outcome("finetune")

    assert logged_processes("finetune") == 2
    assert single_summary["best/epoch"] == double_summary["best/epoch"]
    assert abs(single_summary["best/val_acc"] - double_summary["best/val_acc"]) <= 0.02
    for key, value in single["model"].items():
        assert torch.allclose(value.float(), double["model"][key].float(), atol=1e-4), key
    assert val_losses[double_summary["best/epoch"] - 1] == pytest.approx(
        full_validation_loss("finetune"), abs=1e-4
    ), "the logged validation loss covers the whole validation split, not one process's shard"


@pytest.mark.slow
def test_two_processes_train_from_scratch_and_only_rank_0_writes(project):
    project(mode="finetune", runtime={"processes": 2}, batch_size=8, epochs=2)
    train_stage("scratch")
    state, summary, val_losses = outcome("scratch")
    assert state["config"]["mode"] == "scratch" and summary["epochs_run"] == 2 and len(val_losses) == 2
    assert val_losses[summary["best/epoch"] - 1] == pytest.approx(full_validation_loss("scratch"), abs=1e-4)
    assert sorted(p.name for p in train_dir("scratch").iterdir()) == ["metrics.json", "params.yaml", "plots"]


def test_global_batch_must_split_evenly(project):
    project(runtime={"processes": 3}, batch_size=8)
    with pytest.raises(
        ConfigError, match=r"train.batch_size \(8\) must be divisible by runtime.processes \(3\)"
    ):
        load_params()


def training_processes(project_dir: Path) -> list[psutil.Process]:
    """Training processes (the stage command, torchrun, its workers) running in ``project_dir``."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        if "transferlab.stages.train" in " ".join(process.info["cmdline"] or []) and process.info[
            "cwd"
        ] == str(project_dir):
            found.append(process)
    return found


@pytest.mark.slow
def test_ctrl_c_stops_every_process_which_save_and_the_rerun_resumes_exactly(project):
    """Ctrl-C to the stage command reaches torchrun once;
    all processes stop at one step, rank 0 saves, none is left."""
    project(mode="finetune", runtime={"processes": 2}, batch_size=2, epochs=4)
    state = Path("data/resume/finetune.pt")
    stage = subprocess.Popen(
        [sys.executable, "-m", "transferlab.stages.train", "finetune"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 180
    while not state.exists():
        assert time.monotonic() < deadline and stage.poll() is None, "no saved state after the first epoch"
        time.sleep(0.05)
    stage.send_signal(signal.SIGINT)
    _, stderr = stage.communicate(timeout=120)
    assert stage.returncode != 0 and "stopped: finetune saved at epoch" in stderr, stderr[-3000:]
    assert training_processes(Path.cwd()) == [], "no training process outlives the stage command"
    stopped_at = torch.load(state, weights_only=True)["progress"]["epoch"]
    assert stopped_at < 4, "stopped before the end"

    assert f"resuming finetune from epoch {stopped_at + 1}" in train_stage("finetune")
    resumed, resumed_summary, resumed_losses = outcome("finetune")
    train_stage("finetune")  # the same run again, uninterrupted
    fresh, fresh_summary, fresh_losses = outcome("finetune")
    assert resumed_losses == fresh_losses and resumed_summary["best/epoch"] == fresh_summary["best/epoch"]
    for key, value in fresh["model"].items():
        assert torch.equal(resumed["model"][key], value), key
