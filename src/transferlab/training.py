"""The training loop of stages ``train_finetune`` and ``train_scratch`` (entry point: ``train.py``); the mode
is data.

Modes (``train.mode``): ``finetune`` trains every layer, the pretrained ones at ``lr * backbone_lr_scale``,
except the first ``frozen_layers`` backbone layers (partial unfreezing); ``feature_extract`` trains only the
new head on the frozen backbone (without augmentation, on the features stage's output); ``scratch`` starts
from random weights. ``train.init_head: probe`` starts from the linear probe (LP-FT). Per epoch, dvclive
logs train (and val) loss and accuracy and each parameter group's learning rate to ``metrics/train_<run>/``;
``data/models/<run>/model.pt`` keeps, with everything needed to use it, the best epoch on the validation
split (``monitor``), or the last one with ``train_on_val``: its weights, or their moving average with
``ema_decay``. With ``interpolation`` < 1 it keeps instead a mix of the starting weights and the last epoch's
(WiSE-FT); a fine-tuning run with validation writes the validation accuracy along that line
(``interpolation.csv``). An interrupted run (killed, Ctrl-C) resumes where it stopped when started again
(see ``resume.py``). With ``runtime.processes: N`` the same command trains in N data-parallel processes
(see ``distributed.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from . import cores, paths, resume
from .checkpoint import read_checkpoint, save_checkpoint
from .config import Params, RuntimeConfig, TrainConfig, load_params
from .device import autocast, training_device
from .distributed import World, process_group
from .errors import ConfigError, DivergedError, ModelError, UnlearnedError
from .inference import predict_logits
from .inputs import BatchAugmenter, Preprocessing, batch_slices, epoch_order
from .models import (
    build_model,
    freeze_layers,
    linear_head,
    parameter_groups,
    read_layers,
    set_train_mode,
)
from .optim import LrSchedule, build_optimizer
from .paths import FEATURES_DIR, checkpoint_path, resume_path, train_dir
from .splits import features_info, load_classes, load_features, load_split
from .tracking import TrainingLog
from .weight_space import CURVE_POINTS, cpu_copy, interpolate, moving_average

log = logging.getLogger("transferlab.stages.train")
# The learning check (:class:`LearningCheck`): training images per class the model is scored on before
# training and as it is saved; the fewest images that can tell chance from learning; a run from chance judged
# only after this many epochs (shorter ones may not have learned yet: the smoke preset's 2 scratch epochs);
# the switch that keeps a model that did not learn.
CHECK_PER_CLASS = 5
MIN_CHECKED = 50
LEARNING_EPOCHS = 10
KEEP_UNLEARNED_ENV = "TRANSFERLAB_KEEP_UNLEARNED"


def fit(name: str, world: World | None = None, holdout: bool = False) -> dict:
    """Train the run ``name`` (finetune or scratch); return the kept epoch and its validation accuracy (None
    without validation).

    ``world``: this process's place in a data-parallel run (default: the only process, on ``runtime.device``).
    ``holdout``: train the run's holdout twin (see :func:`paths.holdout`), which writes under its own name.
    """
    started = time.perf_counter()
    params = load_params()
    cfg, arch = params.train_config(name, holdout), params.model.arch
    # the thread count it comes to is part of the run: logged with its params, in its resume fingerprint
    runtime = dataclasses.replace(
        params.runtime, threads=cores.use(params.runtime.threads, world.size if world else 1)
    )
    out = paths.holdout(name) if holdout else name  # where the run writes
    probe = paths.holdout("probe") if holdout else "probe"
    weights = params.weights_for(name)
    device, amp_dtype = training_device(runtime.device, runtime.precision)  # an unavailable one fails here
    world = world or World(device=device)

    # data: the cached images of the train split (with train_on_val, train + val) and of the validation split
    classes = load_classes()
    data = training_data(cfg.train_on_val)
    (train_images, train_labels), (_, val_labels) = data
    if len(train_labels) < world.size:
        raise ConfigError(
            f"runtime.processes: {world.size} processes but {len(train_labels)} training images; "
            "every process needs a share"
        )
    slices = batch_slices(len(train_labels), cfg.batch_size)

    # the model, its optimizer and schedule, and where its batches come from
    model, head_name, prep = initial_model(arch, weights, classes, cfg, params.features.layers, probe)
    if world.rank:  # every process starts from the same weights (DDP checks) but draws its own augmentations
        torch.manual_seed(cfg.seed + world.rank)
    trainer = Trainer.create(model, head_name, cfg, runtime, len(slices), world, amp_dtype)
    batches = training_batches(trainer, data, prep, arch, weights, len(classes))  # missing features fail here
    start = cpu_copy(model) if cfg.mode != "scratch" else None  # one end of the interpolation (WiSE-FT)
    check = LearningCheck.begin(trainer, batches, train_labels, len(classes))
    generator = torch.Generator().manual_seed(cfg.seed)  # the same on every process: one order, sharded

    # resume an interrupted run with the same fingerprint
    start_from = [checkpoint_path(probe)] if cfg.init_head == "probe" else []  # the files the run starts from
    if isinstance(batches, FeatureBatches):
        start_from.append(FEATURES_DIR / "features.json")
    fingerprint = resume.fingerprint(out, arch, weights, cfg, runtime, trainer.device, start_from, world.size)
    state = world.from_main(resume.load_state(resume_path(out), fingerprint) if world.main else None)
    progress, best, kept = resume.Progress(), BestEpoch(), None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        generator.set_state(state["generator"])
        resume.restore_rng(state["rng"][world.rank])
        progress, best, kept = resume.Progress(**state["progress"]), BestEpoch(**state["best"]), state["kept"]
        where = f"epoch {progress.epoch + 1}, step {progress.step}"
        log.info("resuming %s from %s (%s)", out, where, resume_path(out))
    described = {"run": out, "arch": arch, "weights": weights}
    described |= dataclasses.asdict(cfg) | dataclasses.asdict(runtime)
    header = {"fingerprint": fingerprint, "params": described}  # saved with each state

    training_log = TrainingLog(train_dir(out), params.logging.tensorboard, active=world.main)
    with training_log as live, resume.stop_requests() as stop_requested:
        live.log_params(described)
        live.log_images("train images (cached, before augmentation)", train_images[:16])
        # the curves of the epochs done before an interruption, at their own steps
        for logged in progress.history:
            live.log_epoch(logged)
        while progress.epoch < cfg.epochs and not best.stopped_early:
            epoch_start = generator.get_state()
            order = epoch_order(train_labels, generator, cfg.balanced_sampling)
            description = f"{out} epoch {progress.epoch + 1}/{cfg.epochs}"
            try:
                finished = train_one_epoch(
                    trainer, batches, order, slices, progress, stop_requested, description
                )
            except NonFiniteLoss:
                raise divergence(name, out, cfg, progress, params) from None
            if not finished:
                save_resumable(resume_path(out), trainer, progress, best, kept, header, epoch_start)
                where = f"epoch {progress.epoch + 1}, step {progress.step}"
                raise SystemExit(f"stopped: {out} saved at {where}; run again to resume")
            logged = progress.train_metrics()
            if len(val_labels):
                logged.update(validate(trainer.kept, batches, val_labels))
            progress.end_epoch(logged)
            if best.update(logged, cfg.monitor, progress.epoch, cfg.early_stopping_patience):
                kept = cpu_copy(trainer.kept)
            trainer.schedule.end_epoch(logged.get(cfg.monitor.replace("_", "/")))
            shown = ", ".join(f"{key} {value:.4g}" for key, value in logged.items())
            log.info("%s epoch %d: %s", out, progress.epoch, shown)
            live.log_epoch(logged)
            save_resumable(resume_path(out), trainer, progress, best, kept, header, generator.get_state())
        chosen = {"val_acc": progress.history[best.epoch - 1].get("val/acc"), "epoch": best.epoch}

        # WiSE-FT: the line from the starting weights to the last epoch's (a final fit's)
        if start is not None:
            end, curve = cpu_copy(trainer.kept), []
            if len(val_labels):
                curve = interpolation_curve(trainer, batches, start, end, progress.history[-1], val_labels)
                live.write_csv("interpolation.csv", ["interpolation", "val_acc", "val_loss"], curve)
            if cfg.interpolation < 1:  # the mix replaces the best-epoch choice
                kept = interpolate(start, end, cfg.interpolation)
                val_acc = next((acc for weight, acc, _ in curve if weight == cfg.interpolation), None)
                chosen = {"val_acc": val_acc, "epoch": progress.epoch}

        at_chance = check.judge(
            out, kept, chosen["val_acc"], len(val_labels), progress, params.key(name, "lr")
        )
        if not world.main:
            return chosen
        save_checkpoint(
            checkpoint_path(out),
            kept,
            run=out,
            mode=cfg.mode,
            arch=arch,
            weights=weights,
            classes=classes,
            head=head_name,
            preprocessing=prep.as_dict(),
            cache_size=train_images.shape[1],
            eval_image_size=cfg.eval_image_size,
            channels_last=runtime.channels_last,
            config=dataclasses.asdict(cfg),
            layers=read_layers(model),
            at_chance=at_chance,
            **chosen,
        )
        if chosen["val_acc"] is not None:
            live.summary["best/val_acc"] = chosen["val_acc"]
        live.summary["best/epoch"] = chosen["epoch"]
        live.summary["epochs_run"] = progress.epoch
        live.summary["threads"] = runtime.threads
        live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    resume_path(out).unlink(missing_ok=True)
    return chosen


def train_one_epoch(
    trainer: Trainer,
    batches: Batches,
    order: torch.Tensor,
    slices: list[slice],
    progress: resume.Progress,
    stop_requested: Callable[[], bool],
    description: str,
) -> bool:
    """Train on the epoch's batches from ``progress.step`` on (``order[s]`` for each slice ``s``); False when
    a stop was requested (Ctrl-C) and the state is to be saved. Raises :class:`NonFiniteLoss`."""
    if progress.step == 0:
        progress.start_epoch({f"lr/{group['name']}": group["lr"] for group in trainer.optimizer.param_groups})
    trainer.enter_train_mode()
    world = trainer.world
    with tqdm(
        total=len(slices), initial=progress.step, desc=description, leave=False, disable=not world.main
    ) as bar:
        for batch in slices[progress.step :]:
            progress.add_batch(*trainer.step(batches, order[batch]))
            bar.update()
            if progress.step % 10 == 0 or progress.step == len(slices):  # reading the sum waits for a GPU
                loss = float(progress.loss_sum) / progress.seen
                if not math.isfinite(loss):  # NaN and inf stay in the epoch's sum once there
                    raise NonFiniteLoss
                bar.set_postfix(loss=f"{loss:.3f}")
            if world.stop_now(stop_requested(), progress.step, len(slices)):
                return False
    return True


def validate(net: nn.Module, batches: ImageBatches | FeatureBatches, labels: np.ndarray) -> dict:
    """``net``'s validation loss and accuracy."""
    logits = batches.validate(net)
    return {
        "val/loss": nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item(),
        "val/acc": (logits.argmax(1).numpy() == labels).mean().item(),
    }


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite."""


@dataclass
class BestEpoch:
    """The best epoch so far by the validation metric ``monitor``, and early stopping (saved in the state)."""

    score: float | None = None
    epoch: int = 0
    epochs_since: int = 0
    stopped_early: bool = False

    def update(self, logged: dict, monitor: str, epoch: int, patience: int) -> bool:
        """Take the metrics of ``epoch``; True if it is the best so far (always, without a validation score).
        With ``patience`` > 0, ``stopped_early`` turns true after that many epochs without improvement."""
        score = None
        if "val/acc" in logged:
            score = logged["val/acc"] if monitor == "val_acc" else -logged["val/loss"]
        if score is None or self.score is None or score > self.score:
            self.score, self.epoch, self.epochs_since = score, epoch, 0
            return True
        self.epochs_since += 1
        self.stopped_early = 0 < patience <= self.epochs_since
        return False


def save_resumable(
    path: Path,
    trainer: Trainer,
    progress: resume.Progress,
    best: BestEpoch,
    kept: dict | None,
    header: dict,
    generator_state: torch.Tensor,
) -> None:
    """Save to ``path`` what a resumed run needs: ``generator_state`` draws the current epoch's order again,
    and every process's random state is gathered (an exact resume)."""
    rng = trainer.world.gather(resume.rng_state(trainer.device))
    if trainer.world.main:
        state = {
            "trainer": trainer.state_dict(),
            "progress": dataclasses.asdict(progress),
            "best": dataclasses.asdict(best),
            "kept": kept,
            "rng": rng,
            "generator": generator_state,
            **header,
        }
        resume.save_state(path, state)


