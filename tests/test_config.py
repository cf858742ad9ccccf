"""params.yaml validation: a bad value fails before any work, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import PROJECT, tiny_params
from transferlab.config import ConfigError, load_params, parse_params


def test_project_params_are_valid():
    params = load_params(PROJECT / "params.yaml")
    assert params.data.train_per_class == 30 and "BACKGROUND_Google" in params.data.exclude_classes
    assert params.model.arch == "timm/tf_efficientnet_lite0" and params.model.weights == "imagenet"


def test_mode_sections_override_the_shared_train_section():
    raw = tiny_params()
    raw["train"]["lr"] = 0.03
    raw["scratch"]["lr"] = 0.2
    params = parse_params(raw)
    assert params.train_config("finetune").lr == 0.03
    assert params.train_config("scratch").lr == 0.2
    assert params.train_config("scratch").batch_size == params.train.batch_size
    assert params.weights_for("finetune") == "none" and params.weights_for("scratch") == "none"


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
