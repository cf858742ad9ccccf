"""Run a model over cached images: shared by validation during training and by ``evaluate``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import eval_batches, eval_resize, normalize
from .models import Preprocessing


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    prep: Preprocessing,
    image_size: int,
    batch_size: int,
    channels_last: bool = True,
    desc: str = "predict",
) -> torch.Tensor:
    """Logits (N x classes, on the CPU) for the centre-cropped images at ``image_size``, computed where the model is."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    transform = eval_resize(image_size, prep, images.shape[1])
    outputs = []
    total = (len(images) + batch_size - 1) // batch_size
    for batch in tqdm(eval_batches(images, transform, batch_size), total=total, desc=desc, leave=False):
        outputs.append(model(normalize(batch.to(device), prep, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(outputs)
