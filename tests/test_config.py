"""params.yaml validation: a bad value fails before any work, naming the key."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing

import pytest
import yaml

from conftest import PROJECT, tiny_params
from test_layout import stage_commands
from transferlab.config import (
    FINETUNE_ONLY,
    REFERENCE_MARK,
    SCRATCH_FIXED,
    Optimizer,
    TrainConfig,
    load_params,
    parse_params,
    reference,
)
from transferlab.errors import ConfigError, ModelError
from transferlab.models import check_model


def test_project_params_are_valid():
    params = load_params(PROJECT / "params.yaml")
    assert params.data.train_per_class == 30 and "BACKGROUND_Google" in params.data.exclude_classes
    assert params.model.arch == "timm/tf_efficientnet_lite0" and params.model.weights == "imagenet"


def test_each_run_reads_its_own_section():
    raw = tiny_params()
    raw["model"]["weights"] = "imagenet"
    raw["train"].update(lr=0.03, batch_size=16)
    raw["scratch"]["lr"] = 0.2
    params = parse_params(raw)
    assert params.train_config("finetune").lr == 0.03
    assert params.train_config("scratch").lr == 0.2
    assert params.train_config("scratch").batch_size == 8, "train: does not reach the scratch run"
    assert params.weights_for("finetune") == "imagenet" and params.weights_for("scratch") == "none"
    assert (
        params.train_config("scratch").mode == "scratch"
        and params.train_config("scratch").init_head == "random"
    )


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("train", "lr", -0.1, "train.lr must be > 0"),
        ("train", "lr", "fast", "train.lr must be of type float"),
        ("train", "epochs", 2.5, "train.epochs must be a whole number, got 2.5"),
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
        ("features", "image_size", 8, "features.image_size must be >= 16"),
        ("runtime", "processes", 0, "runtime.processes must be >= 1"),
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
        (
            {"train": {"optimizer": "adamx"}},
            "train.optimizer must be one of sgd, adam, adamw, rmsprop, adagrad, adadelta; got 'adamx'",
        ),
        (
            {"train": {"schedule": "cosin"}},
            "train.schedule must be one of constant, step, multistep, exponential, cosine, linear, plateau",
        ),
        ({"train": {"mode": "linear"}}, "train.mode must be one of finetune, feature_extract, scratch"),
        (
            {"train": {"mode": "feature_extract"}},
            "train.mode: feature_extract trains a head on pretrained features, but model.weights is none",
        ),
        (
            {"train": {"frozen_layers": 2}},
            "train.frozen_layers: freezing layers needs mode finetune with pretrained weights",
        ),
        (
            {"scratch": {"mode": "finetune"}},
            "scratch.mode: train_scratch trains every layer from random init",
        ),
        (
            {"scratch": {"frozen_layers": 1}},
            "scratch.frozen_layers: train_scratch trains every layer from random init",
        ),
        (
            {"scratch": {"warmup_epochs": 1.0, "warmup_steps": 10}},
            "scratch.warmup_epochs and scratch.warmup_steps are both set",
        ),
        (
            {"train": {"warmup_epochs": 1.0, "warmup_steps": 10}},
            "train.warmup_epochs and train.warmup_steps are both set",
        ),
        ({"train": {"schedule": "multistep"}}, "train.schedule: multistep needs train.milestones"),
        ({"train": {"milestones": [3, 2]}}, "train.milestones must be increasing epoch numbers"),
        ({"train": {"gamma": 0}}, "train.gamma must be > 0"),
        ({"runtime": {"precision": "fp8"}}, "runtime.precision must be one of fp32, bf16, fp16"),
        ({"runtime": {"device": "tpu"}}, "runtime.device must be one of auto, cpu, cuda, mps"),
        ({"train": {"device": "cpu"}}, "unknown param train.device"),
        ({"runtime": {"processes": 3}}, "train.batch_size (8) must be divisible by runtime.processes (3)"),
        (
            {"train": {"auto_augment": "autoaugment"}},
            "train.auto_augment must be one of none, trivialaugment, randaugment",
        ),
        ({"train": {"monitor": "val_top5"}}, "train.monitor must be one of val_acc, val_loss"),
        (
            {"data": {"val_per_class": 0}, "train": {"early_stopping_patience": 2}},
            "train.early_stopping_patience watches the validation split",
        ),
        (
            {"data": {"val_per_class": 0}, "scratch": {"schedule": "plateau"}},
            "scratch.schedule watches the validation split",
        ),
        (
            {
                "train": {"mode": "feature_extract", "augment": False, "image_size": 64},
                "model": {"weights": "imagenet"},
            },
            (
                "train.augment: false with feature_extract trains on the features stage's output, "
                "computed at features.image_size (32)"
            ),
        ),
        ({"train": {"random_erasing": 1.5}}, "train.random_erasing must be <= 1"),
        (
            {"train": {"augment": False, "mixup_alpha": 0.2}},
            "train.mixup_alpha has no effect with train.augment: false",
        ),
        (
            {"scratch": {"init_head": "probe"}},
            "scratch.init_head: train_scratch trains every layer from random init",
        ),
        (
            {"train": {"train_on_val": True, "schedule": "plateau"}},
            "train.schedule watches the validation split, but train.train_on_val trains on it",
        ),
        (
            {"data": {"val_per_class": 0}, "probe": {"C": [0.1, 1.0]}},
            "probe.C lists several values to choose from on the validation split",
        ),
        (
            {"train": {"init_head": "probe", "train_on_val": False}},
            "train.train_on_val: false validates every epoch, but the probe",
        ),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay must be < 1, got 1.0"),
        ({"train": {"interpolation": 1.5}}, "train.interpolation must be <= 1"),
        (
            {"scratch": {"interpolation": 0.5}},
            "scratch.interpolation: train_scratch trains every layer from random init",
        ),
        (
            {"data": {"val_fold": 3}},
            "data.val_fold must be < 3 (6 training images per class hold 3 disjoint validation folds of 2)",
        ),
        (
            {"data": {"val_per_class": 0, "val_fold": 1}},
            "data.val_fold (1) picks validation images, but data.val_per_class is 0",
        ),
        ({"features": {"train_crops": 33}}, "features.train_crops must be <= 32"),
    ],
)
def test_invalid_training_options_and_combinations_name_the_param(values, message):
    raw = tiny_params()
    for section, entries in values.items():
        raw.setdefault(section, {}).update(entries)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_params(raw)


def test_frozen_layers_with_pretrained_weights_and_scratch_ignoring_them(tmp_path):
    raw = tiny_params()
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    raw["model"]["weights"] = str(weights)
    raw["train"].update(frozen_layers=3, mode="finetune", warmup_steps=5)
    params = parse_params(raw)
    assert params.train_config("finetune").frozen_layers == 3
    scratch = params.train_config("scratch")
    assert (scratch.mode, scratch.frozen_layers, params.weights_for("scratch")) == ("scratch", 0, "none")
    # feature_extract keeps the whole backbone fixed: the fine-tune's frozen_layers (the default is 4)
    # is moot, not an error
    raw["train"].update(mode="feature_extract")
    assert parse_params(raw).train_config("finetune").frozen_layers == 0


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
    model = parse_params(
        raw
    ).model  # checked where a model is built: importing torch and timm is not params.yaml's business
    with pytest.raises(ModelError, match=message):
        check_model(model.arch, model.weights)


def test_timm_model_without_pretrained_weights_is_refused():
    with pytest.raises(ModelError, match="timm has no pretrained weights for timm/efficientnet_b8"):
        check_model("timm/efficientnet_b8", "imagenet")


def test_unknown_section():
    raw = tiny_params()
    raw["trian"] = {"lr": 1}
    with pytest.raises(ConfigError, match="unknown section.*trian"):
        parse_params(raw)


def test_stage_refuses_bad_params_before_any_work(tmp_path):
    raw = tiny_params()
    raw["train"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "transferlab.stages.train", "finetune"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "train.lr must be > 0" in result.stderr
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "data").exists()


def test_each_training_stage_reads_whole_sections():
    """train_finetune reads train:, train_scratch reads scratch:
    (every key but the fine-tuning's five), both runtime:.

    Whole sections, so `-S train.lr=...` re-runs the fine-tuned
    model only and `-S scratch.x=...` needs no `++`.
    """
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert set(raw["train"]) == {f.name for f in dataclasses.fields(TrainConfig)}, (
        "params.yaml names every train key"
    )
    assert set(raw["scratch"]) == set(raw["train"]) - set(FINETUNE_ONLY), (
        "params.yaml names every key scratch reads"
    )
    assert {"model", "runtime", "train"} <= set(stages["train_finetune"]["params"])
    scratch = stages["train_scratch"]["params"]
    assert {"runtime", "scratch"} <= set(scratch) and not any(
        p == "train" or p.startswith("train.") for p in scratch
    )


def test_numbers_are_read_as_users_and_dvc_write_them(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; params.yaml means a float, as DVC's -S writes 5e-05."""
    text = (PROJECT / "params.yaml").read_text()
    text = re.sub(r"\n  lr: [0-9.]+ ", "\n  lr: 1e-3 ", text, count=1).replace(
        "weight_decay: 0.00005", "weight_decay: 5e-05", 1
    )
    text = text.replace("  max_iter: 1000", "  max_iter: 1E3", 1)
    assert text.count("1e-3") == 1 and "5e-05" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"probe.max_iter must be a whole number, got 1000.0; write 1000"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text.replace("  max_iter: 1E3", "  max_iter: 1000"))
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == 0.001 and params.train.weight_decay == 5e-05
    with pytest.raises(ConfigError, match=r"train.epochs must be a whole number, got 2.5$"):
        parse_params({**tiny_params(), "train": {**tiny_params()["train"], "epochs": 2.5}})
    with pytest.raises(ConfigError, match="train.lr must be of type float, got 'fast'"):
        parse_params({**tiny_params(), "train": {**tiny_params()["train"], "lr": "fast"}})