def interpolation_curve(
    trainer: Trainer,
    batches: ImageBatches | FeatureBatches,
    start: dict,
    end: dict,
    end_scores: dict,
    val_labels: np.ndarray,
) -> list[tuple[float, float, float]]:
    """(mixing weight, validation accuracy, loss) of the weights ``start + weight * (end - start)`` (WiSE-FT),
    at :data:`CURVE_POINTS` and the run's ``interpolation``: which mix of start and end validates best.
    ``end_scores``: the validation metrics of ``end`` (weight 1), measured during training."""
    rows = []
    for weight in sorted({*CURVE_POINTS, trainer.cfg.interpolation}):
        if weight == 1:
            scores = end_scores
        else:
            trainer.kept.load_state_dict(interpolate(start, end, weight))
            scores = validate(trainer.kept, batches, val_labels)
        rows.append((weight, scores["val/acc"], scores["val/loss"]))
        log.info("interpolation %.2f: validation accuracy %.4f", weight, scores["val/acc"])
    return rows


def train(name: str, holdout: bool = False) -> dict:
    """Train in this process, as one of the data-parallel processes torchrun started or as the only one."""
    params = load_params()
    runtime = params.runtime
    device, _ = training_device(runtime.device, runtime.precision)
    batch_size = params.train_config(name).batch_size
    with process_group(device, runtime.processes, batch_size, params.key(name, "batch_size")) as world:
        return fit(name, world, holdout)


