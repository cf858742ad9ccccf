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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from . import cores, resume
from .checkpoint import read_checkpoint, write_model
from .config import RuntimeConfig, TrainConfig, load_params
from .device import autocast, autocast_dtype, training_device
from .distributed import World, process_group
from .errors import ConfigError, DivergedError, ModelError, UnlearnedError
from .inference import predict_logits
from .inputs import BatchAugmenter, Preprocessing, batch_slices, epoch_order
from .model_card import EvalInput, ModelCard
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
from .run import Run
from .splits import features_info, load_classes, load_features, load_split
from .subsets import Subset
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


def fit(model: str, world: World | None = None, holdout: bool = False, subset: Subset | None = None) -> dict:
    """Train ``model`` (finetune or scratch); return the kept epoch and its validation accuracy (None
    without validation).

    ``world``: this process's place in a data-parallel run (default: the only process, on ``runtime.device``).
    ``holdout``: train the model's holdout twin (see :func:`paths.holdout`), which writes under its own name;
    ``subset``: its point of the data-efficiency curve (see :meth:`Run.on_subset`), likewise.
    """
    started = time.perf_counter()
    run = Run.of(load_params(), model, holdout, subset)
    # the thread count it comes to is part of the run: logged with its params, in its resume fingerprint
    run = run.with_runtime(threads=cores.use(run.runtime.threads, world.size if world else 1))
    setup = assemble(run, world)
    trainer = setup.trainer
    start = cpu_copy(trainer.model) if run.cfg.mode != "scratch" else None  # one end of WiSE-FT's line
    check = LearningCheck.begin(trainer, setup.batches, setup.labels, len(setup.classes))
    loop = EpochLoop.begin(setup)

    training_log = TrainingLog(train_dir(run.name), run.tensorboard, active=trainer.world.main)
    with training_log as live, resume.stop_requests() as stop_requested:
        live.log_params(run.described())
        live.log_images("train images (cached, before augmentation)", setup.images[:16])
        # the curves of the epochs done before an interruption, at their own steps
        for logged in loop.progress.history:
            live.log_epoch(logged)
        while loop.progress.epoch < run.cfg.epochs and not loop.best.stopped_early:
            loop.train_epoch(live, stop_requested)
        chosen = loop.chosen()
        if start is not None:
            chosen = loop.interpolate_from(start, live, chosen)

        at_chance = check.judge(loop.kept, chosen["val_acc"], len(setup.val_labels), loop.progress.epoch)
        if not trainer.world.main:
            return chosen
        save_model(setup, loop.kept, chosen, at_chance)
        if chosen["val_acc"] is not None:
            live.summary["best/val_acc"] = chosen["val_acc"]
        live.summary["best/epoch"] = chosen["epoch"]
        live.summary["epochs_run"] = loop.progress.epoch
        live.summary["threads"] = run.runtime.threads
        live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    resume_path(run.name).unlink(missing_ok=True)
    return chosen


def train(model: str, holdout: bool = False) -> dict:
    """Train in this process, as one of the data-parallel processes torchrun started or as the only one."""
    run = Run.of(load_params(), model, holdout)
    device, _ = training_device(run.runtime.device, run.runtime.precision)
    with process_group(device, run.runtime.processes, run.cfg.batch_size, run.key("batch_size")) as world:
        return fit(model, world, holdout)


@dataclass
class Assembly:
    """A run made ready to train: its classes and data, its trainer, and where its batches come from."""

    classes: list[str]
    images: np.ndarray  # the training images (cached, uint8; with train_on_val, train + val)
    labels: np.ndarray  # their labels
    val_labels: np.ndarray  # the validation split's (none with train_on_val)
    slices: list[slice]  # the steps of an epoch, as slices of its order
    trainer: Trainer
    batches: ImageBatches | FeatureBatches


def assemble(run: Run, world: World | None = None, sweep: Sequence[float] | None = None) -> Assembly:
    """The run's data, model, trainer and batches: what the training stages, the learning-rate range test
    (``sweep``: its learning rates, one per step, in place of the recipe's schedule) and the benchmark train.

    ``world``: this process's place in a data-parallel run (default: the only process, on ``runtime.device``).
    """
    world = world or single_process(run.runtime)
    classes = load_classes()
    data = training_data(run)
    (images, labels), (_, val_labels) = data
    if len(labels) < world.size:
        raise ConfigError(
            f"runtime.processes: {world.size} processes but {len(labels)} training images; "
            "every process needs a share"
        )
    slices = batch_slices(len(labels), run.cfg.batch_size)
    trainer = Trainer.create(run, classes, len(slices), world, sweep)
    batches = training_batches(trainer, data, len(classes))  # missing features fail here
    return Assembly(classes, images, labels, val_labels, slices, trainer, batches)


