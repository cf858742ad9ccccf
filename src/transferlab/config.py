"""Load and validate params.yaml in one place.

Every section is a frozen dataclass; unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` naming the key, before any work starts.
Each training stage reads whole sections: ``train:`` is the fine-tuned model's recipe (stage
train_finetune), ``scratch:`` the recipe of the model trained from random init (train_scratch), and
``runtime:`` where and how both run. This module imports no heavy library: a stage checks its
params within a second of starting.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from .errors import ConfigError

# the two models the training loop trains, each with its stage (train_<model>) and its own params section
TRAINED_MODELS = ("finetune", "scratch")
MODEL_SECTIONS = {"finetune": "train", "scratch": "scratch"}
# every model evaluate and compare report on: the linear probe (stage train_probe) and the two trained ones
MODELS = ("probe", *TRAINED_MODELS)
MODEL_NAMES = {"probe": "Linear probe", "finetune": "Fine-tuned", "scratch": "From scratch"}
DATA_SOURCE_ENV = "TRANSFERLAB_DATA"


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``low <= x <= high``, with ``<`` at an end that is open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        low = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '≤'} "
        high = "" if self.high is None else f" {'<' if self.high_open else '≤'} {self.high:g}"
        return f"{low}x{high}"


# The allowed values of every key, declared here only: a key's type is its Python type, narrowed by a
# Literal (a fixed set of words) or a Range (numbers). docs/params.md's reference is generated from them.
Fraction = Annotated[float, Range(0, 1)]
Share = Annotated[float, Range(0, 1, low_open=True)]  # a fraction above 0 (a crop's scale, a decay factor)
Count = Annotated[int, Range(0)]
Positive = Annotated[int, Range(1)]
NonNegative = Annotated[float, Range(0)]
Pixels = Annotated[int, Range(16, 1024)]
Duplicates = Literal["keep", "drop"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "fp16"]
Mode = Literal["finetune", "feature_extract", "scratch"]
HeadInit = Literal["random", "probe"]
Optimizer = Literal["sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta"]
Schedule = Literal["constant", "step", "multistep", "exponential", "cosine", "linear", "plateau"]
Monitor = Literal["val_acc", "val_loss"]
AutoAugment = Literal["none", "trivialaugment", "randaugment"]
TTA = Literal["none", "flip"]

# Every key is set in params.yaml, the one place that holds the settings' values: the classes below declare
# the keys and what they allow, and have no defaults.


@dataclass(frozen=True)
class DataConfig:
    # "download": the official Caltech-101, fetched from CaltechDATA, or read from a local copy of it named by
    # the environment variable TRANSFERLAB_DATA (checked to be the official data); anything else is a path to
    # your own images (an unpacked folder of class subfolders, or a .zip / .tar.gz archive of one)
    source: str
    exclude_classes: list
    train_per_class: Positive
    val_per_class: Count
    # which val_per_class-sized slice of each class's training images validates: folds 0, 1, ... of them
    # give repeated choices on disjoint validation images (k-fold), the test split unchanged
    val_fold: Count
    test_per_class: Positive | None
    cache_size: Annotated[int, Range(32, 1024)]
    # byte-identical files: reported in metrics/prepare.json; drop: a file found in several classes is left
    # out of every split (its label is ambiguous), and of copies within one class only the first is kept
    duplicates: Duplicates
    seed: int

    def __post_init__(self):
        if self.val_per_class >= self.train_per_class:
            raise ConfigError(
                f"data.val_per_class ({self.val_per_class}) must be smaller than data.train_per_class "
                f"({self.train_per_class}): validation images are held out of the training ones"
            )
        if self.val_fold and not self.val_per_class:
            raise ConfigError(
                f"data.val_fold ({self.val_fold}) picks validation images, but data.val_per_class is 0"
            )
        folds = self.train_per_class // self.val_per_class if self.val_per_class else 1
        if self.val_fold >= folds:
            raise ConfigError(
                f"data.val_fold must be < {folds} ({self.train_per_class} training images per class hold "
                f"{folds} disjoint validation folds of {self.val_per_class}), got {self.val_fold}"
            )


@dataclass(frozen=True)
class ModelConfig:
    # torchvision classification model name (resnet18, alexnet, ...) or timm/<name>
    arch: str
    # "imagenet", "none", or a path to a state-dict file (.pth/.pt/.safetensors)
    weights: str


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how networks run, shared by every stage that runs one (results agree up to rounding)."""

    device: Device  # auto: cuda, else mps, else cpu
    # fp16 needs CUDA (with a gradient scaler); bf16 runs on CUDA or on a CPU with native bf16 support
    precision: Precision
    # data-parallel training processes on this machine (DDP, started with torchrun; one per GPU); batch
    # sizes are global
    processes: Positive
    channels_last: bool
    # CPU compute threads, fixed for the whole run (another count is another computation: cores.py); 0: this
    # machine's cores, shared evenly between the dvc queue workers running when a stage starts
    threads: Count


