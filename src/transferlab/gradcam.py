"""Where a model looks: Grad-CAM (Captum's ``LayerGradCam``) and feature maps (``LayerActivation``) of a
layer.

Works for torchvision and timm models alike: the default layer is the last one whose output still has a
spatial grid (ResNet ``layer4``, EfficientNet ``bn2`` / ``features``), found by running the model once. The
work of the ``gradcam`` stage (``stages/gradcam.py``) and of ``transferlab gradcam`` and ``feature-maps``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerActivation, LayerAttribution, LayerGradCam
from torch import nn

from . import cores
from .config import MODELS, RuntimeConfig
from .device import resolve_device
from .errors import ModelError
from .figures import plt, save_figure
from .paths import checkpoint_path
from .trained_model import TrainedModel


def last_spatial_layer(model: nn.Module, image_size: int) -> str:
    """Name of the last module (in the order forward passes finish) whose output is an N x C x H x W map
    with H, W > 1."""
    finished: list[tuple[str, tuple]] = []  # (module name, output shape), in the order the modules finish
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: finished.append((name, tuple(getattr(out, "shape", ()))))
        )
        for name, module in model.named_modules()
        if name
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    spatial = [name for name, shape in finished if len(shape) == 4 and min(shape[2:]) > 1]
    if not spatial:
        raise ModelError("the model has no layer with a spatial output: Grad-CAM and feature maps need a CNN")
    return spatial[-1]


def find_layer(trained: TrainedModel, name: str | None) -> tuple[str, nn.Module]:
    """The layer called ``name`` (dotted module path), or the last spatial one."""
    name = name or last_spatial_layer(trained.model, trained.card.eval_image_size)
    try:
        return name, trained.model.get_submodule(name)
    except AttributeError:
        top = ", ".join(n for n, _ in trained.model.named_children())
        raise ModelError(
            f"layer {name!r} is not a module of {trained.card.arch} "
            f"(a dotted module path; top-level modules: {top})"
        ) from None


def require_spatial(layer: str, output: torch.Tensor) -> None:
    if output.dim() != 4 or min(output.shape[2:]) < 2:
        raise ModelError(
            f"layer {layer!r} does not output a grid of feature maps (N x C x H x W, H and W > 1): "
            f"choose a convolutional layer (or leave --layer out for the last spatial one)"
        )


def gradcam(
    trained: TrainedModel,
    images: np.ndarray,
    targets: list[int] | None = None,
    layer: str | None = None,
    size: int | None = None,
) -> np.ndarray:
    """Grad-CAM maps (N x size x size, each scaled to [0, 1]) for ``targets``
    (default: the predicted classes)."""
    name, module = find_layer(trained, layer)
    inputs = trained.inputs(images)
    model = trained.model.eval()
    if targets is None:
        with torch.no_grad():
            targets = model(inputs).argmax(1).tolist()
    cams = LayerGradCam(model, module).attribute(inputs, target=list(targets), relu_attributions=True)
    require_spatial(name, cams)
    side = size or trained.card.eval_image_size
    cams = LayerAttribution.interpolate(cams.detach().float(), (side, side), "bilinear")[:, 0]
    peak = cams.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return (cams / peak).cpu().numpy()


def feature_maps(
    trained: TrainedModel, images: np.ndarray, layer: str | None = None
) -> tuple[str, torch.Tensor]:
    """The chosen layer's output (N x C x h x w) for the images."""
    name, module = find_layer(trained, layer)
    with torch.no_grad():
        maps = LayerActivation(trained.model.eval(), module).attribute(trained.inputs(images))
    require_spatial(name, maps)
    return name, maps.detach().float().cpu()


def show_overlay(
    ax: plt.Axes, image: np.ndarray, cam: np.ndarray | None, title: str, color: str = "black"
) -> None:
    ax.imshow(image)
    if cam is not None:
        ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8, color=color)
    ax.axis("off")


