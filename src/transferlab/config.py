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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

# the two models the training loop trains, each with its stage (train_<run>) and its own params section
RUNS = ("finetune", "scratch")
RUN_SECTIONS = {"finetune": "train", "scratch": "scratch"}
# every model evaluate and compare report on: the linear probe (stage train_probe) and the two trained ones
MODELS = ("probe", *RUNS)
DUPLICATE_POLICIES = ("keep", "drop")
DATA_SOURCE_ENV = "TRANSFERLAB_DATA"


def _choice(*allowed: str) -> dict:
    return {"choices": allowed}


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> dict:
    return {"low": low, "high": high, "low_open": low_open}


@dataclass(frozen=True)
class DataConfig:
    # "download": the official Caltech-101, fetched from CaltechDATA, or read from a local copy of it named by the
    # environment variable TRANSFERLAB_DATA (checked to be the official data); anything else is a path to your own
    # images (an unpacked folder of class subfolders, or a .zip / .tar.gz archive of one)
    source: str = "download"
    exclude_classes: list = field(default_factory=lambda: ["BACKGROUND_Google"])
    train_per_class: int = field(default=30, metadata=_range(1))
    val_per_class: int = field(default=5, metadata=_range(0))
    # which val_per_class-sized slice of each class's training images validates: folds 0, 1, ... of them
    # give repeated choices on disjoint validation images (k-fold), the test split unchanged
    val_fold: int = field(default=0, metadata=_range(0))
    test_per_class: int | None = field(default=None, metadata=_range(1))
    cache_size: int = field(default=256, metadata=_range(32, 1024))
    # byte-identical files: reported in metrics/prepare.json; drop: a file found in several classes is left out
    # of every split (its label is ambiguous), and of copies within one class only the first is kept
    duplicates: str = field(default="keep", metadata=_choice(*DUPLICATE_POLICIES))
    seed: int = 0

    def __post_init__(self):
        if self.val_per_class >= self.train_per_class:
            raise ConfigError(
                f"data.val_per_class ({self.val_per_class}) must be smaller than "
                f"data.train_per_class ({self.train_per_class}): validation images are held out of the training ones"
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
    arch: str = "timm/tf_efficientnet_lite0"
    # "imagenet", "none", or a path to a state-dict file (.pth/.pt/.safetensors)
    weights: str = "imagenet"


TRAINING_MODES = ("finetune", "feature_extract", "scratch")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")
SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "linear", "plateau")
AUTO_AUGMENTS = ("none", "trivialaugment", "randaugment")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
MONITORS = ("val_acc", "val_loss")
HEAD_INITS = ("random", "probe")
TTA_MODES = ("none", "flip")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how networks run, shared by every stage that runs one (results agree up to rounding)."""

    device: str = field(default="auto", metadata=_choice(*DEVICES))  # auto: cuda, else mps, else cpu
    # fp16 needs CUDA (with a gradient scaler); bf16 runs on CUDA or on a CPU with native bf16 support
    precision: str = field(default="fp32", metadata=_choice(*PRECISIONS))
    # data-parallel training processes on this machine (DDP, started with torchrun; one per GPU); batch sizes are global
    processes: int = field(default=1, metadata=_range(1))
    channels_last: bool = True


@dataclass(frozen=True)
class FeaturesConfig:
    """Stage ``features``: the pretrained network's pooled features of every split and of their mirror images."""

    image_size: int = field(default=224, metadata=_range(16, 1024))
    batch_size: int = field(default=64, metadata=_range(1))
    # random resized crops of each train and validation image, each mirrored at random: extra training samples
    # for the linear probe (0 = only the centre crop and its mirror image); scale (crop_scale_min, 1)
    train_crops: int = field(default=0, metadata=_range(0, 32))
    crop_scale_min: float = field(default=0.6, metadata=_range(0, 1, low_open=True))
    seed: int = 0  # initialises the backbone with model.weights: none (features of a random network), and draws the crops


