"""Stage ``features``: the pretrained network's pooled features of every split, computed once.

    python -m transferlab.stages.features

What the classifier head receives (the pooled backbone features) for the train, validation and test
images at ``features.image_size``, and for their mirror images: ``data/features/<split>.npy`` (float32,
views x N x D: the evaluation crop, then its mirror image, then for the train and validation images
``features.train_crops`` random resized crops, each mirrored at random: more training samples for the
probe). ``network.pt`` keeps the network they came from (its weights with a fresh head, the head's name,
its preprocessing), so that ``train_probe`` makes a full checkpoint without building the model again, and
``features.json`` says what they are. The linear probe fits on the train and validation features and is
scored on the test features (no second pass of the backbone); ``feature_extract`` training without
augmentation trains its head on them too. The params are checked and the plan said before the work
(``pooled_features.py``) loads torch and the model libraries.
"""

from __future__ import annotations

import logging
import time

from ..config import load_params
from ..entrypoint import run_stage
from ..fileio import atomic_dir, write_json
from ..paths import FEATURES_DIR, FEATURES_REPORT

log = logging.getLogger("transferlab.stages.features")


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    log.info(
        "features of %s (weights %s) at %d px: the train, val and test images and their mirror images",
        params.model.arch,
        params.model.weights,
        params.features.image_size,
    )
    from ..pooled_features import extract  # torch and the model libraries: imported once the plan is shown

    with atomic_dir(FEATURES_DIR) as out:
        info = extract(params, out)
        write_json(out / "features.json", info)
    write_json(
        FEATURES_REPORT,
        {
            **info["images"],
            "threads": info["threads"],
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
    )


if __name__ == "__main__":
    run_stage("features", main, lambda: ("features.batch_size", load_params().features.batch_size))