def test_every_key_is_set_in_params_yaml_the_code_has_no_defaults():
    raw = tiny_params()
    del raw["train"]["lr"], raw["scratch"]["epochs"]
    message = re.escape("params.yaml does not set train.lr: every setting is written")
    with pytest.raises(ConfigError, match=message):
        parse_params(raw)
    raw = tiny_params()
    del raw["logging"]
    with pytest.raises(ConfigError, match=re.escape("params.yaml does not set logging.tensorboard")):
        parse_params(raw)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defaulted = [f.name for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING]
    assert not defaulted, fields


def test_the_scratch_run_has_fixed_values_for_the_fine_tunings_keys():
    scratch = parse_params(tiny_params()).train_config("scratch")
    assert {key: getattr(scratch, key) for key in SCRATCH_FIXED} == SCRATCH_FIXED
    unset = set(SCRATCH_FIXED) - set(tiny_params()["scratch"])
    assert set(SCRATCH_FIXED) == set(FINETUNE_ONLY) and unset == set(SCRATCH_FIXED), (
        "params.yaml's scratch: section sets none of them"
    )


def test_the_params_reference_in_the_docs_is_generated_from_the_declarations():
    """docs/params.md's table equals what config.reference makes of the declared types and params.yaml."""
    doc = (PROJECT / "docs/params.md").read_text()
    generated = doc[doc.index(REFERENCE_MARK) + len(REFERENCE_MARK) :].strip()
    expected = reference(yaml.safe_load((PROJECT / "params.yaml").read_text())).strip()
    assert generated == expected, "docs/params.md is out of date: run `uv run python -m transferlab.config`"
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for section, values in raw.items():
        for key in values:
            assert f"| `{section}.{key}` |" in generated, f"{section}.{key} is missing from the reference"
    row = next(line for line in generated.splitlines() if line.startswith("| `train.optimizer`"))
    assert all(f"`{name}`" in row for name in typing.get_args(Optimizer)), row
    assert "| `train.lr` | number, 0 < x |" in generated
    assert "| `data.test_per_class` | integer, 1 ≤ x, or null |" in generated