# keys of a run's section that only fine-tuning reads: train_scratch trains every layer from random init
FINETUNE_ONLY = (
    "mode",
    "init_head",
    "frozen_stages",
    "backbone_lr_scale",
    "freeze_bn_stats",
    "interpolation",
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run's recipe: the ``train:`` section (stage train_finetune) or ``scratch:`` (train_scratch)."""

    # finetune: every layer trains, the pretrained ones at lr * backbone_lr_scale (the first
    # frozen_stages stages of the backbone stay fixed: partial unfreezing);
    # feature_extract: only the new head trains on the frozen backbone's features;
    # scratch: random init, every layer at lr (the train_scratch stage always runs this mode)
    mode: str = field(default="finetune", metadata=_choice(*TRAINING_MODES))
    # the new head starts from random weights, or from the linear probe's fitted head (LP-FT, Kumar et al. 2022)
    init_head: str = field(default="random", metadata=_choice(*HEAD_INITS))
    # train on the train and validation images together, for a fixed number of epochs, keeping the last one:
    # the final fit once the settings were chosen on validation (no validation curve, no best-epoch choice)
    train_on_val: bool = False
    frozen_stages: int = field(default=0, metadata=_range(0))
    epochs: int = field(default=6, metadata=_range(1))
    batch_size: int = field(default=32, metadata=_range(1))
    lr: float = field(default=0.02, metadata=_range(0, low_open=True))
    backbone_lr_scale: float = field(default=0.1, metadata=_range(0, 1))
    optimizer: str = field(default="sgd", metadata=_choice(*OPTIMIZERS))
    momentum: float = field(default=0.9, metadata=_range(0, 1))  # sgd and rmsprop
    nesterov: bool = True  # sgd with momentum > 0
    weight_decay: float = field(default=5e-5, metadata=_range(0))
    decay_norm_and_bias: bool = False  # weight decay on biases and normalisation weights too
    # learning-rate schedule, stepped every optimizer step (plateau: every epoch, on `monitor`)
    schedule: str = field(default="cosine", metadata=_choice(*SCHEDULES))
    warmup_epochs: float = field(default=0.0, metadata=_range(0))  # linear warm-up, in epochs ...
    warmup_steps: int = field(default=0, metadata=_range(0))  # ... or in optimizer steps (not both)
    step_epochs: int = field(default=2, metadata=_range(1))  # step: multiply by gamma every step_epochs
    milestones: list = field(default_factory=list)  # multistep: epochs at which the lr is multiplied by gamma
    gamma: float = field(
        default=0.1, metadata=_range(0, 1, low_open=True)
    )  # step, multistep, exponential (per epoch), plateau
    plateau_patience: int = field(default=1, metadata=_range(0))
    # validation metric that picks the best epoch, drives plateau and early stopping
    monitor: str = field(default="val_acc", metadata=_choice(*MONITORS))
    early_stopping_patience: int = field(default=0, metadata=_range(0))  # epochs without improvement; 0 = off
    grad_clip_norm: float = field(default=0.0, metadata=_range(0))  # 0 = off
    label_smoothing: float = field(default=0.1, metadata=_range(0, 1))
    # keep the pretrained batch-norm running statistics fixed while fine-tuning
    freeze_bn_stats: bool = True
    # exponential moving average of the weights, updated every optimizer step (0 = off): the average is
    # what is validated and kept (torch.optim.swa_utils.AveragedModel)
    ema_decay: float = field(default=0.0, metadata=_range(0, 1))
    # weight-space interpolation (WiSE-FT, Wortsman et al. 2022): the kept weights are
    # start + interpolation * (end - start), start being the weights fine-tuning began from; 1 = the end
    interpolation: float = field(default=1.0, metadata=_range(0, 1))
    image_size: int = field(default=160, metadata=_range(16, 1024))
    eval_image_size: int = field(default=224, metadata=_range(16, 1024))
    # augmentation (torchvision.transforms.v2, on the training device); augment: false turns all of it off
    # and trains on the evaluation centre crop, which lets feature_extract train on the features stage's output
    augment: bool = True
    crop_scale_min: float = field(default=0.25, metadata=_range(0, 1, low_open=True))  # random resized crop
    hflip: bool = True
    rotation_degrees: float = field(default=0.0, metadata=_range(0, 180))
    color_jitter: float = field(
        default=0.0, metadata=_range(0, 1)
    )  # brightness, contrast, saturation strength
    auto_augment: str = field(default="none", metadata=_choice(*AUTO_AUGMENTS))
    random_erasing: float = field(default=0.0, metadata=_range(0, 1))  # probability per image
    mixup_alpha: float = field(
        default=0.0, metadata=_range(0)
    )  # 0 = off; with cutmix, one of the two per batch
    cutmix_alpha: float = field(default=0.0, metadata=_range(0))
    balanced_sampling: bool = (
        False  # draw every class equally often (Caltech-101 has 31 to 800 images a class)
    )
    compile: bool = False  # torch.compile the model: faster steps after a warm-up of about a minute on a CPU
    seed: int = 0


def _check_recipe(cfg: TrainConfig, section: str) -> None:
    """The checks that involve several keys of one run's section."""
    if cfg.ema_decay >= 1:
        raise ConfigError(
            f"{section}.ema_decay must be < 1 (1 would keep the starting weights); 0 turns the average off"
        )
    if cfg.warmup_epochs and cfg.warmup_steps:
        raise ConfigError(
            f"{section}.warmup_epochs and {section}.warmup_steps are both set: give the warm-up in one unit"
        )
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in cfg.milestones) or sorted(
        set(cfg.milestones)
    ) != list(cfg.milestones):
        raise ConfigError(
            f"{section}.milestones must be increasing epoch numbers >= 1, got {cfg.milestones!r}"
        )
    augmentations = ("rotation_degrees", "color_jitter", "random_erasing", "mixup_alpha", "cutmix_alpha")
    unused = [name for name in augmentations if getattr(cfg, name)] + (
        ["auto_augment"] if cfg.auto_augment != "none" else []
    )
    if not cfg.augment and unused:
        raise ConfigError(
            f"{section}.{unused[0]} has no effect with {section}.augment: false; set it to its off value or augment: true"
        )
    if cfg.schedule == "multistep" and not cfg.milestones:
        raise ConfigError(
            f"{section}.schedule: multistep needs {section}.milestones (epochs at which the lr drops)"
        )


