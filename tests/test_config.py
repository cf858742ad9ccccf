"""params.yaml validation: a bad value fails before any work, naming the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from conftest import PROJECT, tiny_params
from transferlab.config import ConfigError, TrainConfig, load_params, parse_params
from transferlab.models import ModelError


def test_project_params_are_valid():
    params = load_params(PROJECT / "params.yaml")
    assert params.data.train_per_class == 30 and "BACKGROUND_Google" in params.data.exclude_classes
    assert params.model.arch == "timm/tf_efficientnet_lite0" and params.model.weights == "imagenet"


def test_mode_sections_override_the_shared_train_section():
    raw = tiny_params()
    raw["model"]["weights"] = "imagenet"
    raw["train"]["lr"] = 0.03
    raw["scratch"]["lr"] = 0.2
    params = parse_params(raw)
    assert params.train_config("finetune").lr == 0.03
    assert params.train_config("scratch").lr == 0.2
    assert params.train_config("scratch").batch_size == params.train.batch_size
    assert params.weights_for("finetune") == "imagenet" and params.weights_for("scratch") == "none"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "lr", -0.1, "train.lr must be > 0"),
        ("train", "lr", "fast", "train.lr must be of type float"),
        ("train", "epochs", 2.5, "train.epochs must be of type int"),
        ("train", "lrr", 0.1, "unknown param train.lrr"),
        ("scratch", "epoch", 3, "unknown param scratch.epoch"),
        ("scratch", "batch_size", 0, "scratch.batch_size must be >= 1"),
        ("data", "val_per_class", 30, "data.val_per_class (30) must be smaller than data.train_per_class"),
        ("train", "backbone_lr_scale", 2.0, "train.backbone_lr_scale must be <= 1"),
        ("data", "train_per_class", True, "data.train_per_class must be of type int"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    raw = tiny_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("arch", "resnet19", "model.arch: 'resnet19' is neither a torchvision"),
        ("arch", "timm/nonsense_net", "model.arch: timm/nonsense_net is not a timm model"),
        ("weights", "missing.pth", "model.weights: no such file missing.pth"),
    ],
)
def test_bad_model_params_fail_at_load_time(key, value, message):
    raw = tiny_params()
    raw["model"][key] = value
    with pytest.raises(ModelError, match=message):
        parse_params(raw)


def test_timm_model_without_pretrained_weights_is_refused():
    raw = tiny_params()
    raw["model"] = {"arch": "timm/efficientnet_b8", "weights": "imagenet"}
    with pytest.raises(ModelError, match="timm has no pretrained weights for timm/efficientnet_b8"):
        parse_params(raw)


def test_unknown_section():
    raw = tiny_params()
    raw["trian"] = {"lr": 1}
    with pytest.raises(ConfigError, match="unknown section.*trian"):
        parse_params(raw)


def test_stage_refuses_bad_params_before_any_work(tmp_path):
    raw = tiny_params()
    raw["train"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "transferlab.train", "finetune"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert "train.lr must be > 0" in result.stderr
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "data").exists()


def test_dvc_stage_params_match_what_each_mode_reads():
    """train_scratch lists exactly the train keys that scratch: does not override (and that scratch uses)."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    finetune_only = {"backbone_lr_scale", "mode", "frozen_stages", "freeze_bn_stats"}
    expected = {f.name for f in dataclasses.fields(TrainConfig)} - set(raw["scratch"]) - finetune_only
    listed = {p.removeprefix("train.") for p in stages["train_scratch"]["params"] if p.startswith("train.")}
    assert listed == expected
    assert {"train", "finetune", "model"} <= set(stages["train_finetune"]["params"])
