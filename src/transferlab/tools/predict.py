"""Class probabilities for image files, from a trained model's checkpoint alone.

Images are decoded the way ``prepare`` decodes them (shorter side resized, centre square, RGB), then
get the model's evaluation crop. A path that does not exist, a folder without images and a file that
cannot be read are each reported with the reason; the rest are still predicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DatasetError
from ..fileio import write_csv, write_json
from ..sources import IMAGE_EXTENSIONS, load_image, walk_files

if TYPE_CHECKING:  # only annotated here: finding and reading images needs no torch
    from ..trained_model import TrainedModel


@dataclass
class Predictions:
    paths: list[str] = field(default_factory=list)
    top: list[list[tuple[str, float]]] = field(
        default_factory=list
    )  # per image: (class, probability), best first
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def find_images(targets: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Each target that is a file, and every image file (by extension) under each target that is a folder,
    walked as ``prepare`` walks a class folder (see :func:`dataset.walk_files`); in the order given, each path
    once. Targets that give no file (missing, or a folder without images) are returned apart, with the
    reason, so that one wrong path does not stop the others."""
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for target in targets:
        if target.is_file():
            found.append(target)
        elif target.is_dir():
            images = [p for p in walk_files(target) if p.suffix.lower() in IMAGE_EXTENSIONS]
            found += images
            if not images:
                skipped.append(
                    (str(target), f"holds no image files (extensions read: {' '.join(IMAGE_EXTENSIONS)})")
                )
        else:
            skipped.append((str(target), "does not exist (give image files or folders of images)"))
    return list(dict.fromkeys(found)), skipped


def every_image(targets: list[Path]) -> list[Path]:
    """:func:`find_images` for a command that needs all of them: any target without images is an error."""
    found, skipped = find_images(targets)
    if skipped:
        raise DatasetError("; ".join(f"{path} {reason}" for path, reason in skipped))
    return found


def read_images(paths: list[Path], size: int) -> tuple[list[Path], np.ndarray, list[tuple[str, str]]]:
    """Decode every file to a size x size x 3 uint8 image; return the readable ones, their pixels and the
    failures."""
    readable, images, failures = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, size))
            readable.append(path)
        # PIL raises many types for bad files; each is reported, none stops the others
        except Exception as err:
            failures.append((str(path), f"{type(err).__name__}: {err}"))
    return readable, np.stack(images) if images else np.empty((0, size, size, 3), np.uint8), failures


def predict(
    trained: TrainedModel, paths: list[Path], topk: int, batch_size: int = 32, tta: str = "flip"
) -> Predictions:
    """Top-k classes of each readable image; ``tta`` as ``evaluate.tta``
    (flip: mean logits of image and mirror image)."""
    readable, images, failures = read_images(paths, trained.card.cache_size)
    result = Predictions(failures=failures)
    if not len(images):
        return result
    probs = trained.probabilities(images, batch_size, tta=tta)
    best = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    result.paths = [str(p) for p in readable]
    result.top = [
        [(trained.card.classes[c], float(probs[row, c])) for c in best[row]] for row in range(len(readable))
    ]
    return result


def format_predictions(result: Predictions) -> str:
    lines = []
    for path, top in zip(result.paths, result.top, strict=True):
        lines.append(path)
        lines += [f"  {rank}. {name:<30} {prob:7.2%}" for rank, (name, prob) in enumerate(top, start=1)]
    return "\n".join(lines)


def write_predictions_csv(path: Path, result: Predictions) -> None:
    """One row per (image, rank); an unreadable image gets one row with its error."""
    rows = [
        (image, rank, name, f"{prob:.6f}", "")
        for image, top in zip(result.paths, result.top, strict=True)
        for rank, (name, prob) in enumerate(top, start=1)
    ]
    write_csv(
        path,
        ["path", "rank", "class", "probability", "error"],
        rows + [(image, "", "", "", reason) for image, reason in result.failures],
    )


def write_json_report(path: Path, result: Predictions) -> None:
    write_json(
        path,
        {
            "predictions": [
                {"path": image, "top": [{"class": name, "probability": prob} for name, prob in top]}
                for image, top in zip(result.paths, result.top, strict=True)
            ],
            "failures": [{"path": image, "error": reason} for image, reason in result.failures],
        },
    )
