"""params.yaml validation: a bad value fails before any work, naming the key."""

from __future__ import annotations

import ast
import dataclasses
import re
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
        ("evaluate", "topk", [1, 0], "evaluate.topk must be a non-empty list of integers >= 1"),
        ("evaluate", "topk", 5, "evaluate.topk must be of type list"),
        ("evaluate", "calibration_bins", 1, "evaluate.calibration_bins must be >= 2"),
        ("logging", "tensorboard", "yes", "logging.tensorboard must be of type bool"),
        ("logging", "wandb", True, "unknown param logging.wandb"),
        ("probe", "C", [], "probe.C must be a non-empty list of numbers > 0"),
        ("probe", "C", [0.1, -1], "probe.C must be a non-empty list of numbers > 0"),
        ("probe", "image_size", 8, "probe.image_size must be >= 16"),
        ("probe", "flip", "yes", "probe.flip must be of type bool"),
        ("evaluate", "tta", "ten_crop", "evaluate.tta must be one of none, flip"),
        ("train", "init_head", "imagenet", "train.init_head must be one of random, probe"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    raw = tiny_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"train": {"optimizer": "adamx"}}, "train.optimizer must be one of sgd, adam, adamw, rmsprop, adagrad, adadelta; got 'adamx'"),
        ({"train": {"schedule": "cosin"}}, "train.schedule must be one of constant, step, multistep, exponential, cosine, linear, plateau"),
        ({"train": {"mode": "linear"}}, "train.mode must be one of finetune, feature_extract, scratch"),
        ({"finetune": {"mode": "feature_extract"}}, "finetune.mode: feature_extract trains a head on pretrained features, but model.weights is none"),
        ({"train": {"frozen_stages": 2}}, "train.frozen_stages: freezing stages needs mode finetune with pretrained weights"),
        ({"scratch": {"mode": "finetune"}}, "scratch.mode: train_scratch trains every layer from random init; allowed: scratch"),
        ({"scratch": {"frozen_stages": 1}}, "scratch.frozen_stages: train_scratch trains every layer from random init; allowed: 0"),
        ({"train": {"warmup_epochs": 1.0, "warmup_steps": 10}}, "train.warmup_epochs and train.warmup_steps are both set"),
        ({"train": {"schedule": "multistep"}}, "train.schedule: multistep needs train.milestones"),
        ({"train": {"milestones": [3, 2]}}, "train.milestones must be increasing epoch numbers"),
        ({"train": {"gamma": 0}}, "train.gamma must be > 0"),
        ({"train": {"precision": "fp8"}}, "train.precision must be one of fp32, bf16, fp16"),
        ({"train": {"device": "tpu"}}, "train.device must be one of auto, cpu, cuda, mps"),
        ({"train": {"auto_augment": "autoaugment"}}, "train.auto_augment must be one of none, trivialaugment, randaugment"),
        ({"train": {"monitor": "val_top5"}}, "train.monitor must be one of val_acc, val_loss"),
        ({"data": {"val_per_class": 0}, "train": {"early_stopping_patience": 2}}, "train.early_stopping_patience watches the validation split"),
        ({"data": {"val_per_class": 0}, "finetune": {"schedule": "plateau"}}, "finetune.schedule watches the validation split"),
        ({"train": {"random_erasing": 1.5}}, "train.random_erasing must be <= 1"),
        ({"train": {"augment": False, "mixup_alpha": 0.2}}, "train.mixup_alpha has no effect with train.augment: false"),
        ({"scratch": {"init_head": "probe"}}, "scratch.init_head: train_scratch trains every layer from random init; allowed: random"),
        ({"train": {"train_on_val": True, "schedule": "plateau"}}, "train.schedule watches the validation split, but train.train_on_val trains on it"),
        ({"data": {"val_per_class": 0}, "probe": {"C": [0.1, 1.0]}}, "probe.C lists several values to choose from on the validation split"),
        ({"train": {"init_head": "probe", "train_on_val": False}}, "train.train_on_val: false validates every epoch, but the probe"),
    ],
)
def test_invalid_training_options_and_combinations_name_the_param(values, message):
    raw = tiny_params()
    for section, entries in values.items():
        raw.setdefault(section, {}).update(entries)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params(raw)


def test_frozen_stages_with_pretrained_weights_and_scratch_ignoring_them(tmp_path):
    raw = tiny_params()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    raw["model"]["weights"] = str(weights)
    raw["train"].update(frozen_stages=3, mode="finetune", warmup_steps=5)
    params = parse_params(raw)
    assert params.train_config("finetune").frozen_stages == 3
    scratch = params.train_config("scratch")
    assert (scratch.mode, scratch.frozen_stages, params.weights_for("scratch")) == ("scratch", 0, "none")
    raw["scratch"]["warmup_epochs"] = 1.0  # a run's warm-up in epochs replaces the shared one in steps
    assert parse_params(raw).train_config("scratch").warmup_steps == 0


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
    finetune_only = {"backbone_lr_scale", "mode", "frozen_stages", "freeze_bn_stats", "init_head"}
    # a warm-up in one unit in scratch: resets the other unit, so scratch does not read it from train:
    reset_by_scratch = {"warmup_steps"} if "warmup_epochs" in raw["scratch"] else set()
    expected = {f.name for f in dataclasses.fields(TrainConfig)} - set(raw["scratch"]) - finetune_only - reset_by_scratch
    listed = {p.removeprefix("train.") for p in stages["train_scratch"]["params"] if p.startswith("train.")}
    assert listed == expected
    assert {"train", "finetune", "model"} <= set(stages["train_finetune"]["params"])


def package_imports(module: str) -> set[str]:
    """The transferlab modules ``module`` imports, directly or through others (function-level imports too)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((PROJECT / "src/transferlab" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                todo += [node.module] if node.module else [alias.name for alias in node.names]
    return seen


def test_every_stage_depends_on_the_code_it_runs():
    """A change to any module a stage imports re-runs that stage (dvc.yaml deps), and nothing listed is missing."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2].removeprefix("transferlab.")
        code = {dep for dep in stage["deps"] if dep.startswith("src/")}
        assert code == {f"src/transferlab/{m}.py" for m in package_imports(module)}, name
        assert all((PROJECT / dep).exists() for dep in code)
