"""Tiny, learnable image folders for tests: each class is a colour, with noise and a random box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40), (200, 40, 200), (40, 200, 200)]


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 10, size: int = 40, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = size + int(rng.integers(0, 16)), size + int(rng.integers(0, 16))
            image = (
                rng.normal(COLOURS[c % len(COLOURS)], 40, (height, width, 3)).clip(0, 255).astype(np.uint8)
            )
            top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
            image[top : top + height // 3, left : left + width // 3] = 255 - np.array(
                COLOURS[c % len(COLOURS)]
            )
            Image.fromarray(image).save(folder / f"image_{i:04d}.jpg", quality=90)
    return root