@dataclass(frozen=True)
class FeaturesConfig:
    """Stage ``features``: the pretrained network's pooled features of every split and their mirror images."""

    image_size: Pixels
    batch_size: Positive
    # random resized crops of each train and validation image, each mirrored at random: extra training
    # samples for the linear probe (0 = only the centre crop and its mirror image); scale (crop_scale_min, 1)
    train_crops: Annotated[int, Range(0, 32)]
    crop_scale_min: Share
    # initialises the backbone with model.weights: none (features of a random network), and draws the crops
    seed: int
    # modules (blocks) whose global-average-pooled outputs join what the head receives, in this order (the
    # head's own features last); the probe reads them all, and the fine-tuned network's head reads the same
    layers: list

    def __post_init__(self):
        if not all(isinstance(name, str) and name for name in self.layers):
            raise ConfigError(f"features.layers must be a list of module names, got {self.layers!r}")


# keys of a run's section that only fine-tuning reads, with the values the scratch run has for them (it
# trains every layer from random init, at lr, with batch-norm statistics updated, and keeps its last weights)
SCRATCH_FIXED = {
    "mode": "scratch",
    "init_head": "random",
    "frozen_layers": 0,
    "backbone_lr_scale": 1.0,
    "freeze_bn_stats": False,
    "interpolation": 1.0,
}
FINETUNE_ONLY = tuple(SCRATCH_FIXED)