def single_process(runtime: RuntimeConfig) -> World:
    """The world of a run in this process only, on ``runtime.device`` (an unavailable one fails here)."""
    device, _ = training_device(runtime.device, runtime.precision)
    return World(device=device)


def logged_metric(logged: dict, metric: str) -> float | None:
    """A validation metric as the params name it (``val_acc``, ``val_loss``: ``train.monitor``) among an
    epoch's logged metrics, where it is ``val/acc``, ``val/loss``; None without validation."""
    return logged.get(metric.replace("_", "/"))


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
        value = logged_metric(logged, monitor)
        score = None if value is None else value if monitor == "val_acc" else -value
        if score is None or self.score is None or score > self.score:
            self.score, self.epoch, self.epochs_since = score, epoch, 0
            return True
        self.epochs_since += 1
        self.stopped_early = 0 < patience <= self.epochs_since
        return False


@dataclass
class EpochLoop:
    """A run's epochs and what carries over between them, saved after each one and on a stop, so that an
    interrupted run resumes exactly (see ``resume.py``)."""

    setup: Assembly
    header: dict  # the run's fingerprint and params, saved with each state
    generator: torch.Generator  # the epochs' orders: the same on every process (one order, sharded)
    progress: resume.Progress = field(default_factory=resume.Progress)
    best: BestEpoch = field(default_factory=BestEpoch)
    kept: dict | None = None  # the weights to keep so far (a state dict on the CPU)

    @classmethod
    def begin(cls, setup: Assembly) -> EpochLoop:
        """The loop from the first epoch, or where an interrupted run with the same fingerprint stopped."""
        trainer, world = setup.trainer, setup.trainer.world
        run = trainer.run
        generator = torch.Generator().manual_seed(run.cfg.seed)
        fingerprint = resume.fingerprint(run, world, starting_files(run, setup.batches))
        loop = cls(setup, {"fingerprint": fingerprint, "params": run.described()}, generator)
        state = world.from_main(resume.load_state(resume_path(run.name), fingerprint) if world.main else None)
        if state is not None:
            trainer.load_state_dict(state["trainer"])
            generator.set_state(state["generator"])
            resume.restore_rng(state["rng"][world.rank])
            loop.progress, loop.best = resume.Progress(**state["progress"]), BestEpoch(**state["best"])
            loop.kept = state["kept"]
            log.info("resuming %s from %s (%s)", run.name, loop.where(), resume_path(run.name))
        return loop

    def where(self) -> str:
        return f"epoch {self.progress.epoch + 1}, step {self.progress.step}"

    def train_epoch(self, live: TrainingLog, stop_requested: Callable[[], bool]) -> None:
        """Train the current epoch (from where a stopped run stopped), validate, log and save the state; on
        a stop request (Ctrl-C), save the state mid-epoch and exit."""
        trainer, batches, val_labels = self.setup.trainer, self.setup.batches, self.setup.val_labels
        run, progress = trainer.run, self.progress
        epoch_start = self.generator.get_state()
        order = epoch_order(self.setup.labels, self.generator, run.cfg.balanced_sampling)
        try:
            finished = self.steps(order, stop_requested)
        except NonFiniteLoss:
            raise divergence(run, progress) from None
        if not finished:
            self.save(epoch_start)
            raise SystemExit(f"stopped: {run.name} saved at {self.where()}; run again to resume")
        logged = progress.train_metrics()
        if len(val_labels):
            logged.update(validate(trainer.kept, batches, val_labels))
        progress.end_epoch(logged)
        if self.best.update(logged, run.cfg.monitor, progress.epoch, run.cfg.early_stopping_patience):
            self.kept = cpu_copy(trainer.kept)
        trainer.schedule.end_epoch(logged_metric(logged, run.cfg.monitor))
        shown = ", ".join(f"{key} {value:.4g}" for key, value in logged.items())
        log.info("%s epoch %d: %s", run.name, progress.epoch, shown)
        live.log_epoch(logged)
        self.save(self.generator.get_state())

    def steps(self, order: torch.Tensor, stop_requested: Callable[[], bool]) -> bool:
        """Train on the epoch's batches from ``progress.step`` on (``order[s]`` for each slice ``s``); False
        when a stop was requested (Ctrl-C) and the state is to be saved. Raises :class:`NonFiniteLoss`."""
        trainer, slices, progress = self.setup.trainer, self.setup.slices, self.progress
        if progress.step == 0:
            progress.start_epoch(
                {f"lr/{group['name']}": group["lr"] for group in trainer.optimizer.param_groups}
            )
        trainer.enter_train_mode()
        world, run = trainer.world, trainer.run
        description = f"{run.name} epoch {progress.epoch + 1}/{run.cfg.epochs}"
        with tqdm(
            total=len(slices), initial=progress.step, desc=description, leave=False, disable=not world.main
        ) as bar:
            for batch in slices[progress.step :]:
                progress.add_batch(*trainer.step(self.setup.batches, order[batch]))
                bar.update()
                if progress.step % 10 == 0 or progress.step == len(slices):  # reading the sum waits for a GPU
                    loss = float(progress.loss_sum) / progress.seen
                    if not math.isfinite(loss):  # NaN and inf stay in the epoch's sum once there
                        raise NonFiniteLoss
                    bar.set_postfix(loss=f"{loss:.3f}")
                if world.stop_now(stop_requested(), progress.step, len(slices)):
                    return False
        return True

    def save(self, generator_state: torch.Tensor) -> None:
        """Save what a resumed run needs: ``generator_state`` draws the current epoch's order again, and
        every process's random state is gathered (an exact resume)."""
        trainer = self.setup.trainer
        rng = trainer.world.gather(resume.rng_state(trainer.device))
        if trainer.world.main:
            state = {
                "trainer": trainer.state_dict(),
                "progress": dataclasses.asdict(self.progress),
                "best": dataclasses.asdict(self.best),
                "kept": self.kept,
                "rng": rng,
                "generator": generator_state,
                **self.header,
            }
            resume.save_state(resume_path(trainer.run.name), state)

    def chosen(self) -> dict:
        """The kept epoch and its validation accuracy (None without validation)."""
        scores = self.progress.history[self.best.epoch - 1]
        return {"val_acc": logged_metric(scores, "val_acc"), "epoch": self.best.epoch}

    def interpolate_from(self, start: dict, live: TrainingLog, chosen: dict) -> dict:
        """WiSE-FT: the line from the starting weights ``start`` to the last epoch's (a final fit's), its
        validation curve written next to the run's; with ``interpolation`` < 1 their mix replaces the
        ``chosen`` epoch as the weights kept."""
        mix = self.setup.trainer.cfg.interpolation
        end, curve = cpu_copy(self.setup.trainer.kept), []
        if len(self.setup.val_labels):
            curve = interpolation_curve(self.setup, start, end, self.progress.history[-1])
            live.write_csv("interpolation.csv", ["interpolation", "val_acc", "val_loss"], curve)
        if mix < 1:  # the mix replaces the best-epoch choice
            self.kept = interpolate(start, end, mix)
            val_acc = next((acc for weight, acc, _ in curve if weight == mix), None)
            return {"val_acc": val_acc, "epoch": self.progress.epoch}
        return chosen


