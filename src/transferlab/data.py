"""Read the prepared uint8 arrays and turn them into model inputs (no JPEG is decoded after ``prepare``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from .fileio import read_json
from .models import Preprocessing
from .paths import PREPARED_DIR


def load_classes(prepared_dir: Path = PREPARED_DIR) -> list[str]:
    return read_json(prepared_dir / "classes.json")


def load_split(name: str, prepared_dir: Path = PREPARED_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The split's images (N x S x S x 3 uint8) and labels, rows in the order of its CSV."""
    with (prepared_dir / f"{name}.csv").open() as f:
        labels = np.array([int(row["label"]) for row in csv.DictReader(f)], dtype=np.int64)
    images = np.load(prepared_dir / f"{name}.npy", mmap_mode="r")
    if len(images) != len(labels):
        raise RuntimeError(f"{prepared_dir}/{name}.npy and .csv disagree ({len(images)} vs {len(labels)} rows): re-run prepare")
    return images, labels


def _interpolation(prep: Preprocessing) -> InterpolationMode:
    return InterpolationMode(prep.interpolation)


def train_augmentation(size: int, prep: Preprocessing, crop_scale_min: float) -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), interpolation=_interpolation(prep), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )


def eval_resize(size: int, prep: Preprocessing, cache_size: int) -> v2.Transform:
    """The standard evaluation crop: keep the centre ``crop_pct`` of the image, resize it to ``size``."""
    return v2.Compose(
        [
            v2.CenterCrop(round(cache_size * prep.crop_pct)),
            v2.Resize((size, size), interpolation=_interpolation(prep), antialias=True),
        ]
    )


def normalize(batch: torch.Tensor, prep: Preprocessing, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW batch -> normalised float batch, in the memory format the model runs fastest in."""
    batch = v2.functional.normalize(v2.functional.to_dtype(batch, torch.float32, scale=True), list(prep.mean), list(prep.std))
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


class AugmentedArray(Dataset):
    """Random crops and flips of cached uint8 images, one sample at a time (each gets its own crop)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        return self.transform(image), self.labels[index]


def train_loader(images, labels, transform, batch_size: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    dataset = AugmentedArray(images, labels, transform)
    # drop a ragged last batch (noisy batch-norm statistics), unless that would leave no batch at all
    drop_last = len(dataset) > batch_size
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator)


def eval_batches(images: np.ndarray, transform: v2.Transform, batch_size: int):
    """Deterministic evaluation batches: the resize runs on whole batches, not image by image."""
    for start in range(0, len(images), batch_size):
        yield transform(torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2))