@dataclass(frozen=True)
class TrainConfig:
    """A training run's recipe: the ``train:`` section (stage train_finetune) or ``scratch:``
    (train_scratch)."""

    # finetune: every layer trains, the pretrained ones at lr * backbone_lr_scale (the first
    # frozen_layers layers of the backbone stay fixed: partial unfreezing);
    # feature_extract: only the new head trains on the frozen backbone's features;
    # scratch: random init, every layer at lr (the train_scratch stage always runs this mode)
    mode: Mode
    # the new head starts from random weights, or from the linear probe's fitted head (LP-FT, Kumar et al.)
    init_head: HeadInit
    # train on the train and validation images together, for a fixed number of epochs, keeping the last
    # one: the final fit once the settings were chosen on validation (no validation curve, no best epoch)
    train_on_val: bool
    frozen_layers: Count
    epochs: Positive
    batch_size: Positive
    lr: Annotated[float, Range(0, low_open=True)]
    backbone_lr_scale: Fraction
    optimizer: Optimizer
    momentum: Fraction  # sgd and rmsprop
    nesterov: bool  # sgd with momentum > 0
    weight_decay: NonNegative
    decay_norm_and_bias: bool  # weight decay on biases and normalisation weights too
    # learning-rate schedule, stepped every optimizer step (plateau: every epoch, on `monitor`)
    schedule: Schedule
    warmup_epochs: NonNegative  # linear warm-up, in epochs ...
    warmup_steps: Count  # ... or in optimizer steps (not both)
    step_epochs: Positive  # step: multiply by gamma every step_epochs
    milestones: list  # multistep: epochs at which the lr is multiplied by gamma
    gamma: Share  # step, multistep, exponential (per epoch), plateau
    plateau_patience: Count
    # validation metric that picks the best epoch, drives plateau and early stopping
    monitor: Monitor
    early_stopping_patience: Count  # epochs without improvement; 0 = off
    grad_clip_norm: NonNegative  # 0 = off
    label_smoothing: Fraction
    # keep the pretrained batch-norm running statistics fixed while fine-tuning
    freeze_bn_stats: bool
    # exponential moving average of the weights, updated every optimizer step (0 = off): the average is
    # what is validated and kept (torch.optim.swa_utils.AveragedModel); 1 would keep the starting weights
    ema_decay: Annotated[float, Range(0, 1, high_open=True)]
    # weight-space interpolation (WiSE-FT, Wortsman et al. 2022): the kept weights are
    # start + interpolation * (end - start), start being the weights fine-tuning began from; 1 = the end
    interpolation: Fraction
    image_size: Pixels
    eval_image_size: Pixels
    # augmentation (torchvision.transforms.v2, on the training device); augment: false turns all of it
    # off and trains on the evaluation centre crop, which lets feature_extract train on the features
    # stage's output
    augment: bool
    crop_scale_min: Share  # random resized crop
    hflip: bool
    rotation_degrees: Annotated[float, Range(0, 180)]
    color_jitter: Fraction  # brightness, contrast, saturation strength
    auto_augment: AutoAugment
    random_erasing: Fraction  # probability per image
    mixup_alpha: NonNegative  # 0 = off; with cutmix, one of the two per batch
    cutmix_alpha: NonNegative
    balanced_sampling: bool  # draw every class equally often (Caltech-101 has 31 to 800 images a class)
    compile: bool  # torch.compile the model: faster steps after a warm-up of about a minute on a CPU
    seed: int


def _recipe_problems(cfg: TrainConfig, section: str) -> list[str]:
    """What is wrong across several keys of one run's section, each problem one message."""
    problems = []
    if cfg.warmup_epochs and cfg.warmup_steps:
        problems.append(
            f"{section}.warmup_epochs and {section}.warmup_steps are both set: give the warm-up in one unit"
        )
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in cfg.milestones) or sorted(
        set(cfg.milestones)
    ) != list(cfg.milestones):
        problems.append(f"{section}.milestones must be increasing epoch numbers >= 1, got {cfg.milestones!r}")
    augmentations = ("rotation_degrees", "color_jitter", "random_erasing", "mixup_alpha", "cutmix_alpha")
    unused = [name for name in augmentations if getattr(cfg, name)] + (
        ["auto_augment"] if cfg.auto_augment != "none" else []
    )
    if not cfg.augment and unused:
        problems.append(
            f"{section}.{unused[0]} has no effect with {section}.augment: false; "
            "set it to its off value or augment: true"
        )
    if cfg.schedule == "multistep" and not cfg.milestones:
        problems.append(
            f"{section}.schedule: multistep needs {section}.milestones (epochs at which the lr drops)"
        )
    return problems