def starting_files(run: Run, batches: Batches) -> list[Path]:
    """The files the run starts from besides the prepared data: the probe (LP-FT), the frozen features."""
    files = [checkpoint_path(run.probe)] if run.cfg.init_head == "probe" else []
    if isinstance(batches, FeatureBatches):
        files.append(FEATURES_DIR / "features.json")
    return files


def save_model(setup: Assembly, kept: dict, chosen: dict, at_chance: bool) -> None:
    """``data/models/<run>/model.pt``: the ``kept`` weights and the ``chosen`` epoch, with the model card."""
    trainer = setup.trainer
    run = trainer.run
    card = ModelCard(
        run=run.name,
        mode=run.cfg.mode,
        arch=run.arch,
        weights=run.weights,
        classes=setup.classes,
        head=trainer.head_name,
        preprocessing=trainer.prep,
        cache_size=setup.images.shape[1],
        eval_image_size=run.cfg.eval_image_size,
        channels_last=run.runtime.channels_last,
        config=dataclasses.asdict(run.cfg),
        extra={"layers": read_layers(trainer.model), "at_chance": at_chance, **chosen},
    )
    write_model(checkpoint_path(run.name), card, kept)


def validate(net: nn.Module, batches: ImageBatches | FeatureBatches, labels: np.ndarray) -> dict:
    """``net``'s validation loss and accuracy."""
    logits = batches.validate(net)
    return {
        "val/loss": nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item(),
        "val/acc": (logits.argmax(1).numpy() == labels).mean().item(),
    }


