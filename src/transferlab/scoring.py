"""A model's test-split probabilities and scores, and the files ``evaluate`` writes of them: the mean
per-class accuracy (the standard Caltech-101 metric), top-k, calibration, per-class scores, confused pairs and
pictures. The ``evaluate`` stage and the data-efficiency curve's points score with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dvclive import Live
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

from .analysis import (
    confused_pairs,
    expected_calibration_error,
    plot_calibration,
    plot_confusion_matrix,
    plot_misclassified,
    topk_accuracies,
)
from .checkpoint import read_model
from .config import EvaluateConfig
from .device import resolve_device
from .errors import ModelError
from .fileio import atomic_dir, write_csv
from .paths import evaluation_dir
from .splits import check_classes, features_info, load_features
from .trained_model import TrainedModel


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, topk: list[int], calibration_bins: int = 15
) -> dict:
    confidence, predictions = probs.max(1), probs.argmax(1)
    return {
        # mean of the per-class accuracies (recalls), the standard Caltech-101 metric
        "mean_per_class_acc": float(balanced_accuracy_score(labels, predictions)),
        **topk_accuracies(labels, probs, topk),
        "ece": expected_calibration_error(confidence, predictions == labels, calibration_bins),
        "test_images": int(len(labels)),
    }


def write_per_class(path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> None:
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=np.arange(len(classes)), zero_division=0
    )
    rows = (
        [name, *(f"{v:.4f}" for v in values), int(n)]
        for name, *values, n in zip(classes, precision, recall, f1, support, strict=True)
    )
    write_csv(path, ["class", "precision", "recall", "f1", "support"], rows)


def write_confused_pairs(path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> None:
    rows = (
        (p.true_class, p.predicted_class, p.count, f"{p.share:.4f}")
        for p in confused_pairs(labels, predictions, classes)
    )
    write_csv(path, ["true_class", "predicted_class", "count", "share_of_true_class"], rows)


def probe_probabilities(path: Path, labels: np.ndarray, classes: list[str], tta: str) -> np.ndarray:
    """The linear probe's test probabilities from the frozen test features: its head applied to them."""
    (card, state), info = read_model(path), features_info()
    check_classes(path, card.classes, classes)
    made_for = (card.arch, card.weights, card.eval_image_size)
    if made_for != (info["arch"], info["weights"], info["image_size"]) or info["images"]["test"] != len(
        labels
    ):
        raise ModelError(
            f"{path} and the frozen features do not belong together: "
            "re-run the features and train_probe stages (dvc repro)"
        )
    weight = state[f"{card.head}.weight"].numpy().astype(np.float64)
    bias = state[f"{card.head}.bias"].numpy().astype(np.float64)
    views = np.asarray(load_features("test"), dtype=np.float64)
    logits = (
        views[:2].mean(0) if tta == "flip" else views[0]
    ) @ weight.T + bias  # linear: the mean of the views' logits
    return softmax(logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return (exp / exp.sum(1, keepdims=True)).astype(np.float32)


def model_probabilities(
    path: Path, images: np.ndarray, classes: list[str], cfg: EvaluateConfig, device: str
) -> tuple[np.ndarray, bool]:
    """A trained model's test probabilities: the network over the test images; and whether its training
    ended at chance."""
    trained = TrainedModel.load(path, resolve_device(device))
    check_classes(path, trained.card.classes, classes)
    return trained.probabilities(
        images, cfg.batch_size, f"test {path.parent.name}", cfg.tta
    ), trained.card.at_chance


def write_results(
    run: str,
    probs: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    cfg: EvaluateConfig,
    extra: dict,
) -> dict:
    """metrics.json, the CSV files and the pictures of one model, in its folder
    (written whole, or not at all)."""
    predictions = probs.argmax(1)
    metrics = {**classification_metrics(labels, probs, cfg.topk, cfg.calibration_bins), **extra}
    with atomic_dir(evaluation_dir(run)) as out:
        with Live(str(out), dvcyaml=False, save_dvc_exp=False) as live:
            for key, value in metrics.items():
                live.summary[key] = value
            names = np.array(classes)
            live.log_sklearn_plot(
                "confusion_matrix",
                names[labels].tolist(),
                names[predictions].tolist(),
                name="confusion_matrix.json",
            )
        write_per_class(out / "per_class.csv", labels, predictions, classes)
        write_confused_pairs(out / "confused_pairs.csv", labels, predictions, classes)
        plot_confusion_matrix(
            out / "confusion_matrix.png", labels, predictions, classes, cfg.confusion_classes, run
        )
        plot_calibration(
            out / "calibration.png",
            probs.max(1),
            predictions == labels,
            cfg.calibration_bins,
            metrics["ece"],
            run,
        )
        plot_misclassified(out / "misclassified.jpg", images, labels, probs, classes, cfg.gallery_size, run)
    return metrics