@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe (stage train_probe): a logistic regression on the features stage's output."""

    # mirror images are extra training samples; a validation image is scored by the mean of both views (as
    # evaluate.tta: flip)
    flip: bool
    # inverse regularisation strengths tried; the one with the best validation accuracy is kept
    C: list
    max_iter: Positive  # L-BFGS iterations per fit
    train_on_val: bool  # refit on train + validation with the chosen C

    def __post_init__(self):
        if not self.C or not all(
            isinstance(c, int | float) and not isinstance(c, bool) and c > 0 for c in self.C
        ):
            raise ConfigError(f"probe.C must be a non-empty list of numbers > 0, got {self.C!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: Positive
    # classes listed in the comparison as gaining / losing most from pretraining
    top_classes: Positive
    topk: list  # top-k accuracies reported for each k
    # the confusion-matrix image shows the N classes most often confused (0: all of them)
    confusion_classes: Count
    calibration_bins: Annotated[int, Range(2, 100)]  # reliability diagram and ECE
    gallery_size: Annotated[int, Range(0, 200)]  # misclassified test images shown
    gradcam_images: Annotated[int, Range(0, 50)]  # test images in the Grad-CAM panel
    tta: TTA  # flip: average the logits of image and mirror image

    def __post_init__(self):
        if not self.topk or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.topk
        ):
            raise ConfigError(f"evaluate.topk must be a non-empty list of integers >= 1, got {self.topk!r}")


