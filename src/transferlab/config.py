"""Load and validate params.yaml in one place.

Every section is a frozen dataclass; unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` naming the key, before any work starts.
The training stages share the ``train:`` section; ``finetune:`` and ``scratch:``
hold per-mode overrides of the same keys.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("finetune", "scratch")
DATA_SOURCE_ENV = "TRANSFERLAB_DATA"


class ConfigError(ValueError):
    """A param in params.yaml is missing, misspelt, mistyped or out of range."""


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> dict:
    return {"low": low, "high": high, "low_open": low_open}


@dataclass(frozen=True)
class DataConfig:
    # "download" fetches the official CaltechDATA archive; anything else is a path to a
    # local copy (an unpacked folder of class subfolders, or the .zip / .tar.gz archive).
    # The environment variable TRANSFERLAB_DATA, when set, takes precedence.
    source: str = "download"
    exclude_classes: list = field(default_factory=lambda: ["BACKGROUND_Google"])
    train_per_class: int = field(default=30, metadata=_range(1))
    val_per_class: int = field(default=5, metadata=_range(0))
    test_per_class: int | None = field(default=None, metadata=_range(1))
    cache_size: int = field(default=256, metadata=_range(32, 1024))
    seed: int = 0

    def __post_init__(self):
        if self.val_per_class >= self.train_per_class:
            raise ConfigError(
                f"data.val_per_class ({self.val_per_class}) must be smaller than "
                f"data.train_per_class ({self.train_per_class}): validation images are held out of the training ones"
            )

    def resolved_source(self) -> str:
        return os.environ.get(DATA_SOURCE_ENV) or self.source


@dataclass(frozen=True)
class ModelConfig:
    # torchvision classification model name (resnet18, alexnet, ...) or timm/<name>
    arch: str = "timm/tf_efficientnet_lite0"
    # "imagenet", "none", or a path to a state-dict file (.pth/.pt/.safetensors)
    weights: str = "imagenet"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=6, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(1))
    lr: float = field(default=0.02, metadata=_range(0, low_open=True))
    # fine-tuning: pretrained layers train at lr * backbone_lr_scale (ignored for scratch)
    backbone_lr_scale: float = field(default=0.1, metadata=_range(0, 1))
    momentum: float = field(default=0.9, metadata=_range(0, 1))
    weight_decay: float = field(default=5e-5, metadata=_range(0))
    label_smoothing: float = field(default=0.1, metadata=_range(0, 1))
    warmup_epochs: float = field(default=0.0, metadata=_range(0))
    # keep the pretrained batch-norm running statistics fixed while fine-tuning
    freeze_bn_stats: bool = True
    image_size: int = field(default=160, metadata=_range(16, 1024))
    eval_image_size: int = field(default=224, metadata=_range(16, 1024))
    # random-resized-crop scale range lower bound (upper bound is 1)
    crop_scale_min: float = field(default=0.25, metadata=_range(0, 1, low_open=True))
    channels_last: bool = True
    seed: int = 0


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = field(default=64, metadata=_range(1))
    # classes listed in the comparison as gaining / losing most from pretraining
    top_classes: int = field(default=10, metadata=_range(1))


@dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    finetune: dict
    scratch: dict
    evaluate: EvaluateConfig

    def train_config(self, mode: str) -> TrainConfig:
        """The ``train:`` section with the mode's overrides applied."""
        if mode not in MODES:
            raise ConfigError(f"unknown training mode {mode!r}; allowed: {', '.join(MODES)}")
        return dataclasses.replace(self.train, **getattr(self, mode))

    def weights_for(self, mode: str) -> str:
        return self.model.weights if mode == "finetune" else "none"


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = typing.get_origin(annotation) or annotation
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    if value is None or not meta:
        return
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        relation = ">" if meta["low_open"] else ">="
        raise ConfigError(f"{key} must be {relation} {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be <= {high}, got {value}")


def _build(cls, section: str, raw: Any, *, partial: bool = False):
    """Check a params section against a dataclass; return the instance or, if partial, the checked dict."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in raw.items():
        name = f"{section}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown param {name}; allowed keys in {section}: {', '.join(fields)}")
        value = _check_type(name, value, hints[key])
        _check_range(name, value, fields[key].metadata)
        checked[key] = value
    return checked if partial else cls(**checked)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "evaluate": EvaluateConfig}


def parse_params(raw: dict) -> Params:
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    allowed = set(SECTIONS) | set(MODES)
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")
    built = {name: _build(cls, name, raw.get(name)) for name, cls in SECTIONS.items()}
    overrides = {mode: _build(TrainConfig, mode, raw.get(mode), partial=True) for mode in MODES}
    from .models import check_model  # imported here: it loads torch, timm and torchvision

    check_model(built["model"].arch, built["model"].weights)
    return Params(**built, **overrides)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, where params.yaml lives")
    with path.open() as f:
        return parse_params(yaml.safe_load(f) or {})