@dataclass(frozen=True)
class ProbeConfig:
    """The linear probe (stage train_probe): a logistic regression on the features stage's output."""

    # mirror images are extra training samples; a validation image is scored by the mean of both views (as evaluate.tta: flip)
    flip: bool = True
    # inverse regularisation strengths tried; the one with the best validation accuracy is kept
    C: list = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0])
    max_iter: int = field(default=1000, metadata=_range(1))  # L-BFGS iterations per fit
    train_on_val: bool = True  # refit on train + validation with the chosen C

    def __post_init__(self):
        if not self.C or not all(
            isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in self.C
        ):
            raise ConfigError(f"probe.C must be a non-empty list of numbers > 0, got {self.C!r}")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = field(default=64, metadata=_range(1))
    # classes listed in the comparison as gaining / losing most from pretraining
    top_classes: int = field(default=10, metadata=_range(1))
    topk: list = field(default_factory=lambda: [1, 5])  # top-k accuracies reported for each k
    # the confusion-matrix image shows the N classes most often confused (0: all of them)
    confusion_classes: int = field(default=25, metadata=_range(0))
    calibration_bins: int = field(default=15, metadata=_range(2, 100))  # reliability diagram and ECE
    gallery_size: int = field(default=24, metadata=_range(0, 200))  # misclassified test images shown
    gradcam_images: int = field(default=6, metadata=_range(0, 50))  # test images in the Grad-CAM panel
    tta: str = field(
        default="flip", metadata=_choice(*TTA_MODES)
    )  # flip: average the logits of image and mirror image

    def __post_init__(self):
        if not self.topk or not all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.topk
        ):
            raise ConfigError(f"evaluate.topk must be a non-empty list of integers >= 1, got {self.topk!r}")


