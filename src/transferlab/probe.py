"""Stage ``train_probe``: a linear probe, a logistic regression on the frozen pretrained features.

    python -m transferlab.probe

One inference pass gives what the classifier head receives (the pooled backbone features) for the train
and validation images at ``probe.image_size``, and with ``probe.flip`` for their mirror images too: a
mirrored training image is one more training sample, a validation image is scored by the mean of both
views' logits, as ``evaluate.tta: flip`` scores test images. A multinomial logistic regression
(scikit-learn, L-BFGS, on standardised features) is fitted for every C in ``probe.C``; the C with the best validation accuracy is kept and, with ``probe.train_on_val``, refitted
on train + validation. The fitted weights become the model's new head, so ``data/models/probe/model.pt``
is a checkpoint like the trained ones (evaluate, predict and export use it) and ``train.init_head: probe``
starts fine-tuning from it (LP-FT). The features are kept in ``data/models/probe/features.pt``;
``metrics/train_probe/`` holds the validation accuracy of every C (regularization.csv), the settings and
a summary.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from .config import ProbeConfig, load_params
from .data import load_classes, load_split
from .device import resolve_device
from .fileio import atomic_dir, atomic_path, write_csv
from .inference import predict_views
from .models import ModelError, build_model, read_checkpoint
from .paths import checkpoint_path, features_path, train_dir
from .stage import run_stage
from .trained_model import save_checkpoint

log = logging.getLogger("transferlab.probe")
RUN = "probe"


@dataclass
class LinearHead:
    """A fitted classifier on raw features: logits = features @ weight.T + bias."""

    weight: np.ndarray  # classes x features
    bias: np.ndarray  # classes

    def logits(self, features: np.ndarray) -> np.ndarray:
        return features @ self.weight.T + self.bias


def linear_head(model: nn.Module, head_name: str) -> nn.Linear:
    head = model.get_submodule(head_name)
    if not isinstance(head, nn.Linear):
        raise ModelError(f"a linear probe replaces the final Linear layer, but this model's classifier is a {type(head).__name__}")
    return head


def fit_head(features: np.ndarray, labels: np.ndarray, num_classes: int, C: float, max_iter: int) -> LinearHead:
    """Multinomial logistic regression on standardised features, the standardisation folded into the weights."""
    scaler = StandardScaler().fit(features)
    classifier = LogisticRegression(C=C, max_iter=max_iter).fit(scaler.transform(features), labels)
    if not np.array_equal(classifier.classes_, np.arange(num_classes)):
        raise ModelError(f"the probe's training images cover {len(classifier.classes_)} of the {num_classes} classes")
    weight, bias = classifier.coef_ / scaler.scale_, classifier.intercept_ - (classifier.coef_ / scaler.scale_) @ scaler.mean_
    if num_classes == 2:  # scikit-learn fits one logit (class 1 vs 0): the same softmax as -z/2, +z/2
        weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    return LinearHead(weight.astype(np.float32), bias.astype(np.float32))


def choose_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], num_classes: int, cfg: ProbeConfig) -> tuple[float, list[dict]]:
    """Fit one head per C; the best validation accuracy wins, ties go to the lower validation loss.

    ``val`` features are those the head scores (flip TTA: the mean of both views: the same logits, the head being linear).
    """
    results = []
    for C in cfg.C:
        started = time.perf_counter()
        head = fit_head(*train, num_classes, C, cfg.max_iter)
        result = {"C": C, "fit_time_s": round(time.perf_counter() - started, 1)}
        if len(val[1]):
            logits = torch.from_numpy(head.logits(val[0]))
            labels = torch.from_numpy(val[1])
            result["val_acc"] = (logits.argmax(1) == labels).double().mean().item()
            result["val_loss"] = nn.functional.cross_entropy(logits, labels).item()
        log.info("C %g: %s", C, result)
        results.append(result)
    best = max(results, key=lambda r: (r.get("val_acc", 0.0), -r.get("val_loss", 0.0)))
    return best["C"], results


def extract_features(model: nn.Module, head: nn.Module, images: np.ndarray, prep, cfg: ProbeConfig, desc: str) -> np.ndarray:
    """Features (views x N x D): the evaluation crop and, with ``probe.flip``, its mirror image."""
    return predict_views(model, images, prep, cfg.image_size, cfg.batch_size, cfg.channels_last, desc, inputs_of=head, flip=cfg.flip).numpy()


def as_samples(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every view a training sample of its own."""
    return features.reshape(-1, features.shape[-1]), np.tile(labels, len(features))


