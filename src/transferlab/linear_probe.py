"""The linear probe: a multinomial logistic regression (scikit-learn, L-BFGS, on standardised features)
fitted on frozen features for every C, the best C on validation kept, and the fitted weights written as the
features network's new head (a ``model.pt`` like the trained ones). The ``train_probe`` stage and the
backbone study use it."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, ProbeConfig
from .errors import ModelError
from .paths import FEATURES_DIR, checkpoint_path
from .splits import features_info, load_classes, load_features, load_split
from .subsets import Subset

log = logging.getLogger("transferlab.stages.probe")


@dataclass
class LinearHead:
    """A fitted classifier on raw features: logits = features @ weight.T + bias."""

    weight: np.ndarray  # classes x features
    bias: np.ndarray  # classes

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias


def fit_head(
    features: np.ndarray, labels: np.ndarray, num_classes: int, C: float, max_iter: int
) -> LinearHead:
    """Multinomial logistic regression on standardised features, the standardisation folded into the
    weights."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features)
    classifier = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(features), labels)
    if not np.array_equal(classifier.classes_, np.arange(num_classes)):
        raise ModelError(
            f"the probe's training images cover {len(classifier.classes_)} of the {num_classes} classes"
        )
    weight, bias = (
        classifier.coef_ / scaler.scale_,
        classifier.intercept_ - (classifier.coef_ / scaler.scale_) @ scaler.mean_,
    )
    if num_classes == 2:  # scikit-learn fits one logit (class 1 vs 0): the same softmax as -z/2, +z/2
        weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    return LinearHead(weight.astype(np.float32), bias.astype(np.float32))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def choose_c(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    cfg: ProbeConfig,
) -> tuple[LinearHead, dict, list[dict]]:
    """Fit one head per C; the best validation accuracy wins, ties go to the lower validation loss.

    ``val`` features are those the head scores (flip TTA: the mean of both views: the same logits, the head
    being linear).
    Returns the winning head (fitted on ``train`` only), its result and every C's result.
    """
    results, heads = [], []
    for C in cfg.C:
        started = time.perf_counter()
        head = fit_head(*train, num_classes, C, cfg.max_iter)
        result = {"C": C, "fit_time_s": round(time.perf_counter() - started, 1)}
        if len(val[1]):
            logits = head.logits(val[0]).astype(np.float64)
            result["val_acc"] = float((logits.argmax(1) == val[1]).mean())
            result["val_loss"] = float(-log_softmax(logits)[np.arange(len(val[1])), val[1]].mean())
        log.info("C %g: %s", C, result)
        results.append(result)
        heads.append(head)
    best = max(
        range(len(results)), key=lambda i: (results[i].get("val_acc", 0.0), -results[i].get("val_loss", 0.0))
    )
    return heads[best], results[best], results


def as_samples(features: np.ndarray, labels: np.ndarray, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Training samples, every view a sample of its own: the centre crops, with ``flip`` the mirror images
    too, and the random crops the features stage drew (``features.train_crops``)."""
    views = np.concatenate([features[:2] if flip else features[:1], features[2:]])
    return views.reshape(-1, views.shape[-1]), np.tile(labels, len(views))


def scored(features: np.ndarray, flip: bool) -> np.ndarray:
    """What the head scores for each image: the mean of both views' features with ``flip`` (flip TTA),
    else the centre crop."""
    return features[:2].mean(0) if flip else features[0]


def save_probe(
    name: str,
    head: LinearHead,
    info: dict,
    classes: list[str],
    cfg: ProbeConfig,
    channels_last: bool,
    **extra,
) -> None:
    """The features network with the fitted head: a model file like the trained models', whose card
    records ``extra`` (the chosen C, its validation accuracy) besides the features' layers (torch imported
    here)."""
    import torch

    from .checkpoint import load_torch_file, write_model
    from .inputs import Preprocessing
    from .model_card import ModelCard

    network = load_torch_file(FEATURES_DIR / "network.pt")
    state = dict(network["model"])
    state[f"{network['head']}.weight"], state[f"{network['head']}.bias"] = (
        torch.from_numpy(head.weight),
        torch.from_numpy(head.bias),
    )
    card = ModelCard(
        run=name,
        mode="linear_probe",
        arch=info["arch"],
        weights=info["weights"],
        classes=classes,
        head=network["head"],
        preprocessing=Preprocessing.from_dict(network["preprocessing"]),
        cache_size=info["cache_size"],
        eval_image_size=info["image_size"],
        channels_last=channels_last,
        config={**dataclasses.asdict(cfg), "image_size": info["image_size"]},
        extra={"layers": network["layers"], **extra},
    )
    write_model(checkpoint_path(name), card, state)


def fit_probe(
    cfg: ProbeConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    num_classes: int,
) -> tuple[LinearHead, LinearHead, dict, list[dict], int]:
    """Choose C on validation; with ``probe.train_on_val`` refit it on train + validation.

    ``train``/``val``: (features views x N x D, labels). Returns the head to keep, the head fitted on the
    train split only (where LP-FT's holdout twin starts), the chosen C's scores, every C's results and the
    number of training images the kept head saw."""
    (train_features, train_labels), (val_features, val_labels) = train, val
    on_train, chosen, results = choose_c(
        as_samples(train_features, train_labels, cfg.flip),
        (scored(val_features, cfg.flip), val_labels),
        num_classes,
        cfg,
    )
    if not (cfg.train_on_val and len(val_labels)):
        return on_train, on_train, chosen, results, len(train_labels)
    features = np.concatenate([train_features, val_features], axis=1)
    labels = np.concatenate([train_labels, val_labels])
    fitted = fit_head(*as_samples(features, labels, cfg.flip), num_classes, chosen["C"], cfg.max_iter)
    return fitted, on_train, chosen, results, len(labels)


def checked_features(model: ModelConfig) -> dict:
    """What the frozen features are (:func:`splits.features_info`), checked to be of ``model.*``."""
    info = features_info()
    if (info["arch"], info["weights"]) != (model.arch, model.weights):
        raise ModelError(
            f"the features in {FEATURES_DIR} are of {info['arch']} (weights {info['weights']}), "
            "not model.*: re-run the features stage"
        )
    return info


def fit_subset(cfg: ProbeConfig, model: ModelConfig, subset: Subset, C: float, channels_last: bool) -> None:
    """The probe of a point of the data-efficiency curve: fitted with ``C`` on the subset's train features
    and saved under ``subset.run("probe")``, where the fine-tuned model's point of the same subset starts."""
    info, classes, labels = checked_features(model), load_classes(), load_split("train")[1]
    rows = subset.rows(labels)
    features = np.asarray(load_features("train"))[:, rows]
    head = fit_head(*as_samples(features, labels[rows], cfg.flip), len(classes), C, cfg.max_iter)
    save_probe(subset.run("probe"), head, info, classes, cfg, channels_last, C=C)
