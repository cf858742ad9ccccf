"""Stage ``gradcam``: where each model looks, side by side, on a fixed set of test images.

    python -m transferlab.stages.gradcam

``plots/gradcam.jpg``: one row per image (``evaluate.gradcam_images`` of them, spread over the classes),
the image, then each model's Grad-CAM for its own prediction (``gradcam.py``). A stage of its own, where
the three models meet: evaluating one model does not redraw it, and ``compare`` embeds it in the report.
"""

from __future__ import annotations

import logging

import numpy as np

from ..config import MODELS, load_params
from ..entrypoint import run_stage
from ..paths import GRADCAM_IMAGE
from ..splits import load_split

log = logging.getLogger("transferlab.stages.gradcam")


def gradcam_sample(labels: np.ndarray, count: int) -> np.ndarray:
    """A fixed, evenly spread set of test images (the split is ordered by class, so these cover many
    classes)."""
    return (
        np.unique(np.linspace(0, len(labels) - 1, count).round().astype(int))
        if count
        else np.array([], dtype=int)
    )


def main() -> None:
    params = load_params()
    images, labels = load_split("test")
    sample = gradcam_sample(labels, params.evaluate.gradcam_images)
    log.info("Grad-CAM of %s on %d test images", ", ".join(MODELS), len(sample))
    from ..gradcam import plot_gradcam_of_models  # torch, captum and the model libraries

    plot_gradcam_of_models(GRADCAM_IMAGE, images[sample], labels[sample], params.runtime)


if __name__ == "__main__":
    run_stage("gradcam", main)
