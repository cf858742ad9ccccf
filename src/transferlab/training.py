"""The training loop of stages ``train_finetune`` and ``train_scratch`` (entry point: ``train.py``); the mode is data.

Modes (``train.mode``): ``finetune`` trains every layer, the pretrained ones at ``lr * backbone_lr_scale``,
except the first ``frozen_stages`` backbone stages (partial unfreezing); ``feature_extract`` trains only the
new head on the frozen backbone (without augmentation, on the features stage's output); ``scratch`` starts
from random weights. ``train.init_head: probe`` starts from the linear probe (LP-FT). Per epoch, dvclive
logs train (and val) loss and accuracy and each parameter group's learning rate to ``metrics/train_<run>/``;
``data/models/<run>/model.pt`` keeps, with everything needed to use it, the best epoch on the validation
split (``monitor``), or the last one with ``train_on_val``: its weights, or their moving average with
``ema_decay``. With ``interpolation`` < 1 it keeps instead a mix of the starting weights and the last epoch's
(WiSE-FT); a fine-tuning run with validation writes the validation accuracy along that line (``interpolation.csv``). An interrupted run (killed, Ctrl-C) resumes
where it stopped when started again (see ``resume.py``). With ``runtime.processes: N`` the same command
trains in N data-parallel processes (see ``distributed.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from . import cores, paths, resume
from .checkpoint import read_checkpoint, save_checkpoint
from .config import Params, RuntimeConfig, TrainConfig, load_params
from .data import BatchAugmenter, batch_slices, epoch_order
from .device import autocast, training_device
from .distributed import World, process_group
from .errors import ConfigError, DivergedError, ModelError
from .inference import predict_logits
from .models import Preprocessing, build_model, freeze_stages, linear_head, parameter_groups, set_train_mode
from .optim import LrSchedule, build_optimizer
from .paths import FEATURES_DIR, checkpoint_path, resume_path, train_dir
from .splits import features_info, load_classes, load_features, load_split
from .tracking import TrainingLog
from .weight_space import CURVE_POINTS, cpu_copy, interpolate, moving_average

log = logging.getLogger("transferlab.train")


@dataclass
class Inputs:
    """Where training batches come from and how they become logits: one of the two kinds below."""

    fetch: Callable[
        [torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ]  # indices -> inputs, targets, labels
    forward: Callable[[torch.Tensor], torch.Tensor]
    validate: Callable[[nn.Module], torch.Tensor]  # a model's logits of the validation split, on the CPU


def image_inputs(
    model, data, cfg: TrainConfig, channels_last: bool, prep, world: World, num_classes: int
) -> Inputs:
    """Cached uint8 images, augmented on the training device, through the model.

    With feature_extract the backbone's parameters need no gradient and it runs in eval mode, so autograd
    records only the head: the frozen body costs one forward pass per batch.
    """
    device = world.device
    (train_images, train_labels), (val_images, _) = data
    augment = BatchAugmenter(cfg, prep, num_classes, train_images.shape[1], channels_last)

    def fetch(indices):
        index = indices.numpy()
        images = torch.from_numpy(train_images[index]).to(device, non_blocking=True).permute(0, 3, 1, 2)
        labels = torch.from_numpy(train_labels[index]).to(device, non_blocking=True)
        inputs, targets = augment(images, labels)
        return inputs, targets, labels

    def validate(net: nn.Module):
        world.share_buffers(net)
        return world.map_rows(
            lambda rows: predict_logits(
                net, rows, prep, cfg.eval_image_size, cfg.batch_size * 2, channels_last, "val", fast=False
            ),
            val_images,
        )

    forward = world.wrap(model)
    return Inputs(fetch, torch.compile(forward) if cfg.compile else forward, validate)


def frozen_features(
    cfg: TrainConfig, arch: str, weights: str, counts: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features stage's (train, validation) features of the centre crops, as this run splits them."""
    info = features_info()
    if (info["arch"], info["weights"], info["image_size"]) != (arch, weights, cfg.image_size):
        raise ModelError(
            f"the frozen features are of {info['arch']} (weights {info['weights']}) at {info['image_size']} px, not of this "
            f"run's model at {cfg.image_size} px: re-run the features stage (dvc repro features)"
        )
    train, val = (
        torch.from_numpy(np.array(load_features("train")[0])),
        torch.from_numpy(np.array(load_features("val")[0])),
    )
    val = val.reshape(len(val), train.shape[1])  # an empty split's features are stored as 0 x 0
    if cfg.train_on_val:
        train, val = torch.cat([train, val]), val[:0]
    if (len(train), len(val)) != counts:
        raise ModelError(
            "the frozen features do not cover the prepared images: re-run the features stage (dvc repro features)"
        )
    return train, val