def display_images(trained: TrainedModel, images: np.ndarray, size: int) -> np.ndarray:
    """The evaluation crops the model sees, as uint8 N x size x size x 3 for display."""
    return trained.crop(images, size).permute(0, 2, 3, 1).numpy()


def plot_image_gradcam(
    path: Path,
    trained: TrainedModel,
    image: np.ndarray,
    title: str,
    target: int,
    probability: float,
    layer: str | None = None,
) -> None:
    """The image (1 x S x S x 3) beside its Grad-CAM for class ``target`` (which the model gives
    ``probability``), at 224 px."""
    cam = gradcam(trained, image, [target], layer, size=224)[0]
    shown = display_images(trained, image, 224)[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3.8))
    show_overlay(left, shown, None, title)
    show_overlay(right, shown, cam, f"Grad-CAM for {trained.card.classes[target]} ({probability:.1%})")
    save_figure(fig, path)


def plot_gradcam_of_models(
    path: Path, images: np.ndarray, labels: np.ndarray, runtime: RuntimeConfig
) -> None:
    """The ``gradcam`` stage's panel: every model of the pipeline (``config.MODELS``), on the runtime's
    threads and device."""
    cores.use(runtime.threads)
    device = resolve_device(runtime.device)
    models = {run: TrainedModel.load(checkpoint_path(run), device) for run in MODELS}
    plot_gradcam_panel(path, images, labels, models)


def plot_gradcam_panel(
    path: Path, images: np.ndarray, labels: np.ndarray, models: dict[str, TrainedModel], size: int = 224
) -> None:
    """One row per image: the image, then each model's Grad-CAM for its own prediction
    (green right, red wrong).

    The maps are drawn on the first model's evaluation crop: the runs share the architecture, so the crop too.
    """
    if not len(images):
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.axis("off")
        ax.text(0.5, 0.5, "Grad-CAM panel turned off (evaluate.gradcam_images: 0)", ha="center", va="center")
        save_figure(fig, path, dpi=80)
        return
    first = next(iter(models.values()))
    shown = display_images(first, images, size)
    fig, axes = plt.subplots(
        len(images), 1 + len(models), figsize=(2.4 * (1 + len(models)), 2.5 * len(images)), squeeze=False
    )
    for row, label in enumerate(labels):
        show_overlay(axes[row, 0], shown[row], None, f"true: {first.card.classes[label]}")
    for column, (run, trained) in enumerate(models.items(), start=1):
        probs = trained.probabilities(images, desc=f"grad-cam {run}")
        predictions = probs.argmax(1)
        cams = gradcam(trained, images, predictions.tolist(), size=size)
        for row, (label, predicted) in enumerate(zip(labels, predictions, strict=True)):
            title = f"{run}: {trained.card.classes[predicted]} ({probs[row, predicted]:.0%})"
            show_overlay(
                axes[row, column],
                shown[row],
                cams[row],
                title,
                "tab:green" if predicted == label else "tab:red",
            )
    fig.suptitle("Grad-CAM: where each model looks for the class it predicts", fontsize=10)
    save_figure(fig, path, dpi=80)


def plot_feature_maps(path: Path, image: np.ndarray, maps: torch.Tensor, layer: str, count: int = 16) -> None:
    """The input and the ``count`` channels of the layer with the highest mean activation."""
    strongest = maps.mean((1, 2)).argsort(descending=True)[:count]
    columns = 4
    rows = 1 + -(-len(strongest) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input", fontsize=8)
    for ax, channel in zip(axes.flat[columns:], strongest.tolist(), strict=False):
        ax.imshow(maps[channel].numpy(), cmap="viridis")
        ax.set_title(f"channel {channel}", fontsize=8)
    fig.suptitle(
        f"feature maps of {layer} ({maps.shape[0]} channels, {maps.shape[1]}x{maps.shape[2]}): "
        f"strongest {len(strongest)}",
        fontsize=9,
    )
    save_figure(fig, path, dpi=90)