def _whole_numbers(key: str, values: Any, low: int, empty: bool = False) -> list[str]:
    """The problem with a list of distinct whole numbers >= ``low`` (empty only with ``empty``)."""
    if not isinstance(values, list) or (not values and not empty):
        return [f"{key} must be a {'' if empty else 'non-empty '}list of whole numbers, got {values!r}"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
        return [f"{key} must hold whole numbers >= {low}, got {values!r}"]
    if len(set(values)) != len(values):
        return [f"{key} lists a value twice: {values!r}"]
    return []


@dataclass(frozen=True)
class EfficiencyConfig:
    """The data-efficiency curve (``efficiency/dvc.yaml``): the models trained on seeded subsets of the train
    split, with the recipes above, and scored on the test split."""

    # training images per class of the probe's and the fine-tuned model's points, each within the train
    # split's images per class and below data.train_per_class (the main models' point)
    sizes: list
    scratch_sizes: list  # the scratch model's points (its recipe's epochs each: the costly ones)
    draws: list  # seeds: one subset of every class per seed, nested (a seed's 5 images hold its 3)
    compile: bool  # torch.compile for the trained points (with their recipe's): its warm-up outlasts a subset

    def __post_init__(self):
        _raise_all(
            _whole_numbers("efficiency.sizes", self.sizes, 1)
            + _whole_numbers("efficiency.scratch_sizes", self.scratch_sizes, 1, empty=True)
            + _whole_numbers("efficiency.draws", self.draws, 0)
        )


@dataclass(frozen=True)
class LoggingConfig:
    # also write TensorBoard event files (scalars, learning rates, a few images) to
    # metrics/train_<run>/tensorboard
    tensorboard: bool


@dataclass(frozen=True)
class Params:
    data: DataConfig
    model: ModelConfig
    runtime: RuntimeConfig
    features: FeaturesConfig
    probe: ProbeConfig
    train: TrainConfig  # the fine-tuned model's run (stage train_finetune)
    scratch: TrainConfig  # the run from random init (stage train_scratch); mode scratch
    evaluate: EvaluateConfig
    logging: LoggingConfig
    efficiency: EfficiencyConfig

    def train_config(self, model: str, holdout: bool = False) -> TrainConfig:
        """The run's section, checked against the rest of the params.

        ``holdout``: for the run's holdout twin, which trains on the train split only (``train_on_val`` off)
        and, starting from the probe, from the probe fitted on the train split only.
        """
        if model not in TRAINED_MODELS:
            raise ConfigError(f"unknown training model {model!r}; allowed: {', '.join(TRAINED_MODELS)}")
        cfg = getattr(self, MODEL_SECTIONS[model])
        if holdout:
            cfg = dataclasses.replace(cfg, train_on_val=False)
        _raise_all(self._run_problems(model, cfg, holdout))
        if cfg.mode == "feature_extract":  # the whole backbone stays fixed: frozen_layers says nothing more
            cfg = dataclasses.replace(cfg, frozen_layers=0)
        return cfg

    def _run_problems(self, model: str, cfg: TrainConfig, holdout: bool) -> list[str]:
        """What is wrong between a run's section and the rest of the params, each problem one message."""

        def key(name: str) -> str:
            return self.key(model, name)

        problems = []
        watching = _watching(cfg)
        if watching and not self.data.val_per_class:
            problems.append(f"{key(watching[0])} watches the validation split, but data.val_per_class is 0")
        if watching and cfg.train_on_val:
            problems.append(
                f"{key(watching[0])} watches the validation split, but {key('train_on_val')} "
                "trains on it; set one of them off"
            )
        if (
            cfg.init_head == "probe"
            and self.probe.train_on_val
            and not cfg.train_on_val
            and self.data.val_per_class
            and not holdout
        ):
            problems.append(
                f"{key('train_on_val')}: false validates every epoch, but the probe the run starts from "
                "(train.init_head: probe) was fitted on the validation images too "
                "(probe.train_on_val: true); set both to false to choose settings"
            )
        if cfg.batch_size % self.runtime.processes:
            problems.append(
                f"{key('batch_size')} ({cfg.batch_size}) must be divisible by runtime.processes "
                f"({self.runtime.processes}): it is the global batch, split evenly between the processes"
            )
        return problems + self._mode_problems(model, cfg)

    def _mode_problems(self, model: str, cfg: TrainConfig) -> list[str]:
        """What the run's mode rules out: a head on features without pretrained weights, frozen layers
        without fine-tuning."""

        def key(name: str) -> str:
            return self.key(model, name)

        problems = []
        pretrained = cfg.mode != "scratch" and self.model.weights != "none"
        if cfg.mode == "feature_extract" and not pretrained:
            problems.append(
                f"{key('mode')}: feature_extract trains a head on pretrained features, but model.weights is "
                "none; with random weights use one of: finetune, scratch"
            )
        if (
            cfg.mode == "feature_extract"
            and not cfg.augment
            and not cfg.image_size == cfg.eval_image_size == self.features.image_size
        ):
            problems.append(
                f"{key('augment')}: false with feature_extract trains on the features stage's output, "
                f"computed at features.image_size ({self.features.image_size}): "
                f"set {key('image_size')} and {key('eval_image_size')} to it"
            )
        if cfg.frozen_layers and cfg.mode != "feature_extract" and (cfg.mode != "finetune" or not pretrained):
            problems.append(
                f"{key('frozen_layers')}: freezing layers needs mode finetune with pretrained weights "
                f"(mode is {cfg.mode}, model.weights is {self.model.weights}); allowed here: 0"
            )
        return problems

    def check_efficiency(self) -> None:
        """What the data-efficiency curve's stages need beyond the rest (checked there, not by every stage):
        sizes the train split holds, and recipes that do not watch a validation split (a point has none)."""
        problems = []
        for key in ("sizes", "scratch_sizes"):
            over = [n for n in getattr(self.efficiency, key) if not self.drawable(n)]
            if over:
                problems.append(self.undrawable(f"efficiency.{key}", over))
        for model in TRAINED_MODELS:
            cfg = getattr(self, MODEL_SECTIONS[model])
            watching = _watching(cfg)
            if watching:
                problems.append(
                    f"{self.key(model, watching[0])} watches the validation split, but a point of the "
                    "data-efficiency curve trains on its subset with no validation"
                )
        _raise_all(problems)

    def drawable(self, per_class: int) -> bool:
        """Whether a subset of ``per_class`` images of each class can be drawn from the train split, below
        the full training set (the main models' point of the curve)."""
        pool = self.data.train_per_class - self.data.val_per_class
        return 1 <= per_class <= pool and per_class < self.data.train_per_class

    def undrawable(self, key: str, sizes: object) -> str:
        pool = self.data.train_per_class - self.data.val_per_class
        return (
            f"{key}: {sizes} is not within 1 to {pool}, the train-split images per class the subsets are "
            f"drawn from (data.train_per_class {self.data.train_per_class} - data.val_per_class "
            f"{self.data.val_per_class}), below the full training set (the main models' point, on the curve "
            "without a run of its own)"
        )

    def key(self, model: str, name: str) -> str:
        """The params key of the model's setting ``name`` (``train.lr``, ``scratch.lr``)."""
        return f"{MODEL_SECTIONS[model]}.{name}"

    def weights_for(self, model: str) -> str:
        return "none" if getattr(self, MODEL_SECTIONS[model]).mode == "scratch" else self.model.weights


def _watching(cfg: TrainConfig) -> list[str]:
    """The recipe's keys that watch the validation split (a plateau schedule, early stopping)."""
    watching = {"schedule": cfg.schedule == "plateau", "early_stopping_patience": cfg.early_stopping_patience}
    return [key for key, on in watching.items() if on]


def _allowed(annotation: Any) -> tuple[type, Range | tuple | None, bool]:
    """(Python type, its Range or Literal words or None, whether null is allowed) of a key's annotation."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        optional = type(None) in typing.get_args(annotation)
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Annotated:
        kind, allowed = typing.get_args(annotation)[:2]
        return kind, allowed, optional
    if typing.get_origin(annotation) is Literal:
        return str, typing.get_args(annotation), optional
    return typing.get_origin(annotation) or annotation, None, optional


def _check(key: str, value: Any, annotation: Any) -> Any:
    """``value`` if the annotation allows it (an int where a float is declared becomes a float)."""
    kind, allowed, optional = _allowed(annotation)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float):
        whole = f"; write {int(value)}" if value.is_integer() else ""
        raise ConfigError(f"{key} must be a whole number, got {value!r}{whole}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {kind.__name__}, got {value!r} ({type(value).__name__})")
    if isinstance(allowed, tuple) and value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    if isinstance(allowed, Range):
        low, high = allowed.low, allowed.high
        if low is not None and (value < low or (allowed.low_open and value == low)):
            raise ConfigError(f"{key} must be {'>' if allowed.low_open else '>='} {low}, got {value}")
        if high is not None and (value > high or (allowed.high_open and value == high)):
            raise ConfigError(f"{key} must be {'<' if allowed.high_open else '<='} {high}, got {value}")
    return value


def _build(
    cls,
    section: str,
    raw: Any,
    problems: list[str],
    fixed: typing.Mapping[str, Any] = types.MappingProxyType({}),
):
    """Check a params section against a dataclass and build it: every key set, each allowed. Each bad key
    adds its message to ``problems`` (so that one error names them all); then the section is None.

    ``fixed``: keys the section may not set, with the values they take (the scratch run's)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{section} must be a mapping of keys to values, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls, include_extras=True)
    keys = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
    checked, found = {}, len(problems)
    for key, value in raw.items():
        name = f"{section}.{key}"
        if key in fixed:
            problems.append(f"{name}: {SCRATCH_REFUSAL}")
        elif key not in keys:
            problems.append(f"unknown param {name}; allowed keys in {section}: {', '.join(keys)}")
        else:
            try:
                checked[key] = _check(name, value, hints[key])
            except ConfigError as err:
                problems.append(str(err))
    missing = [key for key in keys if key not in raw]
    if missing:
        problems.append(
            f"params.yaml does not set {', '.join(f'{section}.{key}' for key in missing)}: every setting is "
            "written there (docs/params.md lists them)"
        )
    if len(problems) > found:
        return None
    try:
        return cls(**checked, **fixed)
    except ConfigError as err:  # a check across the section's keys
        problems.append(str(err))
        return None


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "runtime": RuntimeConfig,
    "features": FeaturesConfig,
    "probe": ProbeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "logging": LoggingConfig,
    "efficiency": EfficiencyConfig,
}
SCRATCH_REFUSAL = "train_scratch trains every layer from random init: this key is the fine-tuning's (train.)"


def parse_params(raw: dict) -> Params:
    """Every section checked, every bad key named in one error (the architecture and weights are checked
    where a model is built: models.check_model)."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    allowed = {*SECTIONS, "scratch"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}"
        )
    problems: list[str] = []
    built = {name: _build(cls, name, raw.get(name), problems) for name, cls in SECTIONS.items()}
    built["scratch"] = _build(TrainConfig, "scratch", raw.get("scratch"), problems, SCRATCH_FIXED)
    for section in MODEL_SECTIONS.values():
        if built[section] is not None:
            problems += _recipe_problems(built[section], section)
    if None in built.values():  # the checks across sections need every section built
        _raise_all(problems)
    params = Params(**built)
    for model in TRAINED_MODELS:
        problems += params._run_problems(model, getattr(params, MODEL_SECTIONS[model]), holdout=False)
    if len(params.probe.C) > 1 and not params.data.val_per_class:
        problems.append(
            "probe.C lists several values to choose from on the validation split, but data.val_per_class is 0"
        )
    _raise_all(problems)
    return params


def _raise_all(problems: list[str]) -> None:
    """One error naming every problem found."""
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in params.yaml: " + " | ".join(problems))


class ParamsLoader(yaml.SafeLoader):
    """YAML as users and DVC write numbers: ``1e-3``, ``5e-05`` and ``1E3`` are floats.

    PyYAML implements YAML 1.1, whose floats need a dot (``1.0e-3``), so it reads ``1e-3`` as a string;
    YAML 1.2 (and ``dvc exp run -S train.lr=0.00005``, which writes ``5e-05``) mean a float.
    """


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(stream) -> Any:
    """Parse YAML text or a file object with :class:`ParamsLoader`."""
    return yaml.load(stream, Loader=ParamsLoader)


def read_params_file(path: str | Path = "params.yaml") -> Any:
    """The parsed YAML of a params file, unchecked; a missing file or bad YAML is a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, where params.yaml lives")
    try:
        with path.open() as f:
            return read_yaml(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from err


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_params_file(path) or {})


def _shown(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("\n...\n").strip()


def _allowed_text(annotation: Any) -> str:
    kind, allowed, optional = _allowed(annotation)
    names = {int: "integer", float: "number", bool: "true or false", str: "text", list: "list"}
    if isinstance(allowed, tuple):
        text = "one of " + ", ".join(f"`{word}`" for word in allowed)
    else:
        text = names[kind] + (f", {allowed}" if allowed else "")
    return text + (", or null" if optional else "")


def reference(raw: dict) -> str:
    """The params reference of docs/params.md: every key, the values it allows (from the declarations above)
    and its value in ``raw`` (the project's params.yaml)."""
    lines = ["| Key | Allowed | In params.yaml |", "|---|---|---|"]
    sections = [*SECTIONS.items(), ("scratch", TrainConfig)]
    for section, cls in sections:
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            if section == "scratch" and f.name in SCRATCH_FIXED:
                continue
            value = (raw.get(section) or {}).get(f.name)
            lines.append(f"| `{section}.{f.name}` | {_allowed_text(hints[f.name])} | `{_shown(value)}` |")
    return "\n".join(lines) + "\n"


REFERENCE_MARK = "<!-- generated from src/transferlab/config.py: python -m transferlab.config -->"


def write_reference(doc: Path = Path("docs/params.md"), params: Path = Path("params.yaml")) -> None:
    """Replace what follows :data:`REFERENCE_MARK` in ``doc`` with the reference of ``params``."""
    text = doc.read_text()
    head = text[: text.index(REFERENCE_MARK) + len(REFERENCE_MARK)]
    doc.write_text(f"{head}\n\n{reference(read_yaml(params.read_text()))}")


if __name__ == "__main__":
    write_reference()
