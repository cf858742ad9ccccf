"""The pretrained network's pooled features (what its classifier head receives) of every split, the work
of the ``features`` stage (``stages/features.py``, which says what they are and where they go).

Each split's features are views x N x D: the evaluation crop, its mirror image and, for the train and
validation images, ``features.train_crops`` random resized crops, each mirrored at random.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from . import cores
from .checkpoint import save_torch_file
from .config import FeaturesConfig, Params
from .device import resolve_device
from .inference import predict_views
from .inputs import Preprocessing
from .model_card import EvalInput
from .models import build_model, linear_head
from .splits import SPLITS, load_classes, load_split

log = logging.getLogger("transferlab.stages.features")
VIEWS = ("centre crop", "mirror image")


def random_crops(images: np.ndarray, count: int, scale_min: float, seed: int):
    """``count`` random resized crops of each cached image (uint8 N x S x S x 3, each crop at the cache's
    size S, so that the evaluation crop of it is taken as of any cached image), mirrored at random; yields
    one array per crop."""
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


@dataclass(frozen=True)
class Network:
    """The network the features come from, where it runs (its ``head`` receives them), and the settings
    (``features:``) it computes them with."""

    model: nn.Module
    head_name: str
    head: nn.Linear
    prep: Preprocessing
    cfg: FeaturesConfig
    channels_last: bool

    def features(self, images: np.ndarray, desc: str, flip: bool = False) -> torch.Tensor:
        """What the head receives for the evaluation crop of ``images`` (with ``flip``, its mirror's too)."""
        cfg = self.cfg
        eval_input = EvalInput(self.prep, cfg.image_size, self.channels_last)
        return predict_views(
            self.model, images, eval_input, cfg.batch_size, desc, inputs_of=self.head, flip=flip
        )

    def save(self, path: Path) -> None:
        """Its weights (with the fresh head), the head's name, the tapped layers and its preprocessing."""
        state = {key: value.detach().cpu() for key, value in self.model.state_dict().items()}
        save_torch_file(
            path,
            {
                "model": state,
                "head": self.head_name,
                "layers": self.cfg.layers,
                "preprocessing": self.prep.as_dict(),
            },
        )


def build_network(params: Params, classes: int) -> Network:
    """The network with a fresh head (seeded by ``features.seed``), on the runtime's device."""
    cfg, runtime = params.features, params.runtime
    torch.manual_seed(cfg.seed)  # the fresh head and, with model.weights: none, the whole network
    model, head_name, prep = build_model(params.model.arch, params.model.weights, classes, cfg.layers)
    head = linear_head(model, head_name)
    model.to(
        resolve_device(runtime.device),
        memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format,
    )
    return Network(model, head_name, head, prep, cfg, runtime.channels_last)


def split_features(network: Network, images: np.ndarray, split: str) -> tuple[np.ndarray, list[str]]:
    """One split's features (views x N x D) and the names of its views."""
    cfg = network.cfg
    features = [network.features(images, f"features {split}", flip=True)]
    crops = cfg.train_crops if split != "test" and len(images) else 0
    for index, cropped in enumerate(
        random_crops(images, crops, cfg.crop_scale_min, cfg.seed + SPLITS.index(split))
    ):
        features.append(network.features(cropped, f"features {split}, random crop {index + 1}/{crops}"))
    return torch.cat(features).numpy(), [*VIEWS, *(f"random crop {i + 1}" for i in range(crops))]


def extract(params: Params, out: Path) -> dict:
    """Build the network, run it over every split (and the mirror images), write the features into ``out``."""
    cfg = params.features
    threads = cores.use(params.runtime.threads)
    classes = load_classes()
    network = build_network(params, len(classes))
    counts, views_of = {}, {}
    for split in SPLITS:
        started = time.perf_counter()
        images, _ = load_split(split)
        features, views_of[split] = split_features(network, images, split)
        np.save(out / f"{split}.npy", features)
        counts[split] = len(images)
        log.info(
            "%s: %d images, %d views in %.1f s",
            split,
            len(images),
            len(views_of[split]),
            time.perf_counter() - started,
        )
    network.save(out / "network.pt")
    return {
        "arch": params.model.arch,
        "weights": params.model.weights,
        "image_size": cfg.image_size,
        "seed": cfg.seed,
        "views": views_of,
        "dim": network.head.in_features,
        "layers": cfg.layers,
        "classes": len(classes),
        "images": counts,
        "cache_size": images.shape[1],
        "threads": threads,
    }
