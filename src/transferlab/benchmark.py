"""Training and evaluation throughput on this machine (a benchmark, not a test: it reports, never asserts).

    python -m transferlab.benchmark --arch timm/tf_efficientnet_lite0 --image-size 160 --batch-size 32 \\
        --jpeg-folder ../shared/datasets/caltech-101/101_ObjectCategories

For one model, resolution and batch size it measures, in images per second:
1. compute-only bound: training steps on one random batch already in memory (no data work at all);
2. this pipeline: a real epoch of the cached uint8 images from ``prepare`` (augmented per image on the
   training device), through the same ``Trainer.step`` the training stages use;
3. the seeds' baseline: torchvision ``ImageFolder`` decoding the JPEGs every epoch, per-image transforms,
   ``DataLoader(num_workers=2)``, for as many batches as (2) (only with ``--jpeg-folder``);
and evaluation throughput (the test split at ``--eval-image-size``), the wall time of the feature-extract
fast path (one backbone pass over train + val, then the head's epochs on the cached features), and the
process's peak memory. Results go to stdout as a Markdown table (and to ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import time
from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from .config import TrainConfig
from .data import batch_slices, epoch_order, load_classes, load_split
from .device import resolve_device, training_device
from .fileio import write_json
from .inference import predict_logits
from .models import build_model
from .train import Inputs, Trainer, compute_features, feature_inputs, image_inputs

log = logging.getLogger("transferlab.benchmark")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_steps(trainer: Trainer, inputs: Inputs, batches: list[torch.Tensor], warmup: int = 2) -> float:
    """Images per second over ``batches`` (the first ``warmup`` steps are not timed)."""
    trainer.enter_train_mode()
    for indices in batches[:warmup]:
        trainer.step(inputs, indices)
    synchronize(trainer.device)
    started, images = time.perf_counter(), 0
    for indices in batches[warmup:]:
        images += trainer.step(inputs, indices)[2]
    synchronize(trainer.device)
    return images / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fresh_trainer(arch: str, cfg: TrainConfig, num_classes: int, steps_per_epoch: int):
    torch.manual_seed(cfg.seed)
    model, head, prep = build_model(arch, "none", num_classes)
    return Trainer.create(model, head, cfg, steps_per_epoch, *training_device(cfg.device, cfg.precision)), prep


def compute_bound(arch: str, cfg: TrainConfig, num_classes: int, steps: int) -> float:
    trainer, _ = fresh_trainer(arch, cfg, num_classes, steps)
    batch = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=trainer.device)
    if cfg.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (cfg.batch_size,), device=trainer.device)
    same_batch = Inputs(fetch=lambda indices: (batch, labels, labels), forward=trainer.model, validate=lambda: None)
    return timed_steps(trainer, same_batch, [torch.empty(0)] * (steps + 2))


def cached_pipeline(arch: str, cfg: TrainConfig, data, num_classes: int, max_steps: int | None) -> float:
    (_, labels), _ = data
    slices = batch_slices(len(labels), cfg.batch_size)
    trainer, prep = fresh_trainer(arch, cfg, num_classes, len(slices))
    inputs = image_inputs(trainer.model, data, cfg, prep, trainer.device, num_classes)
    order = epoch_order(labels, torch.Generator().manual_seed(0), balanced=False)
    return timed_steps(trainer, inputs, [order[s] for s in slices[: max_steps and max_steps + 2]])


class ImageFolderWithout(datasets.ImageFolder):
    """torchvision's ImageFolder, leaving out the classes the pipeline excludes (``BACKGROUND_Google``)."""

    def __init__(self, root: Path, exclude: list[str], **kwargs):
        self.exclude = set(exclude)
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        kept = [name for name in classes if name not in self.exclude]
        return kept, {name: index for index, name in enumerate(kept)}


def jpeg_baseline(arch: str, cfg: TrainConfig, folder: Path, num_classes: int, max_steps: int, workers: int) -> float:
    """The way the seeds train: decode and transform each JPEG in DataLoader workers, every epoch (``max_steps`` batches)."""
    trainer, prep = fresh_trainer(arch, cfg, num_classes, 1)
    transform = v2.Compose(
        [
            v2.RGB(),
            v2.RandomResizedCrop(cfg.image_size, scale=(cfg.crop_scale_min, 1.0), interpolation=InterpolationMode(prep.interpolation), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(prep.mean), list(prep.std)),
        ]
    )
    dataset = ImageFolderWithout(folder, exclude=["BACKGROUND_Google"], transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True)
    batches = iter(loader)
    device = trainer.device

    def fetch(_):
        images, labels = next(batches)
        images, labels = images.to(device), labels.to(device)
        return (images.contiguous(memory_format=torch.channels_last) if cfg.channels_last else images), labels, labels

    steps = min(len(loader), max_steps + 2)
    return timed_steps(trainer, Inputs(fetch, trainer.model, lambda: None), [torch.empty(0)] * steps)


