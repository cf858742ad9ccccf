"""Stages ``train_finetune`` and ``train_scratch``: one training loop, the mode is data.

    python -m transferlab.train finetune   # ImageNet weights, new head at train.lr, body at lr * backbone_lr_scale
    python -m transferlab.train scratch    # same architecture from random init, every layer at scratch.lr

Per epoch, dvclive logs train/val loss and accuracy and each parameter group's learning rate
to ``metrics/train_<mode>/``; the checkpoint with the best validation accuracy is kept in
``data/models/<mode>.pt`` together with everything needed to use it (arch, classes, preprocessing).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import torch
from dvclive import Live
from torch import nn
from tqdm import tqdm

from .config import MODES, TrainConfig, load_params
from .data import load_classes, load_split, normalize, train_augmentation, train_loader
from .fileio import atomic_path
from .inference import default_device, predict_logits
from .models import build_model, freeze_bn_stats, parameter_groups
from .paths import checkpoint_path, train_dir
from .stage import run_stage

log = logging.getLogger("transferlab.train")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step cosine decay to zero, after an optional linear warm-up."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total - 1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)
    if warmup <= 0:
        return cosine
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    model.train()
    if cfg.freeze_bn_stats:
        freeze_bn_stats(model)


def train_one_epoch(model, loader, optimizer, scheduler, criterion, prep, cfg: TrainConfig, desc: str) -> tuple[float, float]:
    set_train_mode(model, cfg)
    device = next(model.parameters()).device
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False)
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(normalize(images, prep, cfg.channels_last))
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    return total_loss / seen, correct / seen


def save_checkpoint(path: Path, model: nn.Module, **info) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), **info}, tmp)


def run(mode: str) -> dict:
    started = time.perf_counter()
    params = load_params()
    cfg = params.train_config(mode)
    torch.manual_seed(cfg.seed)
    classes = load_classes()
    train_images, train_labels = load_split("train")
    val_images, val_labels = load_split("val")
    model, head, prep = build_model(params.model.arch, params.weights_for(mode), len(classes))
    model = model.to(default_device())
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = parameter_groups(model, head, cfg.lr, cfg.backbone_lr_scale if mode == "finetune" else None)
    optimizer = torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    loader = train_loader(train_images, train_labels, train_augmentation(cfg.image_size, prep, cfg.crop_scale_min), cfg.batch_size, cfg.seed)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    checkpoint_info = {
        "mode": mode,
        "arch": params.model.arch,
        "weights": params.weights_for(mode),
        "classes": classes,
        "preprocessing": prep.as_dict(),
        "eval_image_size": cfg.eval_image_size,
        "train_config": dataclasses.asdict(cfg),
    }
    best = {"val_acc": None, "epoch": 0}
    with Live(str(train_dir(mode)), dvcyaml=False, save_dvc_exp=False) as live:
        live.log_params({"mode": mode, "arch": params.model.arch, "weights": params.weights_for(mode), **dataclasses.asdict(cfg)})
        for epoch in range(cfg.epochs):
            for group in optimizer.param_groups:
                live.log_metric(f"lr/{group['name']}", group["lr"])
            train_loss, train_acc = train_one_epoch(
                model, loader, optimizer, scheduler, criterion, prep, cfg, desc=f"{mode} epoch {epoch + 1}/{cfg.epochs}"
            )
            live.log_metric("train/loss", train_loss)
            live.log_metric("train/acc", train_acc)
            val_acc = None  # without a validation split, the last epoch is kept
            if len(val_labels):
                logits = predict_logits(model, val_images, prep, cfg.eval_image_size, cfg.batch_size * 2, cfg.channels_last, "val")
                val_loss = nn.functional.cross_entropy(logits, torch.from_numpy(val_labels)).item()
                val_acc = (logits.argmax(1).numpy() == val_labels).mean().item()
                live.log_metric("val/loss", val_loss)
                live.log_metric("val/acc", val_acc)
                log.info("%s epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f", mode, epoch + 1, train_loss, train_acc, val_loss, val_acc)
            if val_acc is None or best["val_acc"] is None or val_acc > best["val_acc"]:
                best = {"val_acc": val_acc, "epoch": epoch + 1}
                save_checkpoint(checkpoint_path(mode), model, epoch=epoch + 1, val_acc=val_acc, **checkpoint_info)
            live.next_step()
        if best["val_acc"] is not None:
            live.summary["best/val_acc"] = best["val_acc"]
        live.summary["best/epoch"] = best["epoch"]
        live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=MODES)
    args = parser.parse_args(argv)
    run_stage(f"train {args.mode}", lambda: run(args.mode))


if __name__ == "__main__":
    main()