def test_one_error_names_every_bad_value_params_yaml_holds():
    """Values piled up by failed tries are all named at once, not the first one met."""
    raw = tiny_params()
    raw["train"].update(epochs=2.5, optimizer="sgdd", momentum=2)
    raw["data"]["train_per_class"] = 0
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert message.startswith("4 problems in params.yaml: ")
    for part in (
        "data.train_per_class must be >= 1, got 0",
        "train.epochs must be a whole number, got 2.5",
        "train.optimizer must be one of",
        "train.momentum must be <= 1, got 2",
    ):
        assert part in message, part


def test_the_checks_across_keys_and_sections_are_all_named_at_once():
    """Problems between keys (one run's section) and between sections (a run and the data) pile up too."""
    raw = tiny_params()
    raw["train"].update(warmup_epochs=1, warmup_steps=10, schedule="plateau", train_on_val=True)
    raw["scratch"]["batch_size"] = 7
    raw["runtime"]["processes"] = 2
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert message.startswith("3 problems in params.yaml: "), message
    for part in (
        "train.warmup_epochs and train.warmup_steps are both set",
        "train.schedule watches the validation split, but train.train_on_val trains on it",
        "scratch.batch_size (7) must be divisible by runtime.processes (2)",
    ):
        assert part in message, part


def test_a_device_that_is_not_here_is_refused_by_the_first_stage(tmp_path, tiny_folder):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    raw = tiny_params()
    raw["data"]["source"] = str(tiny_folder)
    raw["runtime"]["device"] = "cuda"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = subprocess.run(
        [sys.executable, "-m", "transferlab.stages.prepare"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2 and "runtime.device: cuda is not available" in result.stderr
    assert not (tmp_path / "data").exists(), "refused before any work"


def test_every_stage_module_answers_help_with_its_usage_and_runs_nothing(tmp_path):
    for name, (module, _) in stage_commands().items():
        result = subprocess.run(
            [sys.executable, "-m", f"transferlab.{module}", "--help"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, (name, result.stderr)
        assert "Stage" in result.stdout or "usage" in result.stdout, name
    assert list(tmp_path.iterdir()) == [], "nothing ran"
