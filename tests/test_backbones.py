"""The backbone study (``transferlab backbones``): its layer choices, and one run on real weights."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import yaml

from conftest import CALTECH, HF_HOME, tiny_params
from transferlab.models import build_model, native_size, tap_candidates
from transferlab.stages import prepare
from transferlab.tools import backbones, cli

PARTS = [("blocks.4", 2), ("blocks.5", 3), ("head", 4)]


def test_the_choices_add_the_last_blocks_one_by_one_and_take_their_columns():
    assert backbones.layer_choices(PARTS) == [
        ["head"],
        ["blocks.5", "head"],
        ["blocks.4", "blocks.5", "head"],
    ]
    np.testing.assert_array_equal(backbones.columns(PARTS, ["head"]), [5, 6, 7, 8])
    np.testing.assert_array_equal(backbones.columns(PARTS, ["blocks.4", "head"]), [0, 1, 5, 6, 7, 8])


def test_tap_candidates_are_the_blocks_after_the_stem_and_never_the_heads_own_input():
    model, head, _ = build_model("resnet18", "none", 3)
    assert tap_candidates(model, head) == ["layer1", "layer2", "layer3"], (
        "layer4's pooled output is the head's"
    )
    model, head, _ = build_model("timm/tf_efficientnet_lite0", "none", 3)
    assert tap_candidates(model, head) == [f"blocks.{i}" for i in range(7)]
    assert native_size("timm/tf_efficientnet_lite2") == 260 and native_size("resnet18") == 224


def test_mean_per_class_weighs_each_class_once():
    labels, predictions = np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])
    assert backbones.mean_per_class(labels, predictions) == 0.5


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(
    os.environ.get("TRANSFERLAB_REAL_DATA") != "1", reason="opt-in: set TRANSFERLAB_REAL_DATA=1"
)
@pytest.mark.skipif(not CALTECH.is_dir() or not HF_HOME.is_dir(), reason="../shared is absent")
def test_the_study_on_real_weights_writes_its_table_picture_and_every_validation_point(
    tmp_path, monkeypatch, capsys
):
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("airplanes", "bonsai", "chair", "dolphin"):
        (subset / name).symlink_to(CALTECH / name)
    params = tiny_params()
    params["data"].update(source=str(subset), train_per_class=4, val_per_class=2, test_per_class=6)
    params["data"]["cache_size"] = 255  # Lite0's 224 px crop needs 256: refused
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    prepare.main()
    arch = "timm/tf_efficientnet_lite0"
    with pytest.raises(SystemExit):
        cli.main(["backbones", "--arch", arch, "--out", "study"])
    assert "data.cache_size: the prepared images are 255 px" in capsys.readouterr().err

    params["data"]["cache_size"] = 256
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main()
    with pytest.raises(SystemExit) as done:
        cli.main(["backbones", "--arch", arch, "--out", "study"])
    assert done.value.code == 0
    results = json.loads((tmp_path / "study/backbones.json").read_text())
    (point,) = results["points"]  # Lite0's native resolution is 224: one point
    assert point["image_size"] == 224 and point["imagenet_top1"] == 74.8 and point["parameters"] > 3e6
    assert 0 <= point["test_mean_per_class"] <= 1 and point["ms_per_image_batch1"] > 0
    with (tmp_path / "study/probes.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["layers"] for r in rows] == [
        "head",
        "blocks.6+head",
        "blocks.5+blocks.6+head",
        "blocks.4+blocks.5+blocks.6+head",
    ]
    assert [int(r["dims"]) for r in rows] == [1280, 1600, 1792, 1904]
    assert point["layers"] in {r["layers"] for r in rows} and results["command"].startswith(
        "transferlab backbones"
    )
    assert (tmp_path / "study/backbones.png").stat().st_size > 0
    assert arch in (tmp_path / "study/backbones.md").read_text()

    with pytest.raises(SystemExit) as done:
        cli.main(["backbones", "--retime", "--out", "study"])
    assert done.value.code == 0
    retimed = json.loads((tmp_path / "study/backbones.json").read_text())
    assert retimed["timing_command"] == "transferlab backbones --retime --out study"
    (again,) = retimed["points"]
    assert again["test_mean_per_class"] == point["test_mean_per_class"] and again["ms_per_image_batch1"] > 0


@pytest.mark.slow
def test_a_finished_lp_ft_run_becomes_a_point_of_the_study_and_a_stale_one_is_refused(
    reproduced, monkeypatch, capsys
):
    monkeypatch.chdir(reproduced)
    probe_point = {
        "arch": "resnet18",
        "image_size": 32,
        "imagenet_top1": None,
        "parameters": 11_000_000,
        "features_s": 1.0,
        "inference_path": "eager",
        "ms_per_image_batch1": 2.0,
        "ms_per_image_batch64": 1.5,
        "layers": "head",
        "dims": 512,
        "C": 0.1,
        "val_acc": 0.5,
        "val_loss": 1.0,
        "fit_s": 0.1,
        "test_mean_per_class": 0.5,
        "test_top1": 0.5,
        "head_only_val_acc": 0.5,
    }
    (reproduced / "study").mkdir()
    study = {"command": "transferlab backbones", "cache_size": 40, "threads": 1, "points": [probe_point]}
    (reproduced / "study/backbones.json").write_text(json.dumps(study))

    with pytest.raises(SystemExit) as done:
        cli.main(["backbones", "--record-finetune", "--out", "study"])
    assert done.value.code == 0
    kept = reproduced / "study/lpft_resnet18_32"
    run = json.loads((kept / "run.json").read_text())
    assert run["params"]["model.arch"] == "resnet18" and run["params"]["features.image_size"] == 32
    finetuned = json.loads((kept / "test_finetune.json").read_text())
    assert finetuned == json.loads((reproduced / "metrics/test_finetune/metrics.json").read_text())
    table = (reproduced / "study/backbones.md").read_text()
    assert f"{100 * finetuned['mean_per_class_acc']:.2f} % |" in table.split("LP-FT:")[1]
    (point,) = backbones.finetuned_points(reproduced / "study", [probe_point])
    assert point["ms_per_image_batch64"] == 1.5 and point["layers"] == "head"

    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    params["train"]["lr"] = 0.5  # the metrics are no longer this run's
    (reproduced / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(SystemExit):
        cli.main(["backbones", "--record-finetune", "--out", "study"])
    assert "dvc repro holdout_finetune evaluate@probe evaluate@finetune" in capsys.readouterr().err