def start_from_probe(model: nn.Module, arch: str, weights: str, classes: list[str], path: Path | None = None) -> None:
    """Load the fitted probe (its backbone weights and its head) into ``model``: LP-FT's starting point."""
    path = path or checkpoint_path(RUN)
    if not path.is_file():
        raise ModelError(f"train.init_head: probe needs the linear probe at {path}: run its stage first (dvc repro train_probe)")
    checkpoint = read_checkpoint(path)
    made_for = (checkpoint["arch"], checkpoint.get("weights"), checkpoint["classes"])
    if made_for != (arch, weights, classes):
        raise ModelError(
            f"the linear probe at {path} is for {made_for[0]} (weights {made_for[1]}, {len(made_for[2])} classes), "
            f"not {arch} (weights {weights}, {len(classes)} classes): re-run train_probe"
        )
    model.load_state_dict(checkpoint["model"])


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    cfg, arch, weights = params.probe, params.model.arch, params.model.weights
    classes = load_classes()
    (train_images, train_labels), (val_images, val_labels) = load_split("train"), load_split("val")
    torch.manual_seed(cfg.seed)  # the backbone's init, with model.weights: none (a probe of random features)
    model, head_name, prep = build_model(arch, weights, len(classes))
    head = linear_head(model, head_name)
    model.to(resolve_device(cfg.device), memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    train_features = extract_features(model, head, train_images, prep, cfg, "features train")
    val_features = extract_features(model, head, val_images, prep, cfg, "features val")
    feature_time = time.perf_counter() - started
    log.info("features of %d train and %d val images in %.1f s", len(train_labels), len(val_labels), feature_time)
    with atomic_path(features_path(RUN)) as tmp:
        torch.save({"train": train_features, "train_labels": train_labels, "val": val_features, "val_labels": val_labels, "config": dataclasses.asdict(cfg)}, tmp)

    train_samples = as_samples(train_features, train_labels)
    best_c, results = choose_c(train_samples, (val_features.mean(0), val_labels), len(classes), cfg)
    if cfg.train_on_val and len(val_labels):
        train_samples = as_samples(np.concatenate([train_features, val_features], axis=1), np.concatenate([train_labels, val_labels]))
    fitted = fit_head(*train_samples, len(classes), best_c, cfg.max_iter)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(fitted.weight))
        head.bias.copy_(torch.from_numpy(fitted.bias))
    chosen = next(r for r in results if r["C"] == best_c)
    save_checkpoint(
        checkpoint_path(RUN), {k: v.detach().cpu() for k, v in model.state_dict().items()}, run=RUN, mode="linear_probe",
        arch=arch, weights=weights, classes=classes, prep=prep, cache_size=train_images.shape[1], eval_image_size=cfg.image_size,
        channels_last=cfg.channels_last, config=dataclasses.asdict(cfg), C=best_c, val_acc=chosen.get("val_acc"),
    )
    with atomic_dir(train_dir(RUN)) as out:
        with Live(str(out), dvcyaml=False, save_dvc_exp=False) as live:
            live.log_params({"run": RUN, "mode": "linear_probe", "arch": arch, "weights": weights, **dataclasses.asdict(cfg)})
            if "val_acc" in chosen:
                live.summary["best/val_acc"] = chosen["val_acc"]
            live.summary["best/C"] = best_c
            live.summary["train_images"] = int(len(train_labels) + (len(val_labels) if cfg.train_on_val else 0))
            live.summary["feature_time_s"] = round(feature_time, 1)
            live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
        keys = ["C", "val_acc", "val_loss", "fit_time_s"] if len(val_labels) else ["C", "fit_time_s"]
        write_csv(out / "regularization.csv", keys, ([r[k] for k in keys] for r in results))
    log.info("probe: C %g chosen on validation (%s), refitted on %s", best_c, chosen, "train + val" if cfg.train_on_val else "train")


if __name__ == "__main__":
    run_stage("train probe", main, lambda: ("probe.batch_size", load_params().probe.batch_size))