def interpolation_curve(
    setup: Assembly, start: dict, end: dict, end_scores: dict
) -> list[tuple[float, float, float]]:
    """(mixing weight, validation accuracy, loss) of the weights ``start + weight * (end - start)`` (WiSE-FT),
    at :data:`CURVE_POINTS` and the run's ``interpolation``: which mix of start and end validates best.
    ``end_scores``: the validation metrics of ``end`` (weight 1), measured during training."""
    trainer, rows = setup.trainer, []
    for weight in sorted({*CURVE_POINTS, trainer.cfg.interpolation}):
        if weight == 1:
            scores = end_scores
        else:
            trainer.kept.load_state_dict(interpolate(start, end, weight))
            scores = validate(trainer.kept, setup.batches, setup.val_labels)
        rows.append((weight, scores["val/acc"], scores["val/loss"]))
        log.info("interpolation %.2f: validation accuracy %.4f", weight, scores["val/acc"])
    return rows


@dataclass
class Trainer:
    """A run's model made ready for its training mode, with its optimizer, schedule and loss: what a step
    needs."""

    run: Run
    model: nn.Module
    head_name: str
    prep: Preprocessing
    frozen: list[str]  # modules of the frozen backbone layers
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    world: World
    amp_dtype: torch.dtype | None
    average: AveragedModel | None  # the moving average of the weights (ema_decay), updated every step

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

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
        run: Run,
        classes: list[str],
        steps_per_epoch: int,
        world: World,
        sweep: Sequence[float] | None = None,
    ) -> Trainer:
        """The run's model before its first step (:func:`initial_model`), on ``world``'s device, and how it
        trains; ``sweep``: see :func:`assemble`."""
        cfg = run.cfg
        model, head_name, prep = initial_model(run.arch, run.weights, classes, cfg, run.layers, run.probe)
        if (
            world.rank
        ):  # every process starts from the same weights (DDP checks) but draws its own augmentations
            torch.manual_seed(cfg.seed + world.rank)
        frozen = freeze_layers(model, head_name, cfg.frozen_layers)
        if cfg.mode == "feature_extract":
            model.requires_grad_(False)
            model.get_submodule(head_name).requires_grad_(True)
        channels_last = run.runtime.channels_last
        model.to(world.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        average = moving_average(model, cfg.ema_decay) if cfg.ema_decay else None
        if average is not None:
            average.update_parameters(model)  # the average starts at the starting weights
        scale = None if cfg.mode == "scratch" else cfg.backbone_lr_scale
        groups = parameter_groups(model, head_name, cfg.lr, scale, cfg.weight_decay, cfg.decay_norm_and_bias)
        optimizer = build_optimizer(groups, cfg)
        amp_dtype = autocast_dtype(run.runtime.precision, world.device)
        return cls(
            run,
            model,
            head_name,
            prep,
            frozen,
            optimizer,
            LrSchedule(optimizer, cfg, steps_per_epoch, sweep),
            torch.amp.GradScaler(world.device.type, enabled=amp_dtype == torch.float16),
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

    def __init__(self, trainer: Trainer, data, num_classes: int):
        (self.images, self.labels), (self.val_images, _) = data
        self.cfg, self.prep, self.world = trainer.cfg, trainer.prep, trainer.world
        self.channels_last = trainer.run.runtime.channels_last
        self.augment = BatchAugmenter(
            self.cfg, self.prep, num_classes, self.images.shape[1], self.channels_last
        )
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
                net, rows, EvalInput(self.prep, size, self.channels_last), batch_size, description, fast=False
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


def training_batches(trainer: Trainer, data, num_classes: int) -> ImageBatches | FeatureBatches:
    """The run's batches: the frozen features for feature_extract without augmentation, else the images."""
    cfg = trainer.cfg
    if cfg.mode == "feature_extract" and not cfg.augment:
        head = linear_head(trainer.model, trainer.head_name)
        (_, train_labels), (_, val_labels) = data
        features = frozen_features(trainer.run, (len(train_labels), len(val_labels)))
        if features[0].shape[1] != head.in_features:
            raise ModelError(
                f"the frozen features have {features[0].shape[1]} dimensions, the head reads "
                f"{head.in_features} (features.layers changed?): re-run the features stage"
            )
        return FeatureBatches(trainer, features, train_labels)
    return ImageBatches(trainer, data, num_classes)


def frozen_features(run: Run, counts: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The features stage's (train, validation) features of the centre crops, as this run splits them."""
    cfg = run.cfg
    info = features_info()
    if (info["arch"], info["weights"], info["image_size"]) != (run.arch, run.weights, cfg.image_size):
        raise ModelError(
            f"the frozen features are of {info['arch']} (weights {info['weights']}) at "
            f"{info['image_size']} px, not of this run's model at {cfg.image_size} px: "
            "re-run the features stage (dvc repro features)"
        )
    train = torch.from_numpy(np.array(load_features("train")[0]))
    val = torch.from_numpy(np.array(load_features("val")[0]))
    val = val.reshape(len(val), train.shape[1])  # an empty split's features are stored as 0 x 0
    if run.subset is not None:
        train, val = train[run.subset.rows(load_split("train")[1])], val[:0]
    elif cfg.train_on_val:
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


def training_data(run: Run) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train images, labels), (validation images, labels) of the run: with ``train_on_val`` the validation
    images train too; a point of the data-efficiency curve trains on its subset of the train split and has no
    validation."""
    (train_images, train_labels), (val_images, val_labels) = load_split("train"), load_split("val")
    if run.subset is not None:
        rows = run.subset.rows(train_labels)
        return (train_images[rows], train_labels[rows]), (val_images[:0], val_labels[:0])
    if not run.cfg.train_on_val:
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

    def judge(self, kept: dict, val_acc: float | None, val_count: int, epochs: int) -> bool:
        """Whether the model ``kept`` (a state dict), trained ``epochs`` epochs, ended at chance; raises when
        that is a failure."""
        finite = all(torch.isfinite(v).all() for v in kept.values() if v.is_floating_point())
        self.trainer.kept.load_state_dict(kept)
        correct = self.correct() if finite else None
        total = len(self.indices)
        if correct is None:
            return self.fail("its weights or outputs are not finite")
        on_train = at_chance(correct, total, self.classes)
        on_val = val_acc is not None and at_chance(round(val_acc * val_count), val_count, self.classes)
        if not (on_train or on_val):
            return False
        where = "its training images" if on_train else "the validation images"
        accuracy = 100 * (correct / total if on_train else val_acc)
        reason = f"it ended at chance on {where} ({accuracy:.1f} % as saved"
        if self.started_above:
            return self.fail(f"{reason}, after starting above it: it unlearned)")
        if epochs >= LEARNING_EPOCHS:
            return self.fail(f"{reason}, after {epochs} epochs)")
        log.warning(
            "%s %s after %d epoch(s): too short to tell whether it can learn; if it had the epochs, the "
            "learning rate is likely too high (%s; `transferlab lr-find` shows where the loss climbs)",
            self.trainer.run.name,
            reason + ")",
            epochs,
            self.trainer.run.key("lr"),
        )
        return True

    def fail(self, reason: str) -> bool:
        """Raise, unless the user asked to keep such a model (then it is recorded as at chance)."""
        run = self.trainer.run
        if os.environ.get(KEEP_UNLEARNED_ENV) == "1":
            log.warning(
                "%s did not learn: %s; kept anyway (%s=1), recorded as at chance",
                run.name,
                reason,
                KEEP_UNLEARNED_ENV,
            )
            return True
        raise UnlearnedError(
            f"{run.name} did not learn: {reason}. Likely: the learning rate is too high ({run.key('lr')}; "
            "`transferlab lr-find` shows where the loss climbs). No model was written; to keep it anyway, "
            f"run with {KEEP_UNLEARNED_ENV}=1 (it is then recorded as at chance, and predict and evaluate "
            "say so)"
        )


def divergence(run: Run, progress: resume.Progress) -> DivergedError:
    """What to tell the user when the training loss stops being finite: the likely causes and the params to
    change."""
    cfg, precision, lr_key = run.cfg, run.runtime.precision, run.key("lr")
    body = f", the pretrained layers at {cfg.lr * cfg.backbone_lr_scale:g}" if cfg.mode == "finetune" else ""
    causes = f"the learning rate is too high ({lr_key}: {cfg.lr:g}{body})"
    if precision != "fp32":
        causes += f", or {precision} arithmetic overflowed (runtime.precision: fp32 avoids it)"
    state = resume_path(run.name)
    kept = (
        f"the resumable state saved before it is kept ({state}), for a re-run with the same params"
        if state.is_file()
        else "no training state was saved before it"
    )
    loss = float(progress.loss_sum) / max(progress.seen, 1)
    return DivergedError(
        f"{run.name} diverged: the training loss became {loss} in epoch {progress.epoch + 1}, by step "
        f"{progress.step}. Likely: {causes}. Lower {lr_key} "
        f"(`transferlab lr-find {run.model}` shows where the loss climbs) and run again. "
        f"No model was written; {kept}"
    )
