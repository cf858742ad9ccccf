"""Turn the prepared uint8 images into model inputs: augmentation, the evaluation crop, normalisation,
batches."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import RandomSampler, WeightedRandomSampler
from torchvision.transforms import InterpolationMode, v2

from .config import TrainConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """How the weights expect their input: taken from the weights' metadata, never hard-coded."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"
    crop_pct: float  # fraction of the (square) image kept by the evaluation centre crop

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(tuple(data["mean"]), tuple(data["std"]), data["interpolation"], data["crop_pct"])


def _interpolation(prep: Preprocessing) -> InterpolationMode:
    return InterpolationMode(prep.interpolation)


def _per_image_augmentation(cfg: TrainConfig, prep: Preprocessing) -> v2.Transform:
    interpolation = _interpolation(prep)
    warp = InterpolationMode.BILINEAR  # rotation and auto-augment ops on tensors refuse bicubic
    steps = [
        v2.RandomResizedCrop(
            cfg.image_size, scale=(cfg.crop_scale_min, 1.0), interpolation=interpolation, antialias=True
        )
    ]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if cfg.rotation_degrees:
        steps.append(v2.RandomRotation(cfg.rotation_degrees, interpolation=warp))
    if cfg.color_jitter:
        steps.append(
            v2.ColorJitter(
                brightness=cfg.color_jitter, contrast=cfg.color_jitter, saturation=cfg.color_jitter
            )
        )
    if cfg.auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(interpolation=warp))
    elif cfg.auto_augment == "randaugment":
        steps.append(v2.RandAugment(interpolation=warp))
    return v2.Compose(steps)


def _batch_mixing(cfg: TrainConfig, num_classes: int) -> v2.Transform | None:
    mixers = [v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes)] if cfg.mixup_alpha else []
    if cfg.cutmix_alpha:
        mixers.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None


class BatchAugmenter:
    """Training inputs from a uint8 NCHW batch already on the training device (so a GPU does the work).

    Random crops, flips, rotation, colour jitter, TrivialAugment/RandAugment and random erasing are drawn
    per image (a v2 transform given a whole batch would draw one set of parameters for all of it); MixUp
    and CutMix mix the batch and turn the labels into class probabilities. With ``augment: false`` the
    batch gets the deterministic evaluation crop at ``image_size``.
    """

    def __init__(
        self, cfg: TrainConfig, prep: Preprocessing, num_classes: int, cache_size: int, channels_last: bool
    ):
        self.prep, self.channels_last = prep, channels_last
        self.per_image = _per_image_augmentation(cfg, prep) if cfg.augment else None
        self.whole_batch = None if cfg.augment else eval_resize(cfg.image_size, prep, cache_size)
        # erasing comes after normalisation, so an erased patch is the dataset mean (0),
        # as in timm and torchvision
        self.erasing = v2.RandomErasing(p=cfg.random_erasing) if cfg.augment and cfg.random_erasing else None
        self.mixing = _batch_mixing(cfg, num_classes) if cfg.augment else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float batch, targets: class indices, or class probabilities after MixUp/CutMix)."""
        if self.per_image is not None:
            images = torch.stack([self.per_image(image) for image in images])
        else:
            images = self.whole_batch(images)
        images = normalize(images, self.prep)
        if self.erasing is not None:
            images = torch.stack([self.erasing(image) for image in images])
        if self.mixing is not None:  # on float images: a mix of uint8 images would be rounded
            images, labels = self.mixing(images, labels)
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        ), labels


def needed_cache(size: int, prep: Preprocessing) -> int:
    """The smallest cached square whose evaluation crop (its centre ``crop_pct``) holds ``size`` pixels."""
    return math.ceil(size / prep.crop_pct - 1e-9)


def check_cache(size: int, prep: Preprocessing, cache_size: int) -> None:
    """Refuse an evaluation crop that would upsample the cached images (a silent loss of detail)."""
    if cache_size < needed_cache(size, prep):
        raise ConfigError(
            f"data.cache_size: the prepared images are {cache_size} px, but a {size} px evaluation crop "
            f"(the centre {prep.crop_pct:g} of the image, as the weights expect) needs at least "
            f"{needed_cache(size, prep)} px: raise data.cache_size to {needed_cache(size, prep)} or more "
            "(prepare runs again), or use a smaller image size"
        )


def eval_resize(size: int, prep: Preprocessing, cache_size: int, upsample: bool = False) -> v2.Transform:
    """The standard evaluation crop: keep the centre ``crop_pct`` of the image, resize it to ``size``
    (larger than the crop only with ``upsample``: pictures, never a score)."""
    if not upsample:
        check_cache(size, prep, cache_size)
    return v2.Compose(
        [
            v2.CenterCrop(round(cache_size * prep.crop_pct)),
            v2.Resize((size, size), interpolation=_interpolation(prep), antialias=True),
        ]
    )


def normalize(batch: torch.Tensor, prep: Preprocessing, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW batch -> normalised float batch, in the memory format the model runs fastest in."""
    batch = v2.functional.normalize(
        v2.functional.to_dtype(batch, torch.float32, scale=True), list(prep.mean), list(prep.std)
    )
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def epoch_order(labels: np.ndarray, generator: torch.Generator, balanced: bool) -> torch.Tensor:
    """The sample indices of one epoch: a shuffle, or (balanced) a draw with every class equally likely."""
    if balanced:
        counts = np.bincount(labels)
        weights = torch.from_numpy(1.0 / counts[labels])
        sampler = WeightedRandomSampler(
            weights, num_samples=len(labels), replacement=True, generator=generator
        )
    else:
        sampler = RandomSampler(range(len(labels)), generator=generator)
    return torch.tensor(list(sampler), dtype=torch.int64)


def batch_slices(count: int, batch_size: int) -> list[slice]:
    """Batches of an epoch; a ragged last batch is dropped (noisy batch-norm statistics) unless it is the
    only one."""
    full = count // batch_size if count > batch_size else 1
    return [slice(i * batch_size, min((i + 1) * batch_size, count)) for i in range(full)]


def eval_batches(images: np.ndarray, transform: v2.Transform, batch_size: int):
    """Deterministic evaluation batches: the resize runs on whole batches, not image by image."""
    for start in range(0, len(images), batch_size):
        yield transform(torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2))
