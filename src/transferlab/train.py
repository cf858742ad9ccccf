"""Stages ``train_finetune`` and ``train_scratch``: one training loop; the mode is data.

    python -m transferlab.train finetune   # train.mode with the finetune: overrides (finetune | feature_extract)
    python -m transferlab.train scratch    # the same architecture from random init, with the scratch: overrides

Modes (``train.mode``): ``finetune`` trains every layer, the pretrained ones at ``lr * backbone_lr_scale``,
except the first ``frozen_stages`` backbone stages (partial unfreezing); ``feature_extract`` trains only the
new head on the frozen backbone (without augmentation the features are computed once and cached);
``scratch`` starts from random weights. ``train.init_head: probe`` starts from the linear probe (LP-FT).
Per epoch, dvclive logs train (and val) loss and accuracy and each parameter group's learning rate to
``metrics/train_<run>/``; ``data/models/<run>/model.pt`` keeps, with everything needed to use it, the
best epoch on the validation split (``train.monitor``), or the last one with ``train.train_on_val``.
An interrupted run (killed, Ctrl-C) resumes where it stopped when started again (see ``resume.py``).
With ``train.processes: N`` the same command trains in N data-parallel processes (see ``distributed.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import resume
from .config import RUNS, ConfigError, TrainConfig, load_params
from .data import BatchAugmenter, batch_slices, epoch_order, load_classes, load_split
from .device import autocast, training_device
from .distributed import World, launch, launched_by_torchrun, process_group
from .fileio import atomic_path
from .inference import predict_logits
from .models import ModelError, Preprocessing, build_model, freeze_stages, parameter_groups, set_train_mode
from .probe import start_from_probe
from .optim import LrSchedule, build_optimizer
from .paths import checkpoint_path, features_path, resume_path, train_dir
from .stage import run_stage
from .tracking import TrainingLog
from .trained_model import save_checkpoint

log = logging.getLogger("transferlab.train")


@dataclass
class Inputs:
    """Where training batches come from and how they become logits: one of the two kinds below."""

    fetch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # indices -> inputs, targets, labels
    forward: Callable[[torch.Tensor], torch.Tensor]
    validate: Callable[[], torch.Tensor]  # logits of the validation split, on the CPU


def image_inputs(model, data, cfg: TrainConfig, prep, world: World, num_classes: int) -> Inputs:
    """Cached uint8 images, augmented on the training device, through the model.

    With feature_extract the backbone's parameters need no gradient and it runs in eval mode, so autograd
    records only the head: the frozen body costs one forward pass per batch.
    """
    device = world.device
    (train_images, train_labels), (val_images, _) = data
    augment = BatchAugmenter(cfg, prep, num_classes, train_images.shape[1])

    def fetch(indices):
        index = indices.numpy()
        images = torch.from_numpy(train_images[index]).to(device, non_blocking=True).permute(0, 3, 1, 2)
        labels = torch.from_numpy(train_labels[index]).to(device, non_blocking=True)
        inputs, targets = augment(images, labels)
        return inputs, targets, labels

    def validate():
        world.share_buffers(model)
        return world.map_rows(lambda rows: predict_logits(model, rows, prep, cfg.eval_image_size, cfg.batch_size * 2, cfg.channels_last, "val"), val_images)

    forward = world.wrap(model)
    return Inputs(fetch, torch.compile(forward) if cfg.compile else forward, validate)


def compute_features(model, head, data, cfg: TrainConfig, prep, world: World) -> dict:
    """One pass of the frozen backbone over the train (at image_size) and validation (at eval_image_size) images."""
    (train_images, _), (val_images, _) = data

    def features(images: np.ndarray, size: int, desc: str) -> torch.Tensor:
        return world.map_rows(lambda rows: predict_logits(model, rows, prep, size, cfg.batch_size * 2, cfg.channels_last, desc, head), images)

    return {
        "train": features(train_images, cfg.image_size, "features train"),
        "val": features(val_images, cfg.eval_image_size, "features val"),
        "image_size": cfg.image_size,
        "eval_image_size": cfg.eval_image_size,
    }


def feature_inputs(features: dict, train_labels: np.ndarray, head: nn.Module, world: World) -> Inputs:
    """feature_extract without augmentation: the head trains on features computed once."""
    device = world.device
    train_features, val_features = features["train"].to(device), features["val"].to(device)
    labels = torch.from_numpy(train_labels).to(device)

    def fetch(indices):
        indices = indices.to(device)
        return train_features[indices], labels[indices], labels[indices]

    def validate():
        with torch.no_grad():
            return head(val_features).float().cpu()

    return Inputs(fetch, world.wrap(head), validate)


@dataclass
class Trainer:
    """A model made ready for one training mode, with its optimizer, schedule and loss: what one step needs."""

    cfg: TrainConfig
    model: nn.Module
    head: nn.Module
    frozen: list[str]  # modules of the frozen backbone stages
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    world: World
    amp_dtype: torch.dtype | None

    @property
    def device(self) -> torch.device:
        return self.world.device

    @classmethod
    def create(cls, model: nn.Module, head_name: str, cfg: TrainConfig, steps_per_epoch: int, world: World, amp_dtype) -> "Trainer":
        """``world`` from :func:`process_group`, ``amp_dtype`` from :func:`training_device`."""
        device = world.device
        head = model.get_submodule(head_name)
        frozen = freeze_stages(model, head_name, cfg.frozen_stages)
        if cfg.mode == "feature_extract":
            model.requires_grad_(False)
            head.requires_grad_(True)
        model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
        scale = None if cfg.mode == "scratch" else cfg.backbone_lr_scale
        groups = parameter_groups(model, head_name, cfg.lr, scale, cfg.weight_decay, cfg.decay_norm_and_bias)
        optimizer = build_optimizer(groups, cfg)
        return cls(
            cfg,
            model,
            head,
            frozen,
            optimizer,
            LrSchedule(optimizer, cfg, steps_per_epoch),
            torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
            nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
            world,
            amp_dtype,
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
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        loss_sum, correct = loss.detach().double() * len(labels), (logits.argmax(1) == labels).sum()
        return self.world.sum(loss_sum), self.world.sum(correct), len(indices)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])


def initial_model(arch: str, weights: str, classes: list[str], cfg: TrainConfig) -> tuple[nn.Module, str, Preprocessing]:
    """The model before its first step: a fresh head, or with ``init_head: probe`` the fitted linear probe (LP-FT)."""
    torch.manual_seed(cfg.seed)
    model, head_name, prep = build_model(arch, weights, len(classes))
    if cfg.init_head == "probe":
        start_from_probe(model, arch, weights, classes)
    return model, head_name, prep


def training_data(train_on_val: bool) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train images, labels), (validation images, labels); with ``train_on_val`` the validation images train too."""
    (train_images, train_labels), (val_images, val_labels) = load_split("train"), load_split("val")
    if not train_on_val:
        return (train_images, train_labels), (val_images, val_labels)
    merged = (np.concatenate([train_images, val_images]), np.concatenate([train_labels, val_labels]))
    return merged, (val_images[:0], val_labels[:0])


