"""A trained model as ``evaluate``, ``predict``, Grad-CAM and export use it: built from its checkpoint
alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import read_checkpoint
from .device import resolve_device
from .errors import ModelError
from .inference import predict_logits
from .inputs import Preprocessing, eval_resize, normalize
from .models import build_model

REQUIRED_KEYS = ("classes", "arch", "preprocessing", "cache_size", "eval_image_size", "channels_last")


@dataclass
class TrainedModel:
    model: nn.Module
    path: Path
    arch: str
    classes: list[str]
    prep: Preprocessing
    cache_size: int  # images are decoded to this square size (data.cache_size) before the evaluation crop
    image_size: int  # evaluation resolution
    channels_last: bool
    # training ended at chance and the model was kept on purpose (training.LearningCheck): its predictions
    # mean nothing. Probes, and models trained before the check, carry no flag
    at_chance: bool

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> TrainedModel:
        path = Path(path)
        if not path.is_file():
            raise ModelError(
                f"no trained model at {path}: "
                "give the model.pt that a training stage wrote (data/models/<run>/model.pt)"
            )
        checkpoint = read_checkpoint(path)
        missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
        if missing:
            raise ModelError(
                f"{path} lacks {', '.join(missing)}: "
                "it was written by an older version; re-run its training stage"
            )
        broken = [
            key
            for key, value in checkpoint["model"].items()
            if value.is_floating_point() and not value.isfinite().all()
        ]
        if broken:
            raise ModelError(
                f"{path} holds NaN or infinite weights ({broken[0]}, {len(broken)} tensor(s) in all): "
                "it comes from a run that diverged; train it again with a lower learning rate"
            )
        model, _, _ = build_model(
            checkpoint["arch"], "none", len(checkpoint["classes"]), checkpoint.get("layers", [])
        )
        model.load_state_dict(checkpoint["model"])
        return cls(
            model=model.eval().to(device or resolve_device()),
            path=path,
            arch=checkpoint["arch"],
            classes=checkpoint["classes"],
            prep=Preprocessing.from_dict(checkpoint["preprocessing"]),
            cache_size=checkpoint["cache_size"],
            image_size=checkpoint["eval_image_size"],
            channels_last=checkpoint["channels_last"],
            at_chance=checkpoint.get("at_chance", False),
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def crop(self, images: np.ndarray, size: int | None = None) -> torch.Tensor:
        """The evaluation crop (uint8 N x 3 x S x S) of cached images (uint8 N x H x W x 3), at the model's
        size, or at ``size`` for a picture (Grad-CAM, feature maps: upsampled if need be)."""
        batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a copy: the cache is read-only
        return eval_resize(size or self.image_size, self.prep, images.shape[1], upsample=size is not None)(
            batch
        )

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """Normalised model inputs, on the model's device."""
        return normalize(self.crop(images).to(self.device), self.prep)

    def probabilities(
        self, images: np.ndarray, batch_size: int = 64, desc: str = "predict", tta: str = "none"
    ) -> np.ndarray:
        """Class probabilities; ``tta`` "flip" averages the logits of each image and its mirror image."""
        logits = predict_logits(
            self.model,
            images,
            self.prep,
            self.image_size,
            batch_size,
            self.channels_last,
            desc,
            flip=tta == "flip",
        )
        if not logits.isfinite().all():
            raise ModelError(
                f"{self.path} gives NaN or infinite outputs: it is not a usable model; "
                "train it again with a lower learning rate"
            )
        return logits.softmax(1).numpy()
