"""Stage ``features``: the pretrained network's pooled features of every split, computed once.

    python -m transferlab.stages.features

What the classifier head receives (the pooled backbone features) for the train, validation and test
images at ``features.image_size``, and for their mirror images: ``data/features/<split>.npy`` (float32,
views x N x D: the evaluation crop, then its mirror image, then for the train and validation images
``features.train_crops`` random resized crops, each mirrored at random: more training samples for the
probe). ``network.pt`` keeps the network they came from (its weights with a fresh head, the head's name,
its preprocessing), so that ``train_probe`` makes a full checkpoint without building the model again, and
``features.json`` says what they are. The linear
probe fits on the train and validation features and is scored on the test features (no second pass of the
backbone); ``feature_extract`` training without augmentation trains its head on them too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..config import Params, load_params
from ..entrypoint import run_stage
from ..fileio import atomic_dir, write_json
from ..paths import FEATURES_DIR, FEATURES_REPORT
from ..splits import SPLITS, load_classes, load_split

log = logging.getLogger("transferlab.stages.features")
VIEWS = ("centre crop", "mirror image")


def random_crops(images, count: int, scale_min: float, seed: int):
    """``count`` random resized crops of each cached image (uint8 N x S x S x 3, each crop at the cache's
    size S, so that the evaluation crop of it is taken as of any cached image), mirrored at random; yields
    one array per crop."""
    import numpy as np
    import torch
    from torchvision.transforms import v2

    crop = v2.Compose(
        [
            v2.RandomResizedCrop(images.shape[1], scale=(scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    )
    torch.manual_seed(seed)  # v2 transforms draw from torch's global generator
    for _ in range(count):
        yield np.stack(
            [
                crop(torch.from_numpy(np.array(image)).permute(2, 0, 1)).permute(1, 2, 0).numpy()
                for image in images
            ]
        )


def extract(params: Params, out: Path) -> dict:
    """Build the network, run it over every split (and the mirror images), write the features into ``out``."""
    import numpy as np
    import torch

    from .. import cores
    from ..checkpoint import save_torch_file
    from ..device import resolve_device
    from ..inference import predict_views
    from ..models import build_model, linear_head

    cfg, arch, weights, runtime = params.features, params.model.arch, params.model.weights, params.runtime
    threads = cores.use(runtime.threads)
    classes = load_classes()
    torch.manual_seed(cfg.seed)  # the fresh head and, with model.weights: none, the whole network
    model, head_name, prep = build_model(arch, weights, len(classes), cfg.layers)
    head = linear_head(model, head_name)
    model.to(
        resolve_device(runtime.device),
        memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format,
    )
    counts, views_of = {}, {}
    for split in SPLITS:
        started = time.perf_counter()
        images, _ = load_split(split)
        views = [
            predict_views(
                model,
                images,
                prep,
                cfg.image_size,
                cfg.batch_size,
                runtime.channels_last,
                f"features {split}",
                head,
                flip=True,
            )
        ]
        crops = cfg.train_crops if split != "test" and len(images) else 0
        for index, cropped in enumerate(
            random_crops(images, crops, cfg.crop_scale_min, cfg.seed + SPLITS.index(split))
        ):
            desc = f"features {split}, random crop {index + 1}/{crops}"
            views.append(
                predict_views(
                    model, cropped, prep, cfg.image_size, cfg.batch_size, runtime.channels_last, desc, head
                )
            )
        np.save(out / f"{split}.npy", torch.cat(views).numpy())
        counts[split], views_of[split] = (
            len(images),
            [*VIEWS, *(f"random crop {i + 1}" for i in range(crops))],
        )
        log.info(
            "%s: %d images, %d views in %.1f s",
            split,
            len(images),
            len(views_of[split]),
            time.perf_counter() - started,
        )
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_torch_file(
        out / "network.pt",
        {"model": state, "head": head_name, "layers": cfg.layers, "preprocessing": prep.as_dict()},
    )
    return {
        "arch": arch,
        "weights": weights,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "views": views_of,
        "dim": head.in_features,
        "layers": cfg.layers,
        "classes": len(classes),
        "images": counts,
        "cache_size": images.shape[1],
        "threads": threads,
    }


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    log.info(
        "features of %s (weights %s) at %d px: the train, val and test images and their mirror images",
        params.model.arch,
        params.model.weights,
        params.features.image_size,
    )
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
