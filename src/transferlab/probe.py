"""Stage ``train_probe``: a linear probe, a logistic regression on the frozen features.

    python -m transferlab.probe

It reads what the ``features`` stage computed once (the pooled backbone features of every split and of
their mirror images), so an experiment on ``probe.C`` takes seconds. With ``probe.flip`` a mirrored
training image is one more training sample, and a validation image is scored by the mean of both views'
logits, as ``evaluate.tta: flip`` scores test images. A multinomial logistic regression (scikit-learn,
L-BFGS, on standardised features) is fitted for every C in ``probe.C``; the C with the best validation
accuracy is kept and, with ``probe.train_on_val``, refitted on train + validation. The fitted weights
become the features network's new head, so ``data/models/probe/model.pt`` is a checkpoint like the
trained ones (evaluate, predict and export use it) and ``train.init_head: probe`` starts fine-tuning from
it (LP-FT). ``data/models/probe_holdout/model.pt``, the head with the chosen C fitted on the train split
only, is where the fine-tuned model's holdout twin starts. ``metrics/train_probe/`` holds the validation
accuracy of every C (regularization.csv), the settings and a summary.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np
from dvclive import Live

from .config import ProbeConfig, load_params
from .errors import ModelError
from .fileio import atomic_dir, write_csv
from .paths import FEATURES_DIR, checkpoint_path, holdout, train_dir
from .splits import features_info, load_classes, load_features, load_split
from .stage import run_stage

log = logging.getLogger("transferlab.probe")
RUN = "probe"


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
    """The features network with the fitted head: a checkpoint like the trained models'
    (torch imported here)."""
    import torch

    from .checkpoint import load_torch_file, save_checkpoint

    network = load_torch_file(FEATURES_DIR / "network.pt")
    state = dict(network["model"])
    state[f"{network['head']}.weight"], state[f"{network['head']}.bias"] = (
        torch.from_numpy(head.weight),
        torch.from_numpy(head.bias),
    )
    save_checkpoint(
        checkpoint_path(name),
        state,
        run=name,
        mode="linear_probe",
        arch=info["arch"],
        weights=info["weights"],
        classes=classes,
        head=network["head"],
        preprocessing=network["preprocessing"],
        cache_size=info["cache_size"],
        eval_image_size=info["image_size"],
        channels_last=channels_last,
        config={**dataclasses.asdict(cfg), "image_size": info["image_size"]},
        layers=network["layers"],
        **extra,
    )


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    cfg, info = params.probe, features_info()
    if (info["arch"], info["weights"]) != (params.model.arch, params.model.weights):
        raise ModelError(
            f"the features in {FEATURES_DIR} are of {info['arch']} (weights {info['weights']}), "
            "not model.*: re-run the features stage"
        )
    classes = load_classes()
    (_, train_labels), (_, val_labels) = load_split("train"), load_split("val")
    log.info(
        "linear probe on %s's %d-dim features: C in %s, chosen on %d validation images",
        info["arch"],
        info["dim"],
        cfg.C,
        len(val_labels),
    )
    from . import cores  # torch, for the BLAS pools scikit-learn computes in

    threads = cores.use(params.runtime.threads)
    train_features, val_features = np.asarray(load_features("train")), np.asarray(load_features("val"))

    val = (scored(val_features, cfg.flip), val_labels)
    on_train, chosen, results = choose_c(
        as_samples(train_features, train_labels, cfg.flip), val, len(classes), cfg
    )
    best_c, fitted = chosen["C"], on_train
    if cfg.train_on_val and len(val_labels):
        train_features, train_labels = (
            np.concatenate([train_features, val_features], axis=1),
            np.concatenate([train_labels, val_labels]),
        )
        fitted = fit_head(
            *as_samples(train_features, train_labels, cfg.flip), len(classes), best_c, cfg.max_iter
        )
    # LP-FT's holdout twin starts from the one fitted on train only
    for name, head in ((RUN, fitted), (holdout(RUN), on_train)):
        save_probe(
            name,
            head,
            info,
            classes,
            cfg,
            params.runtime.channels_last,
            C=best_c,
            val_acc=chosen.get("val_acc"),
        )
    with atomic_dir(train_dir(RUN)) as out:
        with Live(str(out), dvcyaml=False, save_dvc_exp=False) as live:
            live.log_params(
                {
                    "run": RUN,
                    "mode": "linear_probe",
                    "arch": info["arch"],
                    "weights": info["weights"],
                    "image_size": info["image_size"],
                    **dataclasses.asdict(cfg),
                }
            )
            if "val_acc" in chosen:
                live.summary["best/val_acc"] = chosen["val_acc"]
            live.summary["best/C"] = best_c
            live.summary["train_images"] = int(len(train_labels))
            live.summary["threads"] = threads
            live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
        keys = ["C", "val_acc", "val_loss", "fit_time_s"] if len(val_labels) else ["C", "fit_time_s"]
        write_csv(out / "regularization.csv", keys, ([r[k] for k in keys] for r in results))
    log.info(
        "probe: C %g chosen on validation (%s), refitted on %s",
        best_c,
        chosen,
        "train + val" if cfg.train_on_val else "train",
    )


if __name__ == "__main__":
    run_stage("train probe", main)
