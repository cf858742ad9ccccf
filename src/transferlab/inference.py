"""Run a model over cached images: shared by validation during training and by ``evaluate``."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import eval_batches, eval_resize, normalize
from .models import Preprocessing


@torch.inference_mode()
def predict_views(
    model: nn.Module,
    images: np.ndarray,
    prep: Preprocessing,
    image_size: int,
    batch_size: int,
    channels_last: bool = True,
    desc: str = "predict",
    inputs_of: nn.Module | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Logits (views x N x classes, on the CPU) of the centre-cropped images at ``image_size``, computed where the model is.

    The views are the evaluation crop and, with ``flip``, its mirror image. With ``inputs_of`` (the classifier
    head), return what that module receives instead: the backbone's features.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    transform = eval_resize(image_size, prep, images.shape[1])
    outputs = []
    captured = []
    hook = inputs_of.register_forward_pre_hook(lambda module, args: captured.append(args[0])) if inputs_of else None
    total = (len(images) + batch_size - 1) // batch_size
    try:
        for batch in tqdm(eval_batches(images, transform, batch_size), total=total, desc=desc, leave=False):
            views = []
            for view in (batch, batch.flip(3)) if flip else (batch,):
                logits = model(normalize(view.to(device), prep, channels_last))
                views.append((captured.pop() if hook else logits).float().cpu())
            outputs.append(torch.stack(views))
    finally:
        if hook:
            hook.remove()
        model.train(was_training)
    return torch.cat(outputs, dim=1) if outputs else torch.empty(2 if flip else 1, 0, 0)  # no images: no outputs


def predict_logits(model: nn.Module, images: np.ndarray, prep: Preprocessing, image_size: int, batch_size: int, channels_last: bool = True,
                   desc: str = "predict", inputs_of: nn.Module | None = None, flip: bool = False) -> torch.Tensor:
    """Logits (N x classes) as :func:`predict_views`; with ``flip`` (test-time augmentation) the mean over both views.

    For a linear head the mean of the logits is the head applied to the mean features, so a linear probe
    evaluated with flip TTA sees exactly the flip-averaged features it was chosen on.
    """
    return predict_views(model, images, prep, image_size, batch_size, channels_last, desc, inputs_of, flip).mean(0)
