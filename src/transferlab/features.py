"""Stage ``features``: the pretrained network's pooled features of every split, computed once.

    python -m transferlab.features

What the classifier head receives (the pooled backbone features) for the train, validation and test
images at ``features.image_size``, and for their mirror images: ``data/features/<split>.npy`` (float32,
2 views x N x D: the evaluation crop, then its mirror image). ``network.pt`` keeps the network they came
from (its weights with a fresh head, the head's name, its preprocessing), so that ``train_probe`` makes a
full checkpoint without building the model again, and ``features.json`` says what they are. The linear
probe fits on the train and validation features and is scored on the test features (no second pass of the
backbone); ``feature_extract`` training without augmentation trains its head on them too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import Params, load_params
from .fileio import atomic_dir, write_json
from .paths import FEATURES_DIR, FEATURES_REPORT
from .splits import SPLITS, load_classes, load_split
from .stage import run_stage

log = logging.getLogger("transferlab.features")
VIEWS = ("centre crop", "mirror image")


def extract(params: Params, out: Path) -> dict:
    """Build the network, run it over every split (and the mirror images), write the features into ``out``."""
    import numpy as np
    import torch

    from .checkpoint import save_torch_file
    from .device import resolve_device
    from .inference import predict_views
    from .models import build_model, linear_head

    cfg, arch, weights, runtime = params.features, params.model.arch, params.model.weights, params.runtime
    classes = load_classes()
    torch.manual_seed(cfg.seed)  # the fresh head and, with model.weights: none, the whole network
    model, head_name, prep = build_model(arch, weights, len(classes))
    head = linear_head(model, head_name)
    model.to(resolve_device(runtime.device), memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format)
    counts = {}
    for split in SPLITS:
        started = time.perf_counter()
        images, _ = load_split(split)
        views = predict_views(model, images, prep, cfg.image_size, cfg.batch_size, runtime.channels_last, f"features {split}", head, flip=True)
        np.save(out / f"{split}.npy", views.numpy())
        counts[split] = len(images)
        log.info("%s: %d images and their mirror images in %.1f s", split, len(images), time.perf_counter() - started)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_torch_file(out / "network.pt", {"model": state, "head": head_name, "preprocessing": prep.as_dict()})
    return {
        "arch": arch, "weights": weights, "image_size": cfg.image_size, "seed": cfg.seed, "views": list(VIEWS),
        "dim": head.in_features, "classes": len(classes), "images": counts, "cache_size": images.shape[1],
    }


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    log.info(
        "features of %s (weights %s) at %d px: the train, val and test images and their mirror images",
        params.model.arch, params.model.weights, params.features.image_size,
    )
    with atomic_dir(FEATURES_DIR) as out:
        info = extract(params, out)
        write_json(out / "features.json", info)
    write_json(FEATURES_REPORT, {**info["images"], "wall_time_s": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    run_stage("features", main, lambda: ("features.batch_size", load_params().features.batch_size))