@dataclass
class Trainer:
    """A model made ready for one training mode, with its optimizer, schedule and loss: what a step needs."""

    cfg: TrainConfig
    runtime: RuntimeConfig
    model: nn.Module
    head_name: str
    frozen: list[str]  # modules of the frozen backbone layers
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    world: World
    amp_dtype: torch.dtype | None
    average: AveragedModel | None  # the moving average of the weights (ema_decay), updated every step

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_name)

    @property
    def kept(self) -> nn.Module:
        """The network that is validated and saved: the moving average of the weights, or the weights."""
        return self.average.module if self.average is not None else self.model

    @classmethod
    def create(
        cls,
        model: nn.Module,
        head_name: str,
        cfg: TrainConfig,
        runtime: RuntimeConfig,
        steps_per_epoch: int,
        world: World,
        amp_dtype,
    ) -> Trainer:
        """``world`` from :func:`process_group`, ``amp_dtype`` from :func:`training_device`."""
        device = world.device
        frozen = freeze_layers(model, head_name, cfg.frozen_layers)
        if cfg.mode == "feature_extract":
            model.requires_grad_(False)
            model.get_submodule(head_name).requires_grad_(True)
        model.to(
            device, memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format
        )
        average = moving_average(model, cfg.ema_decay) if cfg.ema_decay else None
        if average is not None:
            average.update_parameters(model)  # the average starts at the starting weights
        scale = None if cfg.mode == "scratch" else cfg.backbone_lr_scale
        groups = parameter_groups(model, head_name, cfg.lr, scale, cfg.weight_decay, cfg.decay_norm_and_bias)
        optimizer = build_optimizer(groups, cfg)
        return cls(
            cfg,
            runtime,
            model,
            head_name,
            frozen,
            optimizer,
            LrSchedule(optimizer, cfg, steps_per_epoch),
            torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
            nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
            world,
            amp_dtype,
            average,
        )

    def enter_train_mode(self) -> None:
        if self.cfg.mode == "feature_extract":
            self.model.eval()
            self.head.train()
        else:
            set_train_mode(self.model, self.frozen, self.cfg.freeze_bn_stats and self.cfg.mode == "finetune")

    def step(self, batches: Batches, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step on the batch ``indices``; returns (summed loss, correct predictions, images).

        The sums stay on the device (as float64 and int64 tensors): reading them every step would make a GPU
        wait. With several processes each one trains on its shard of the batch, and the sums are the whole
        batch's.
        """
        inputs, targets, labels = batches.fetch(self.world.shard(indices))
        with autocast(self.device, self.amp_dtype):
            logits = batches.network(inputs)
            loss = self.criterion(logits, targets)
        # DDP averages the shards' gradients; weighting each shard's mean by its size makes it the batch mean
        share = len(labels) * self.world.size / len(indices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * share if share != 1 else loss).backward()
        if self.cfg.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.grad_clip_norm
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        if self.average is not None:
            self.average.update_parameters(self.model)
        loss_sum, correct = loss.detach().double() * len(labels), (logits.argmax(1) == labels).sum()
        return self.world.sum(loss_sum), self.world.sum(correct), len(indices)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "average": self.average.state_dict() if self.average is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.average is not None:
            self.average.load_state_dict(state["average"])


class Batches(Protocol):
    """What a training step needs: where its batch comes from and the network it goes through.
    ``fetch(indices)`` gives (network inputs, loss targets, labels) on the training device; ``network`` maps
    inputs to logits. The two kinds below also give a network's logits of the validation split
    (``validate(net)``, on the CPU)."""

    network: Callable[[torch.Tensor], torch.Tensor]

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class ImageBatches:
    """Cached uint8 images, augmented on the training device, through the whole model.

    With feature_extract the backbone's parameters need no gradient and it runs in eval mode, so autograd
    records only the head: the frozen body costs one forward pass per batch.
    """

    def __init__(self, trainer: Trainer, data, prep: Preprocessing, num_classes: int):
        (self.images, self.labels), (self.val_images, _) = data
        self.cfg, self.prep, self.world = trainer.cfg, prep, trainer.world
        self.channels_last = trainer.runtime.channels_last
        self.augment = BatchAugmenter(self.cfg, prep, num_classes, self.images.shape[1], self.channels_last)
        network = self.world.wrap(trainer.model)
        self.network = torch.compile(network) if self.cfg.compile else network

    def fetch(self, indices):
        index = indices.numpy()
        device = self.world.device
        images = torch.from_numpy(self.images[index]).to(device, non_blocking=True).permute(0, 3, 1, 2)
        labels = torch.from_numpy(self.labels[index]).to(device, non_blocking=True)
        inputs, targets = self.augment(images, labels)
        return inputs, targets, labels

    def validate(self, net):
        return self.logits(net, self.val_images, "val")

    def sample_logits(self, net, indices: np.ndarray):
        """``net``'s logits of the training images at ``indices``, centre-cropped as validation is."""
        return self.logits(net, self.images[indices], "check")

    def logits(self, net, images: np.ndarray, description: str):
        self.world.share_buffers(net)
        size, batch_size = self.cfg.eval_image_size, self.cfg.batch_size * 2
        return self.world.map_rows(
            lambda rows: predict_logits(
                net, rows, self.prep, size, batch_size, self.channels_last, description, fast=False
            ),
            images,
        )


class FeatureBatches:
    """feature_extract without augmentation: only the head trains, on the features stage's output."""

    def __init__(self, trainer: Trainer, features: tuple[torch.Tensor, torch.Tensor], labels: np.ndarray):
        device = trainer.device
        self.features, self.val_features = (f.to(device) for f in features)
        self.labels = torch.from_numpy(labels).to(device)
        self.head_name = trainer.head_name
        self.network = trainer.world.wrap(trainer.head)

    def fetch(self, indices):
        indices = indices.to(self.labels.device)
        return self.features[indices], self.labels[indices], self.labels[indices]

    def validate(self, net):
        return self.head_logits(net, self.val_features)

    def sample_logits(self, net, indices: np.ndarray):
        return self.head_logits(net, self.features[torch.from_numpy(indices).to(self.features.device)])

    def head_logits(self, net, features: torch.Tensor):
        with torch.no_grad():
            return net.get_submodule(self.head_name)(features).float().cpu()


def training_batches(
    trainer: Trainer, data, prep: Preprocessing, arch: str, weights: str, num_classes: int
) -> ImageBatches | FeatureBatches:
    """The run's batches: the frozen features for feature_extract without augmentation, else the images."""
    cfg = trainer.cfg
    if cfg.mode == "feature_extract" and not cfg.augment:
        head = linear_head(trainer.model, trainer.head_name)
        (_, train_labels), (_, val_labels) = data
        features = frozen_features(cfg, arch, weights, (len(train_labels), len(val_labels)))
        if features[0].shape[1] != head.in_features:
            raise ModelError(
                f"the frozen features have {features[0].shape[1]} dimensions, the head reads "
                f"{head.in_features} (features.layers changed?): re-run the features stage"
            )
        return FeatureBatches(trainer, features, train_labels)
    return ImageBatches(trainer, data, prep, num_classes)


def frozen_features(
    cfg: TrainConfig, arch: str, weights: str, counts: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features stage's (train, validation) features of the centre crops, as this run splits them."""
    info = features_info()
    if (info["arch"], info["weights"], info["image_size"]) != (arch, weights, cfg.image_size):
        raise ModelError(
            f"the frozen features are of {info['arch']} (weights {info['weights']}) at "
            f"{info['image_size']} px, not of this run's model at {cfg.image_size} px: "
            "re-run the features stage (dvc repro features)"
        )
    train = torch.from_numpy(np.array(load_features("train")[0]))
    val = torch.from_numpy(np.array(load_features("val")[0]))
    val = val.reshape(len(val), train.shape[1])  # an empty split's features are stored as 0 x 0
    if cfg.train_on_val:
        train, val = torch.cat([train, val]), val[:0]
    if (len(train), len(val)) != counts:
        raise ModelError(
            "the frozen features do not cover the prepared images: "
            "re-run the features stage (dvc repro features)"
        )
    return train, val


def start_from_probe(
    model: nn.Module, arch: str, weights: str, classes: list[str], layers: list[str], path: Path
) -> None:
    """Load the fitted probe (its backbone weights and its head) into ``model``: LP-FT's starting point."""
    if not path.is_file():
        raise ModelError(
            f"train.init_head: probe needs the linear probe at {path}: "
            "run its stage first (dvc repro train_probe)"
        )
    checkpoint = read_checkpoint(path)
    made_for = (checkpoint["arch"], checkpoint.get("weights"), checkpoint["classes"])
    if made_for != (arch, weights, classes):
        raise ModelError(
            f"the linear probe at {path} is for {made_for[0]} "
            f"(weights {made_for[1]}, {len(made_for[2])} classes), "
            f"not {arch} (weights {weights}, {len(classes)} classes): re-run train_probe"
        )
    if checkpoint.get("layers", []) != layers:
        raise ModelError(
            f"the linear probe at {path} reads the layers {checkpoint.get('layers', [])} besides the head's "
            f"features, not features.layers {layers}: re-run the features and train_probe stages"
        )
    model.load_state_dict(checkpoint["model"])


def initial_model(
    arch: str, weights: str, classes: list[str], cfg: TrainConfig, layers: list[str], probe: str = "probe"
) -> tuple[nn.Module, str, Preprocessing]:
    """The model before its first step: a fresh head, or with ``init_head: probe`` the fitted linear probe
    ``probe`` (LP-FT). A fine-tuned model's head reads ``layers`` (``features.layers``) too; a scratch
    model is the plain architecture."""
    layers = [] if cfg.mode == "scratch" else layers
    torch.manual_seed(cfg.seed)
    model, head_name, prep = build_model(arch, weights, len(classes), layers)
    if cfg.init_head == "probe":
        start_from_probe(model, arch, weights, classes, layers, checkpoint_path(probe))
    return model, head_name, prep


def training_data(train_on_val: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train images, labels), (validation images, labels); with ``train_on_val`` the validation images
    train too."""
    (train_images, train_labels), (val_images, val_labels) = load_split("train"), load_split("val")
    if not train_on_val:
        return (train_images, train_labels), (val_images, val_labels)
    merged = (np.concatenate([train_images, val_images]), np.concatenate([train_labels, val_labels]))
    return merged, (val_images[:0], val_labels[:0])


def sample_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first ``per_class`` indices of each class, in order: a fixed sample every run scores alike."""
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)]))


