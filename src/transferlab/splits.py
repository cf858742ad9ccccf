"""Reading what ``prepare`` and ``features`` wrote: the splits' uint8 images and labels, and their frozen
features.

numpy only: a stage that reads them starts in a fraction of a second.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import ModelError
from .fileio import read_json
from .paths import FEATURES_DIR, PREPARED_DIR

SPLITS = ("train", "val", "test")


def load_classes(prepared_dir: Path = PREPARED_DIR) -> list[str]:
    return read_json(prepared_dir / "classes.json")


def load_split(name: str, prepared_dir: Path = PREPARED_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The split's images (N x S x S x 3 uint8) and labels, rows in the order of its CSV."""
    with (prepared_dir / f"{name}.csv").open() as f:
        labels = np.array([int(row["label"]) for row in csv.DictReader(f)], dtype=np.int64)
    images = np.load(prepared_dir / f"{name}.npy", mmap_mode="r")
    if len(images) != len(labels):
        raise RuntimeError(
            f"{prepared_dir}/{name}.npy and .csv disagree ({len(images)} vs {len(labels)} rows): "
            "re-run prepare"
        )
    return images, labels


def features_info(folder: Path = FEATURES_DIR) -> dict:
    """What the features in ``folder`` are (arch, weights, image size, dimension, images per split)."""
    path = folder / "features.json"
    if not path.is_file():
        raise ModelError(f"no frozen features at {folder}: run their stage first (dvc repro features)")
    return read_json(path)


def load_features(split: str, folder: Path = FEATURES_DIR):
    """The split's features, views x N x D float32 (memory-mapped): centre crop, mirror image, then any
    random crops."""
    return np.load(folder / f"{split}.npy", mmap_mode="r")


def check_classes(path: Path, trained_on: list[str], classes: list[str]) -> None:
    """Labels index classes.json: a model trained on other classes would be scored wrongly."""
    if trained_on != classes:
        raise ModelError(
            f"{path} was trained on {len(trained_on)} classes that are not data/prepared/classes.json's "
            f"{len(classes)}: re-run its training stage (dvc repro)"
        )