def evaluation_throughput(arch: str, cfg: TrainConfig, images, num_classes: int) -> float:
    trainer, prep = fresh_trainer(arch, cfg, num_classes, 1)
    started = time.perf_counter()
    predict_logits(trainer.model, images, prep, cfg.eval_image_size, cfg.batch_size * 2, cfg.channels_last, "eval")
    synchronize(trainer.device)
    return len(images) / (time.perf_counter() - started)


def feature_extract_wall_time(arch: str, cfg: TrainConfig, data, num_classes: int) -> float:
    """Seconds for the feature_extract fast path: features of train + val once, then ``cfg.epochs`` head epochs."""
    (_, labels), _ = data
    slices = batch_slices(len(labels), cfg.batch_size)
    cfg = dataclasses.replace(cfg, mode="feature_extract", augment=False)
    started = time.perf_counter()
    trainer, prep = fresh_trainer(arch, cfg, num_classes, len(slices))
    inputs = feature_inputs(compute_features(trainer.model, trainer.head, data, cfg, prep), labels, trainer.head, trainer.device)
    generator = torch.Generator().manual_seed(0)
    for _ in range(cfg.epochs):
        trainer.enter_train_mode()
        order = epoch_order(labels, generator, balanced=False)
        for batch in slices:
            trainer.step(inputs, order[batch])
        inputs.validate()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="timm/tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--eval-image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6, help="head epochs of the feature-extract fast path")
    parser.add_argument("--compute-steps", type=int, default=20, help="timed steps of the compute-only bound")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on the timed steps of (2) and (3); default: a full epoch")
    parser.add_argument("--jpeg-folder", type=Path, help="the raw ImageFolder for the baseline (3); skipped without it")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip", nargs="*", default=[], choices=["compute", "pipeline", "jpeg", "eval", "features"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = TrainConfig(image_size=args.image_size, eval_image_size=args.eval_image_size, batch_size=args.batch_size, epochs=args.epochs, device=args.device)
    num_classes = len(load_classes())
    data = (load_split("train"), load_split("val"))
    device = resolve_device(args.device)
    results = {
        "arch": args.arch,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "eval_image_size": args.eval_image_size,
        "batch_size": args.batch_size,
    }
    measurements = {
        "compute": ("compute_only_img_s", lambda: compute_bound(args.arch, cfg, num_classes, args.compute_steps)),
        "pipeline": ("cached_pipeline_img_s", lambda: cached_pipeline(args.arch, cfg, data, num_classes, args.max_steps)),
        # as many batches as one epoch of the cached training split, unless capped
        "jpeg": (
            "jpeg_dataloader_img_s",
            lambda: jpeg_baseline(args.arch, cfg, args.jpeg_folder, num_classes, args.max_steps or len(batch_slices(len(data[0][1]), cfg.batch_size)), args.workers),
        ),
        "eval": ("eval_img_s", lambda: evaluation_throughput(args.arch, cfg, load_split("test")[0], num_classes)),
        "features": ("feature_extract_wall_s", lambda: feature_extract_wall_time(args.arch, cfg, data, num_classes)),
    }
    for name, (key, measure) in measurements.items():
        if name in args.skip or (name == "jpeg" and args.jpeg_folder is None):
            continue
        results[key] = round(measure(), 2)
        results[f"peak_rss_gib_after_{name}"] = round(peak_rss_gib(), 2)
        log.info("%s: %s", key, results[key])
    if "compute_only_img_s" in results and "cached_pipeline_img_s" in results:
        results["pipeline_vs_compute"] = round(results["cached_pipeline_img_s"] / results["compute_only_img_s"], 3)
    if "jpeg_dataloader_img_s" in results and "cached_pipeline_img_s" in results:
        results["pipeline_vs_jpeg"] = round(results["cached_pipeline_img_s"] / results["jpeg_dataloader_img_s"], 2)
    if device.type == "cuda":
        results["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("| " + " | ".join(results) + " |")
    print("|" + "---|" * len(results))
    print("| " + " | ".join(str(v) for v in results.values()) + " |")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
