"""Stage logic with known answers: test metrics, the comparison, atomic writes and folders,
training without validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_params
from transferlab import training
from transferlab.fileio import atomic_dir, atomic_path, write_json
from transferlab.paths import COMPARISON_JSON, COMPARISON_MD, checkpoint_path, evaluation_dir, train_dir
from transferlab.scoring import classification_metrics
from transferlab.stages import compare, features, prepare, probe


def test_metrics_with_known_answers():
    labels = np.array([0, 0, 0, 0, 1, 2])
    probs = np.eye(6, dtype=float)[[0, 0, 0, 1, 1, 3]]  # class 0: 3/4 right, class 1: right, class 2: wrong
    probs[5, 2] = 0.5  # the last image's true class is its 2nd guess
    probs += np.linspace(0, 0.01, 6)  # no ties: class 0 ranks last wherever it is not the guess
    metrics = classification_metrics(labels, probs, topk=[1, 2, 5, 6])
    assert metrics["top1"] == pytest.approx(4 / 6)
    assert metrics["mean_per_class_acc"] == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert metrics["top2"] == pytest.approx(
        5 / 6
    )  # image 5's class is its 2nd guess; image 3's is ranked last
    assert metrics["top5"] == pytest.approx(5 / 6)  # only image 3 (class 0 ranked 6th) misses
    assert metrics["top6"] == 1.0


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"top1": 0.5})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"top1": 0.')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"top1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "prepared"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("old")
        (staging / "b.txt").write_text("old")
        assert not target.exists(), "nothing appears before the block ends"
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "a.txt").write_text("new")
        raise RuntimeError("killed after one of two files")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "old", "b.txt": "old"}
    (tmp_path / "prepared.partial").mkdir()  # left by a process killed with SIGKILL (no clean-up ran)
    (tmp_path / "prepared.partial" / "stale.txt").write_text("from the killed run")
    (tmp_path / ".metrics.json.abc123.tmp").write_text('{"top1": 0.')  # a killed atomic_path writer's file
    with atomic_dir(target) as staging:
        assert not any(staging.iterdir()), "a fresh staging folder, not the killed run's"
        (staging / "c.txt").write_text("new")
    write_json(tmp_path / "metrics.json", {"top1": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "prepared"], (
        "no staging folder or temp file left"
    )
    assert [p.name for p in target.iterdir()] == ["c.txt"], "the old folder's files do not linger"


def test_atomic_dir_renames_the_old_folder_aside_before_the_new_one_in(tmp_path, monkeypatch):
    """Killed between its two renames, atomic_dir leaves the old folder whole beside an absent one;
    the next run clears it."""
    target = tmp_path / "prepared"
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("old")
    rename = Path.rename

    def killed_before_the_second_rename(self, destination):
        if self.name == "prepared.partial":
            raise KeyboardInterrupt  # as a kill at that moment would leave it
        return rename(self, destination)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as staging:
        (staging / "a.txt").write_text("new")
    monkeypatch.undo()
    assert not target.exists() and (tmp_path / "prepared.old.partial" / "a.txt").read_text() == "old", (
        "whole, never mixed"
    )
    with atomic_dir(target) as staging:
        (staging / "a.txt").write_text("new")
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["prepared"] and (target / "a.txt").read_text() == "new"
    )


def write_results(model: str, top1: float, per_class: dict[str, float]) -> None:
    out = evaluation_dir(model)
    out.mkdir(parents=True)
    write_json(
        out / "metrics.json",
        {
            "top1": top1,
            "top5": 1.0,
            "mean_per_class_acc": sum(per_class.values()) / len(per_class),
            "test_images": 40,
        },
    )
    rows = ["class,precision,recall,f1,support"] + [
        f"{name},0.5,{acc},0.5,10" for name, acc in per_class.items()
    ]
    (out / "per_class.csv").write_text("\n".join(rows) + "\n")
    train_dir(model).mkdir(parents=True)
    if model == "probe":
        settings = {"mode": "linear_probe", "image_size": 32, "weights": "none", "train_on_val": True}
        write_json(
            train_dir(model) / "metrics.json", {"best/val_acc": 0.7, "best/C": 0.3, "wall_time_s": 12.0}
        )
    else:
        settings = {
            "mode": model,
            "epochs": 2,
            "image_size": 32,
            "eval_image_size": 32,
            "lr": 0.1,
            "backbone_lr_scale": 0.1,
            "weights": "none",
        }
        write_json(train_dir(model) / "metrics.json", {"best/epoch": 2, "wall_time_s": 30.0})
        curves = train_dir(model) / "plots" / "metrics" / "train"
        curves.mkdir(parents=True)
        for metric in ("acc", "loss"):
            (curves / f"{metric}.tsv").write_text(f"step\t{metric}\n0\t0.5\n1\t0.6\n")
    (train_dir(model) / "params.yaml").write_text(yaml.safe_dump(settings))


def test_comparison_gains_and_ranking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    write_results("probe", 0.8, {"cat": 0.9, "dog": 0.6, "emu": 0.9, "fox": 0.7})
    write_results("finetune", 0.9, {"cat": 1.0, "dog": 0.5, "emu": 0.9, "fox": 0.8})
    write_results("scratch", 0.4, {"cat": 0.2, "dog": 0.7, "emu": 0.9, "fox": 0.3})
    compare.main()
    gains = json.loads(COMPARISON_JSON.read_text())
    assert gains["gain_over_scratch/finetune/top1"] == pytest.approx(0.5)
    assert gains["gain_over_scratch/finetune/mean_per_class_acc"] == pytest.approx((0.8 + -0.2 + 0 + 0.5) / 4)
    assert gains["gain_over_scratch/probe/top1"] == pytest.approx(0.4)
    report = COMPARISON_MD.read_text()
    table = report.split("## Training budget")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert [row.split(" | ")[0] for row in rows] == ["| Linear probe", "| Fine-tuned", "| From scratch"]
    assert (
        rows[0].endswith("| +25.00% |") and rows[1].endswith("| +27.50% |") and rows[2].endswith("| - |")
    ), "gain over scratch, mean per-class"
    assert (
        "| Linear probe | linear_probe | none | - | 32 px | C 0.3 | train + val | 70.00% (C 0.3) |" in report
    )
    assert "helps 2 classes, hurts 1, ties 1" in report
    most = report.split("## Classes that gain most")[1].split("##")[0]
    assert most.index("| cat |") < most.index("| fox |") < most.index("| emu |") < most.index("| dog |")
    assert "+80.0%" in most and "-20.0%" in most


def test_training_without_a_validation_split_keeps_the_last_epoch(tmp_path, tiny_folder, monkeypatch):
    params = tiny_params()
    params["data"].update(source=str(tiny_folder), val_per_class=0)
    params["probe"]["C"] = [1.0]  # nothing to choose among without a validation split
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    prepare.main()
    features.main()
    probe.main()  # one C: nothing to choose, fitted on the training images
    assert json.loads((train_dir("probe") / "metrics.json").read_text())["best/C"] == 1.0
    assert (train_dir("probe") / "regularization.csv").read_text().startswith("C,fit_time_s")
    best = training.fit("scratch")
    assert best == {"val_acc": None, "epoch": 2}
    checkpoint = torch.load(checkpoint_path("scratch"), weights_only=True)
    assert (
        checkpoint["epoch"] == 2
        and checkpoint["val_acc"] is None
        and checkpoint["classes"] == ["class_0", "class_1", "class_2"]
    )
    assert "best/val_acc" not in json.loads((train_dir("scratch") / "metrics.json").read_text())