def validation_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    return {
        "val/loss": nn.functional.cross_entropy(logits, torch.from_numpy(labels)).item(),
        "val/acc": (logits.argmax(1).numpy() == labels).mean().item(),
    }


def training_inputs(name: str, trainer: Trainer, data, prep, num_classes: int) -> Inputs:
    world = trainer.world
    cfg = trainer.cfg
    if cfg.mode == "feature_extract" and not cfg.augment:
        if not isinstance(trainer.head, nn.Linear):
            raise ModelError(
                f"train.augment: false with feature_extract trains the final Linear layer on cached features, but this "
                f"model's classifier is a {type(trainer.head).__name__} followed by more layers; use augment: true"
            )
        started = time.perf_counter()
        features = compute_features(trainer.model, trainer.head, data, cfg, prep, world)
        log.info("backbone features of the train and val images in %.1f s", time.perf_counter() - started)
        if world.main:
            with atomic_path(features_path(name)) as tmp:
                torch.save(features, tmp)
        return feature_inputs(features, data[0][1], trainer.head, world)
    return image_inputs(trainer.model, data, cfg, prep, world, num_classes)


def run(name: str, world: World | None = None) -> dict:
    """Train the run ``name`` (finetune or scratch); return the kept epoch and its validation score (None without validation).

    ``world``: this process's place in a data-parallel run (default: the only process, on ``train.device``).
    """
    started = time.perf_counter()
    params = load_params()
    cfg = params.train_config(name)
    weights = params.weights_for(name)
    device, amp_dtype = training_device(cfg.device, cfg.precision)  # an unavailable one fails here, before any work
    world = world or World(device=device)
    classes = load_classes()
    data = training_data(cfg.train_on_val)
    (train_images, train_labels), (_, val_labels) = data
    if len(train_labels) < world.size:
        raise ConfigError(f"train.processes: {world.size} processes but {len(train_labels)} training images; every process needs a share")
    model, head_name, prep = initial_model(params.model.arch, weights, classes, cfg)
    if world.rank:  # every process starts from the same weights (DDP checks) but draws its own augmentations
        torch.manual_seed(cfg.seed + world.rank)
    slices = batch_slices(len(train_labels), cfg.batch_size)
    trainer = Trainer.create(model, head_name, cfg, len(slices), world, amp_dtype)
    generator = torch.Generator().manual_seed(cfg.seed)  # the same on every process: one order, sharded per batch
    start_from = [checkpoint_path("probe")] if cfg.init_head == "probe" else []
    fingerprint = resume.fingerprint(name, params.model.arch, weights, cfg, trainer.device, start_from, world.size)
    state = world.from_main(resume.load_state(resume_path(name), fingerprint) if world.main else None)
    progress, best_model = resume.Progress(), None
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        generator.set_state(state["generator"])
        resume.restore_rng(state["rng"][world.rank])
        progress, best_model = resume.Progress(**state["progress"]), state["best_model"]
        log.info("resuming %s from epoch %d, step %d (%s)", name, progress.epoch + 1, progress.step, resume_path(name))
    inputs = training_inputs(name, trainer, data, prep, len(classes))

    def save_state(epoch_start_generator: torch.Tensor) -> None:
        rng = world.gather(resume.rng_state(trainer.device))  # every process's random state, for an exact resume
        if not world.main:
            return
        resume.save_state(
            resume_path(name),
            {
                "fingerprint": fingerprint,
                "progress": dataclasses.asdict(progress),
                "trainer": trainer.state_dict(),
                "generator": epoch_start_generator,
                "rng": rng,
                "best_model": best_model,
                "params": {"run": name, "arch": params.model.arch, "weights": weights, "train": dataclasses.asdict(cfg)},
            },
        )

    training_log = TrainingLog(train_dir(name), params.logging.tensorboard, active=world.main)
    with training_log as live, resume.stop_requests() as stop_requested:
        live.log_params({"run": name, "arch": params.model.arch, "weights": weights, **dataclasses.asdict(cfg)})
        live.log_images("train images (cached, before augmentation)", train_images[:16])
        for logged in progress.history:  # curves of the epochs done before an interruption, at their own steps
            live.log_epoch(logged)
        while progress.epoch < cfg.epochs and not progress.stopped_early:
            epoch_start_generator = generator.get_state()
            order = epoch_order(train_labels, generator, cfg.balanced_sampling)
            if progress.step == 0:
                progress.start_epoch({f"lr/{g['name']}": g["lr"] for g in trainer.optimizer.param_groups})
            trainer.enter_train_mode()
            bar = tqdm(slices, initial=progress.step, desc=f"{name} epoch {progress.epoch + 1}/{cfg.epochs}", leave=False, disable=not world.main)
            for batch in slices[progress.step :]:
                progress.add_batch(*trainer.step(inputs, order[batch]))
                bar.update()
                if progress.step % 10 == 0:
                    bar.set_postfix(loss=f"{float(progress.loss_sum) / progress.seen:.3f}")
                if world.stop_now(stop_requested(), progress.step, len(slices)):
                    save_state(epoch_start_generator)
                    bar.close()
                    raise SystemExit(f"stopped: {name} saved at epoch {progress.epoch + 1}, step {progress.step}; run again to resume")
            bar.close()
            logged = progress.train_metrics()
            score = None
            if len(val_labels):
                logged.update(validation_metrics(inputs.validate(), val_labels))
                score = logged["val/acc"] if cfg.monitor == "val_acc" else -logged["val/loss"]
            if progress.end_epoch(logged, score, cfg.early_stopping_patience):
                best_model = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
            trainer.schedule.end_epoch(logged.get(cfg.monitor.replace("_", "/")))
            log.info("%s epoch %d: %s", name, progress.epoch, ", ".join(f"{k} {v:.4g}" for k, v in logged.items()))
            live.log_epoch(logged)
            save_state(generator.get_state())
        best = {"val_acc": progress.history[progress.best_epoch - 1].get("val/acc"), "epoch": progress.best_epoch}
        if not world.main:
            return best
        save_checkpoint(
            checkpoint_path(name), best_model, run=name, mode=cfg.mode, arch=params.model.arch, weights=weights, classes=classes,
            prep=prep, cache_size=train_images.shape[1], eval_image_size=cfg.eval_image_size, channels_last=cfg.channels_last,
            config=dataclasses.asdict(cfg), **best
        )
        if best["val_acc"] is not None:
            live.summary["best/val_acc"] = best["val_acc"]
        live.summary["best/epoch"] = best["epoch"]
        live.summary["epochs_run"] = progress.epoch
        live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    resume_path(name).unlink(missing_ok=True)
    return best


def start(name: str) -> None:
    """Train in this process, or with ``train.processes`` > 1 start the data-parallel processes that will."""
    cfg = load_params().train_config(name)  # bad params fail here, before any process starts
    if cfg.processes > 1 and not launched_by_torchrun():
        status = launch(cfg.processes, "transferlab.train", [name])
        if status:
            raise SystemExit(f"train {name}: the data-parallel run failed (exit code {status})")
        return
    device, _ = training_device(cfg.device, cfg.precision)
    with process_group(device, cfg.processes, cfg.batch_size) as world:
        run(name, world)


def batch_setting(run: str) -> tuple[str, int]:
    """The run's batch size and the params key it comes from (``finetune.batch_size`` if set there, else ``train.``)."""
    params = load_params()
    return params.key(run, "batch_size"), params.train_config(run).batch_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=RUNS)
    args = parser.parse_args(argv)
    run_stage(
        f"train {args.run}",
        lambda: start(args.run),
        lambda: batch_setting(args.run),
    )


if __name__ == "__main__":
    main()