@dataclass(frozen=True)
class LoggingConfig:
    # also write TensorBoard event files (scalars, learning rates, a few images) to metrics/train_<run>/tensorboard
    tensorboard: bool = False


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

    def train_config(self, run: str, holdout: bool = False) -> TrainConfig:
        """The run's section, checked against the rest of the params.

        ``holdout``: for the run's holdout twin, which trains on the train split only (``train_on_val`` off)
        and, starting from the probe, from the probe fitted on the train split only.
        """
        if run not in RUNS:
            raise ConfigError(f"unknown training run {run!r}; allowed: {', '.join(RUNS)}")
        cfg = getattr(self, RUN_SECTIONS[run])
        if holdout:
            cfg = dataclasses.replace(cfg, train_on_val=False)

        def key(name: str) -> str:
            return self.key(run, name)

        needs_validation = [
            k
            for k, on in (
                ("schedule", cfg.schedule == "plateau"),
                ("early_stopping_patience", cfg.early_stopping_patience),
            )
            if on
        ]
        if needs_validation and not self.data.val_per_class:
            raise ConfigError(
                f"{key(needs_validation[0])} watches the validation split, but data.val_per_class is 0"
            )
        if needs_validation and cfg.train_on_val:
            raise ConfigError(
                f"{key(needs_validation[0])} watches the validation split, but {key('train_on_val')} trains on it; set one of them off"
            )
        if (
            cfg.init_head == "probe"
            and self.probe.train_on_val
            and not cfg.train_on_val
            and self.data.val_per_class
            and not holdout
        ):
            raise ConfigError(
                f"{key('train_on_val')}: false validates every epoch, but the probe the run starts from (train.init_head: probe) "
                f"was fitted on the validation images too (probe.train_on_val: true); set both to false to choose settings"
            )
        if cfg.batch_size % self.runtime.processes:
            raise ConfigError(
                f"{key('batch_size')} ({cfg.batch_size}) must be divisible by runtime.processes ({self.runtime.processes}): "
                f"it is the global batch, split evenly between the processes"
            )
        pretrained = cfg.mode != "scratch" and self.model.weights != "none"
        if cfg.mode == "feature_extract" and not pretrained:
            raise ConfigError(
                f"{key('mode')}: feature_extract trains a head on pretrained features, but model.weights is none; "
                f"with random weights use one of: finetune, scratch"
            )
        if (
            cfg.mode == "feature_extract"
            and not cfg.augment
            and not cfg.image_size == cfg.eval_image_size == self.features.image_size
        ):
            raise ConfigError(
                f"{key('augment')}: false with feature_extract trains on the features stage's output, computed at "
                f"features.image_size ({self.features.image_size}): set {key('image_size')} and {key('eval_image_size')} to it"
            )
        if cfg.mode == "feature_extract":  # the whole backbone stays fixed: frozen_stages says nothing more
            cfg = dataclasses.replace(cfg, frozen_stages=0)
        if cfg.frozen_stages and (cfg.mode != "finetune" or not pretrained):
            raise ConfigError(
                f"{key('frozen_stages')}: freezing stages needs mode finetune with pretrained weights "
                f"(mode is {cfg.mode}, model.weights is {self.model.weights}); allowed here: 0"
            )
        return cfg

    def key(self, run: str, name: str) -> str:
        """The params key of the run's setting ``name`` (``train.lr``, ``scratch.lr``)."""
        return f"{RUN_SECTIONS[run]}.{name}"

    def weights_for(self, run: str) -> str:
        return "none" if getattr(self, RUN_SECTIONS[run]).mode == "scratch" else self.model.weights


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = typing.get_origin(annotation) or annotation
    if expected is int and isinstance(value, float):
        whole = f"; write {int(value)}" if value.is_integer() else ""
        raise ConfigError(f"{key} must be a whole number, got {value!r}{whole}")
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key} must be of type {expected.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _check_range(key: str, value: Any, meta: typing.Mapping) -> None:
    if "choices" in meta:
        if value not in meta["choices"]:
            raise ConfigError(f"{key} must be one of {', '.join(meta['choices'])}; got {value!r}")
        return
    if value is None or not meta:
        return
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        relation = ">" if meta["low_open"] else ">="
        raise ConfigError(f"{key} must be {relation} {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be <= {high}, got {value}")


def _build(cls, section: str, raw: Any, exclude: typing.Mapping[str, str] = {}):
    """Check a params section against a dataclass and build it; ``exclude``: keys the section may not set, and why."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    checked = {}
    for key, value in raw.items():
        name = f"{section}.{key}"
        if key in exclude:
            raise ConfigError(f"{name}: {exclude[key]}")
        if key not in fields:
            raise ConfigError(f"unknown param {name}; allowed keys in {section}: {', '.join(fields)}")
        value = _check_type(name, value, hints[key])
        _check_range(name, value, fields[key].metadata)
        checked[key] = value
    return cls(**checked)


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "runtime": RuntimeConfig,
    "features": FeaturesConfig,
    "probe": ProbeConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "logging": LoggingConfig,
}
SCRATCH_EXCLUDES = dict.fromkeys(FINETUNE_ONLY, "train_scratch trains every layer from random init: this key is the fine-tuning's (train.)")


def parse_params(raw: dict) -> Params:
    """Every section checked (the architecture and weights are checked where a model is built: models.check_model)."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    allowed = {*SECTIONS, "scratch"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}"
        )
    built = {name: _build(cls, name, raw.get(name)) for name, cls in SECTIONS.items()}
    scratch = _build(TrainConfig, "scratch", raw.get("scratch"), SCRATCH_EXCLUDES)
    built["scratch"] = dataclasses.replace(scratch, mode="scratch", init_head="random", frozen_stages=0)
    for section in RUN_SECTIONS.values():
        _check_recipe(built[section], section)
    params = Params(**built)
    for run in RUNS:
        params.train_config(run)
    if len(params.probe.C) > 1 and not params.data.val_per_class:
        raise ConfigError(
            "probe.C lists several values to choose from on the validation split, but data.val_per_class is 0"
        )
    return params


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


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the project root, where params.yaml lives")
    try:
        with path.open() as f:
            raw = read_yaml(f)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from err
    return parse_params(raw or {})