def chance_bar(classes: int) -> float:
    """The accuracy under which a model is at chance: a uniform guess's, plus half of it, or a tenth of the
    way to perfect where that is less (two classes: 55 %, three: 40 %, 101: 1.5 %)."""
    chance = 1 / classes
    return chance + min(chance / 2, (1 - chance) / 10)


def at_chance(correct: int, total: int, classes: int) -> bool:
    """Under :func:`chance_bar` on at least :data:`MIN_CHECKED` images (fewer cannot tell chance from
    learning: the tests' tiny runs)."""
    return total >= MIN_CHECKED and correct / total < chance_bar(classes)


@dataclass
class LearningCheck:
    """Whether a run learned. Accuracy logged during an epoch is that of the weights before each step's
    update (after one step at a huge learning rate it still looks fine), so the model is scored as it is
    saved, on a fixed sample of training images (:data:`CHECK_PER_CLASS` per class, centre crops), and
    compared with the same score before training. The run fails (:class:`UnlearnedError`, no ``model.pt``)
    when the saved weights or their outputs are not finite; or when it ends at chance (:func:`at_chance`) on
    those images, or for a holdout twin on validation, after starting above
    chance (it unlearned: LP-FT at too high a rate) or after :data:`LEARNING_EPOCHS` epochs or more from
    chance. A shorter run from chance that ends there gets a warning: it may not have had the time to
    learn."""

    trainer: Trainer
    batches: ImageBatches | FeatureBatches
    indices: np.ndarray
    labels: np.ndarray
    classes: int
    started_above: bool = False

    @classmethod
    def begin(cls, trainer: Trainer, batches, train_labels: np.ndarray, classes: int) -> LearningCheck:
        indices = sample_per_class(train_labels, CHECK_PER_CLASS)
        check = cls(trainer, batches, indices, train_labels[indices], classes)
        correct = check.correct()
        check.started_above = correct is not None and correct / len(indices) >= chance_bar(classes)
        return check

    def correct(self) -> int | None:
        """How many of the sample the trainer's kept network gets right (None: outputs not finite)."""
        logits = self.batches.sample_logits(self.trainer.kept, self.indices)
        if not torch.isfinite(logits).all():
            return None
        return int((logits.argmax(1).numpy() == self.labels).sum())

    def judge(
        self,
        out: str,
        kept: dict,
        val_acc: float | None,
        val_count: int,
        progress: resume.Progress,
        lr_key: str,
    ) -> bool:
        """Whether the model ``kept`` (a state dict) ended at chance; raises when that is a failure."""
        finite = all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())
        self.trainer.kept.load_state_dict(kept)
        correct = self.correct() if finite else None
        total = len(self.indices)
        if correct is None:
            return self.fail(out, "its weights or outputs are not finite", lr_key)
        on_train = at_chance(correct, total, self.classes)
        on_val = val_acc is not None and at_chance(round(val_acc * val_count), val_count, self.classes)
        if not (on_train or on_val):
            return False
        where = "its training images" if on_train else "the validation images"
        accuracy = 100 * (correct / total if on_train else val_acc)
        reason = f"it ended at chance on {where} ({accuracy:.1f} % as saved"
        if self.started_above:
            return self.fail(out, f"{reason}, after starting above it: it unlearned)", lr_key)
        if progress.epoch >= LEARNING_EPOCHS:
            return self.fail(out, f"{reason}, after {progress.epoch} epochs)", lr_key)
        log.warning(
            "%s %s after %d epoch(s): too short to tell whether it can learn; if it had the epochs, the "
            "learning rate is likely too high (%s; `transferlab lr-find` shows where the loss climbs)",
            out,
            reason + ")",
            progress.epoch,
            lr_key,
        )
        return True

    def fail(self, out: str, reason: str, lr_key: str) -> bool:
        """Raise, unless the user asked to keep such a model (then it is recorded as at chance)."""
        if os.environ.get(KEEP_UNLEARNED_ENV) == "1":
            log.warning(
                "%s did not learn: %s; kept anyway (%s=1), recorded as at chance",
                out,
                reason,
                KEEP_UNLEARNED_ENV,
            )
            return True
        raise UnlearnedError(
            f"{out} did not learn: {reason}. Likely: the learning rate is too high ({lr_key}; `transferlab "
            f"lr-find` shows where the loss climbs). No model was written; to keep it anyway, run with "
            f"{KEEP_UNLEARNED_ENV}=1 (it is then recorded as at chance, and predict and evaluate say so)"
        )


def divergence(
    run: str, out: str, cfg: TrainConfig, progress: resume.Progress, params: Params
) -> DivergedError:
    """What to tell the user when the training loss stops being finite: the likely causes and the params to
    change."""
    precision = params.runtime.precision
    body = f", the pretrained layers at {cfg.lr * cfg.backbone_lr_scale:g}" if cfg.mode == "finetune" else ""
    causes = f"the learning rate is too high ({params.key(run, 'lr')}: {cfg.lr:g}{body})"
    if precision != "fp32":
        causes += f", or {precision} arithmetic overflowed (runtime.precision: fp32 avoids it)"
    state = resume_path(out)
    kept = (
        f"the resumable state saved before it is kept ({state}), for a re-run with the same params"
        if state.is_file()
        else "no training state was saved before it"
    )
    loss = float(progress.loss_sum) / max(progress.seen, 1)
    return DivergedError(
        f"{out} diverged: the training loss became {loss} in epoch {progress.epoch + 1}, by step "
        f"{progress.step}. Likely: {causes}. Lower {params.key(run, 'lr')} "
        f"(`transferlab lr-find {run}` shows where the loss climbs) and run again. "
        f"No model was written; {kept}"
    )
