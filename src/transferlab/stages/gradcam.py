"""Stage ``gradcam``: where each model looks, side by side, on a fixed set of test images.

    python -m transferlab.stages.gradcam

``plots/gradcam.jpg``: one row per image (``evaluate.gradcam_images`` of them, spread over the classes),
the image, then each model's Grad-CAM for its own prediction (``explain.py``). A stage of its own, where
the three models meet: evaluating one model does not redraw it, and ``compare`` embeds it in the report.
"""

from __future__ import annotations

import logging

import numpy as np

from ..config import MODELS, load_params
from ..entrypoint import run_stage
from ..paths import GRADCAM_IMAGE, checkpoint_path
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
    cfg = params.evaluate
    images, labels = load_split("test")
    sample = gradcam_sample(labels, cfg.gradcam_images)
    log.info("Grad-CAM of %s on %d test images", ", ".join(MODELS), len(sample))
    from .. import cores
    from ..device import resolve_device
    from ..gradcam import plot_gradcam_panel  # torch, captum and the model libraries
    from ..trained_model import TrainedModel

    cores.use(params.runtime.threads)
    device = resolve_device(params.runtime.device)
    models = {run: TrainedModel.load(checkpoint_path(run), device) for run in MODELS}
    plot_gradcam_panel(GRADCAM_IMAGE, images[sample], labels[sample], models)


if __name__ == "__main__":
    run_stage("gradcam", main)