def feature_inputs(
    features: tuple[torch.Tensor, torch.Tensor],
    train_labels: np.ndarray,
    head_name: str,
    model: nn.Module,
    world: World,
) -> Inputs:
    """feature_extract without augmentation: the head trains on the frozen features."""
    device = world.device
    train_features, val_features = (f.to(device) for f in features)
    labels = torch.from_numpy(train_labels).to(device)

    def fetch(indices):
        indices = indices.to(device)
        return train_features[indices], labels[indices], labels[indices]

    def validate(net: nn.Module):
        with torch.no_grad():
            return net.get_submodule(head_name)(val_features).float().cpu()

    return Inputs(fetch, world.wrap(model.get_submodule(head_name)), validate)


@dataclass
class Trainer:
    """A model made ready for one training mode, with its optimizer, schedule and loss: what one step needs."""

    cfg: TrainConfig
    runtime: RuntimeConfig
    model: nn.Module
    head_name: str
    frozen: list[str]  # modules of the frozen backbone stages
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
        frozen = freeze_stages(model, head_name, cfg.frozen_stages)
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

    def step(self, inputs: Inputs, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step on the batch ``indices``; returns (summed loss, correct predictions, images).

        The sums stay on the device (as float64 and int64 tensors): reading them every step would make a GPU wait.
        With several processes each one trains on its shard of the batch, and the sums are the whole batch's.
        """
        model_inputs, targets, labels = inputs.fetch(self.world.shard(indices))
        with autocast(self.device, self.amp_dtype):
            logits = inputs.forward(model_inputs)
            loss = self.criterion(logits, targets)
        # DDP averages the shards' gradients; weighting each shard's mean by its size makes that the batch mean
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


def start_from_probe(model: nn.Module, arch: str, weights: str, classes: list[str], path: Path) -> None:
    """Load the fitted probe (its backbone weights and its head) into ``model``: LP-FT's starting point."""
    if not path.is_file():
        raise ModelError(
            f"train.init_head: probe needs the linear probe at {path}: run its stage first (dvc repro train_probe)"
        )
    checkpoint = read_checkpoint(path)
    made_for = (checkpoint["arch"], checkpoint.get("weights"), checkpoint["classes"])
    if made_for != (arch, weights, classes):
        raise ModelError(
            f"the linear probe at {path} is for {made_for[0]} (weights {made_for[1]}, {len(made_for[2])} classes), "
            f"not {arch} (weights {weights}, {len(classes)} classes): re-run train_probe"
        )
    model.load_state_dict(checkpoint["model"])


def initial_model(
    arch: str, weights: str, classes: list[str], cfg: TrainConfig, probe: str = "probe"
) -> tuple[nn.Module, str, Preprocessing]:
    """The model before its first step: a fresh head, or with ``init_head: probe`` the fitted linear probe ``probe`` (LP-FT)."""
    torch.manual_seed(cfg.seed)
    model, head_name, prep = build_model(arch, weights, len(classes))
    if cfg.init_head == "probe":
        start_from_probe(model, arch, weights, classes, checkpoint_path(probe))
    return model, head_name, prep


def training_data(train_on_val: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train images, labels), (validation images, labels); with ``train_on_val`` the validation images train too."""
    (train_images, train_labels), (val_images, val_labels) = load_split("train"), load_split("val")
    if not train_on_val:
        return (train_images, train_labels), (val_images, val_labels)
    merged = (np.concatenate([train_images, val_images]), np.concatenate([train_labels, val_labels]))
    return merged, (val_images[:0], val_labels[:0])


def divergence(
    run: str, out: str, cfg: TrainConfig, progress: resume.Progress, params: Params
) -> DivergedError:
    """What to tell the user when the training loss stops being finite: the likely causes and the params to change."""
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
    return DivergedError(
        f"{out} diverged: the training loss became {float(progress.loss_sum) / max(progress.seen, 1)} in epoch "
        f"{progress.epoch + 1}, by step {progress.step}. Likely: {causes}. Lower {params.key(run, 'lr')} "
        f"(`transferlab lr-find {run}` shows where the loss climbs) and run again. No model was written; {kept}"
    )


def validation_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    return {
        "val/loss": nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item(),
        "val/acc": (logits.argmax(1).numpy() == labels).mean().item(),
    }


def training_inputs(trainer: Trainer, data, prep, arch: str, weights: str, num_classes: int) -> Inputs:
    cfg = trainer.cfg
    if cfg.mode == "feature_extract" and not cfg.augment:
        linear_head(trainer.model, trainer.head_name)
        (_, train_labels), (_, val_labels) = data
        features = frozen_features(cfg, arch, weights, (len(train_labels), len(val_labels)))
        return feature_inputs(features, train_labels, trainer.head_name, trainer.model, trainer.world)
    return image_inputs(
        trainer.model, data, cfg, trainer.runtime.channels_last, prep, trainer.world, num_classes
    )


def interpolation_curve(
    trainer: Trainer,
    inputs: Inputs,
    start: dict,
    end: dict,
    end_scores: dict,
    val_labels: np.ndarray,
    chosen: float,
) -> list[tuple[float, float, float]]:
    """(mixing weight, validation accuracy, loss) of the weights ``start + weight * (end - start)`` (WiSE-FT), at
    :data:`CURVE_POINTS` and the run's ``interpolation``: which mix of start and end validates best.
    ``end_scores``: the validation metrics of ``end`` (weight 1), measured during training."""
    rows = []
    for weight in sorted({*CURVE_POINTS, chosen}):
        if weight == 1:
            scores = end_scores
        else:
            trainer.kept.load_state_dict(interpolate(start, end, weight))
            scores = validation_metrics(inputs.validate(trainer.kept), val_labels)
        rows.append((weight, scores["val/acc"], scores["val/loss"]))
        log.info("interpolation %.2f: validation accuracy %.4f", weight, scores["val/acc"])
    return rows


def run(name: str, world: World | None = None, holdout: bool = False) -> dict:
    """Train the run ``name`` (finetune or scratch); return the kept epoch and its validation score (None without validation).

    ``world``: this process's place in a data-parallel run (default: the only process, on ``runtime.device``).
    ``holdout``: train the run's holdout twin (see :func:`paths.holdout`), which writes under its own name.
    """
    started = time.perf_counter()
    params = load_params()
    cfg, runtime = params.train_config(name, holdout), params.runtime
    out = paths.holdout(name) if holdout else name  # where the run writes
    probe = paths.holdout("probe") if holdout else "probe"
    weights = params.weights_for(name)
    device, amp_dtype = training_device(
        runtime.device, runtime.precision
    )  # an unavailable one fails here, before any work
    world = world or World(device=device)
    classes = load_classes()
    data = training_data(cfg.train_on_val)
    (train_images, train_labels), (_, val_labels) = data
    if len(train_labels) < world.size:
        raise ConfigError(
            f"runtime.processes: {world.size} processes but {len(train_labels)} training images; every process needs a share"
        )
    model, head_name, prep = initial_model(params.model.arch, weights, classes, cfg, probe)
    if world.rank:  # every process starts from the same weights (DDP checks) but draws its own augmentations
        torch.manual_seed(cfg.seed + world.rank)
    slices = batch_slices(len(train_labels), cfg.batch_size)
    trainer = Trainer.create(model, head_name, cfg, runtime, len(slices), world, amp_dtype)
    inputs = training_inputs(
        trainer, data, prep, params.model.arch, weights, len(classes)
    )  # frozen features that are not there fail here
    start = (
        cpu_copy(model) if cfg.mode != "scratch" else None
    )  # where fine-tuning starts: one end of the interpolation
    generator = torch.Generator().manual_seed(
        cfg.seed
    )  # the same on every process: one order, sharded per batch
    # the files the run starts from: the probe's head (LP-FT), the frozen features (feature_extract without augmentation)
    start_from = [checkpoint_path(probe)] if cfg.init_head == "probe" else []
    start_from += (
        [FEATURES_DIR / "features.json"] if cfg.mode == "feature_extract" and not cfg.augment else []
    )
    fingerprint = resume.fingerprint(
        out, params.model.arch, weights, cfg, runtime, trainer.device, start_from, world.size
    )
    state = world.from_main(resume.load_state(resume_path(out), fingerprint) if world.main else None)
    progress, best_model = resume.Progress(), None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        generator.set_state(state["generator"])
        resume.restore_rng(state["rng"][world.rank])
        progress, best_model = resume.Progress(**state["progress"]), state["best_model"]
        log.info(
            "resuming %s from epoch %d, step %d (%s)",
            out,
            progress.epoch + 1,
            progress.step,
            resume_path(out),
        )

    def save_state(epoch_start_generator: torch.Tensor) -> None:
        rng = world.gather(
            resume.rng_state(trainer.device)
        )  # every process's random state, for an exact resume
        if not world.main:
            return
        resume.save_state(
            resume_path(out),
            {
                "fingerprint": fingerprint,
                "progress": dataclasses.asdict(progress),
                "trainer": trainer.state_dict(),
                "generator": epoch_start_generator,
                "rng": rng,
                "best_model": best_model,
                "params": {
                    "run": out,
                    "arch": params.model.arch,
                    "weights": weights,
                    "train": dataclasses.asdict(cfg),
                    "runtime": dataclasses.asdict(runtime),
                },
            },
        )

    training_log = TrainingLog(train_dir(out), params.logging.tensorboard, active=world.main)
    # the CPU cores shared with other processes computing at once; a compiled model keeps its first thread count
    # (a change would make torch.compile compile again)
    with training_log as live, resume.stop_requests() as stop_requested, cores.shared(pin=cfg.compile):
        live.log_params(
            {
                "run": out,
                "arch": params.model.arch,
                "weights": weights,
                **dataclasses.asdict(cfg),
                **dataclasses.asdict(runtime),
            }
        )
        live.log_images("train images (cached, before augmentation)", train_images[:16])
        for (
            logged
        ) in progress.history:  # curves of the epochs done before an interruption, at their own steps
            live.log_epoch(logged)
        while progress.epoch < cfg.epochs and not progress.stopped_early:
            epoch_start_generator = generator.get_state()
            order = epoch_order(train_labels, generator, cfg.balanced_sampling)
            if progress.step == 0:
                progress.start_epoch({f"lr/{g['name']}": g["lr"] for g in trainer.optimizer.param_groups})
            trainer.enter_train_mode()
            bar = tqdm(
                slices,
                initial=progress.step,
                desc=f"{out} epoch {progress.epoch + 1}/{cfg.epochs}",
                leave=False,
                disable=not world.main,
            )
            for batch in slices[progress.step :]:
                cores.refresh()  # this process's share of the CPU cores, counted again every few seconds
                progress.add_batch(*trainer.step(inputs, order[batch]))
                bar.update()
                if progress.step % 10 == 0 or progress.step == len(
                    slices
                ):  # reading the sum waits for a GPU: not every step
                    if not math.isfinite(
                        float(progress.loss_sum)
                    ):  # NaN and inf stay in the epoch's sum once there
                        bar.close()
                        raise divergence(name, out, cfg, progress, params)
                    bar.set_postfix(loss=f"{float(progress.loss_sum) / progress.seen:.3f}")
                if world.stop_now(stop_requested(), progress.step, len(slices)):
                    save_state(epoch_start_generator)
                    bar.close()
                    raise SystemExit(
                        f"stopped: {out} saved at epoch {progress.epoch + 1}, step {progress.step}; run again to resume"
                    )
            bar.close()
            logged = progress.train_metrics()
            score = None
            if len(val_labels):
                logged.update(validation_metrics(inputs.validate(trainer.kept), val_labels))
                score = logged["val/acc"] if cfg.monitor == "val_acc" else -logged["val/loss"]
            if progress.end_epoch(logged, score, cfg.early_stopping_patience):
                best_model = cpu_copy(trainer.kept)
            trainer.schedule.end_epoch(logged.get(cfg.monitor.replace("_", "/")))
            log.info(
                "%s epoch %d: %s", out, progress.epoch, ", ".join(f"{k} {v:.4g}" for k, v in logged.items())
            )
            live.log_epoch(logged)
            save_state(generator.get_state())
        best = {
            "val_acc": progress.history[progress.best_epoch - 1].get("val/acc"),
            "epoch": progress.best_epoch,
        }
        if (
            start is not None
        ):  # WiSE-FT: the line from the starting weights to the last epoch's, those a final fit keeps
            end, curve = cpu_copy(trainer.kept), None
            if len(val_labels):
                curve = interpolation_curve(
                    trainer, inputs, start, end, progress.history[-1], val_labels, cfg.interpolation
                )
                live.write_csv("interpolation.csv", ["interpolation", "val_acc", "val_loss"], curve)
            if cfg.interpolation < 1:  # the mix replaces the best-epoch choice
                best_model = interpolate(start, end, cfg.interpolation)
                best = {
                    "val_acc": next((acc for w, acc, _ in curve or [] if w == cfg.interpolation), None),
                    "epoch": progress.epoch,
                }
        if not world.main:
            return best
        save_checkpoint(
            checkpoint_path(out),
            best_model,
            run=out,
            mode=cfg.mode,
            arch=params.model.arch,
            weights=weights,
            classes=classes,
            head=head_name,
            preprocessing=prep.as_dict(),
            cache_size=train_images.shape[1],
            eval_image_size=cfg.eval_image_size,
            channels_last=runtime.channels_last,
            config=dataclasses.asdict(cfg),
            **best,
        )
        if best["val_acc"] is not None:
            live.summary["best/val_acc"] = best["val_acc"]
        live.summary["best/epoch"] = best["epoch"]
        live.summary["epochs_run"] = progress.epoch
        live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    resume_path(out).unlink(missing_ok=True)
    return best


def train(name: str, holdout: bool = False) -> dict:
    """Train in this process, as one of the data-parallel processes torchrun started or as the only one."""
    params = load_params()
    runtime = params.runtime
    device, _ = training_device(runtime.device, runtime.precision)
    with process_group(
        device, runtime.processes, params.train_config(name).batch_size, params.key(name, "batch_size")
    ) as world:
        return run(name, world, holdout)
