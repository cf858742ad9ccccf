"""A trained model as ``evaluate``, ``predict``, Grad-CAM and export use it: built from its model file (its
weights and its card) alone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import read_model
from .device import resolve_device
from .errors import ModelError
from .inference import predict_logits
from .inputs import eval_resize, normalize
from .model_card import ModelCard
from .models import build_model


def refuse_broken_weights(path: Path, state: dict) -> None:
    broken = [key for key, value in state.items() if value.is_floating_point() and not value.isfinite().all()]
    if broken:
        raise ModelError(
            f"{path} holds NaN or infinite weights ({broken[0]}, {len(broken)} tensor(s) in all): "
            "it comes from a run that diverged; train it again with a lower learning rate"
        )


@dataclass
class TrainedModel:
    model: nn.Module
    path: Path
    card: ModelCard

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> TrainedModel:
        path = Path(path)
        if not path.is_file():
            raise ModelError(
                f"no trained model at {path}: "
                "give the model.pt that a training stage wrote (data/models/<run>/model.pt)"
            )
        card, state = read_model(path)
        refuse_broken_weights(path, state)
        model, _, _ = build_model(card.arch, "none", len(card.classes), card.layers)
        model.load_state_dict(state)
        return cls(model.eval().to(device or resolve_device()), path, card)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def crop(self, images: np.ndarray, size: int | None = None) -> torch.Tensor:
        """The evaluation crop (uint8 N x 3 x S x S) of cached images (uint8 N x H x W x 3), at the model's
        size, or at ``size`` for a picture (Grad-CAM, feature maps: upsampled if need be)."""
        batch = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)  # a copy: the cache is read-only
        picture = size is not None
        size = size or self.card.eval_image_size
        return eval_resize(size, self.card.preprocessing, images.shape[1], upsample=picture)(batch)

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """Normalised model inputs, on the model's device."""
        return normalize(self.crop(images).to(self.device), self.card.preprocessing)

    def probabilities(
        self, images: np.ndarray, batch_size: int = 64, desc: str = "predict", tta: str = "none"
    ) -> np.ndarray:
        """Class probabilities; ``tta`` "flip" averages the logits of each image and its mirror image."""
        logits = predict_logits(
            self.model, images, self.card.eval_input, batch_size, desc, flip=tta == "flip"
        )
        if not logits.isfinite().all():
            raise ModelError(
                f"{self.path} gives NaN or infinite outputs: it is not a usable model; "
                "train it again with a lower learning rate"
            )
        return logits.softmax(1).numpy()
