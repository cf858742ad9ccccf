"""Stage ``evaluate``: the linear probe and both trained models on the test split, and what they got wrong.

Predictions use ``evaluate.tta`` (flip: the mean logits of each image and its mirror image). For each model, ``metrics/test_<run>/`` gets ``metrics.json`` (mean per-class accuracy, the standard
Caltech-101 metric; top-k for each k in ``evaluate.topk``; expected calibration error),
``per_class.csv`` (precision, recall = per-class accuracy, F1, support), ``confused_pairs.csv``
(true -> predicted class, most frequent first), dvclive's interactive confusion matrix, and three
pictures: ``confusion_matrix.png`` (row-normalised, the most confused classes), ``calibration.png``
(reliability diagram, confidence of right and wrong predictions) and ``misclassified.jpg`` (the most
confident mistakes). ``plots/gradcam.jpg`` shows, for a fixed set of test images, where each model looks.
"""

from __future__ import annotations

import logging
import time
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
from .config import MODELS, EvaluateConfig, load_params
from .data import load_classes, load_split
from .explain import plot_gradcam_panel
from .fileio import atomic_dir, write_csv
from .models import ModelError
from .paths import GRADCAM_IMAGE, checkpoint_path, evaluation_dir
from .stage import run_stage
from .trained_model import TrainedModel

log = logging.getLogger("transferlab.evaluate")


def classification_metrics(labels: np.ndarray, probs: np.ndarray, topk: list[int], calibration_bins: int = 15) -> dict:
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
    rows = ([name, *(f"{v:.4f}" for v in values), int(n)] for name, *values, n in zip(classes, precision, recall, f1, support))
    write_csv(path, ["class", "precision", "recall", "f1", "support"], rows)


def write_confused_pairs(path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> None:
    rows = ((p.true_class, p.predicted_class, p.count, f"{p.share:.4f}") for p in confused_pairs(labels, predictions, classes))
    write_csv(path, ["true_class", "predicted_class", "count", "share_of_true_class"], rows)


def evaluate_model(run: str, trained: TrainedModel, images: np.ndarray, labels: np.ndarray, cfg: EvaluateConfig) -> dict:
    started = time.perf_counter()
    classes = trained.classes
    probs = trained.probabilities(images, cfg.batch_size, f"test {run}", cfg.tta)
    predictions = probs.argmax(1)
    metrics = {**classification_metrics(labels, probs, cfg.topk, cfg.calibration_bins), "wall_time_s": round(time.perf_counter() - started, 1)}
    with atomic_dir(evaluation_dir(run)) as out:  # one model's results appear together or not at all
        with Live(str(out), dvcyaml=False, save_dvc_exp=False) as live:
            for key, value in metrics.items():
                live.summary[key] = value
            names = np.array(classes)
            live.log_sklearn_plot("confusion_matrix", names[labels].tolist(), names[predictions].tolist(), name="confusion_matrix.json")
        write_per_class(out / "per_class.csv", labels, predictions, classes)
        write_confused_pairs(out / "confused_pairs.csv", labels, predictions, classes)
        plot_confusion_matrix(out / "confusion_matrix.png", labels, predictions, classes, cfg.confusion_classes, run)
        plot_calibration(out / "calibration.png", probs.max(1), predictions == labels, cfg.calibration_bins, metrics["ece"], run)
        plot_misclassified(out / "misclassified.jpg", images, labels, probs, classes, cfg.gallery_size, run)
    log.info("%s on %d test images: %s", run, len(labels), metrics)
    return metrics


def gradcam_sample(labels: np.ndarray, count: int) -> np.ndarray:
    """A fixed, evenly spread set of test images (the split is ordered by class, so these cover many classes)."""
    return np.unique(np.linspace(0, len(labels) - 1, count).round().astype(int)) if count else np.array([], dtype=int)


def main() -> None:
    cfg = load_params().evaluate
    images, labels = load_split("test")
    classes = load_classes()
    models = {run: TrainedModel.load(checkpoint_path(run)) for run in MODELS}
    for run, trained in models.items():  # labels index classes.json: a model trained on other classes would be scored wrongly
        if trained.classes != classes:
            raise ModelError(
                f"{trained.path} was trained on {len(trained.classes)} classes that are not data/prepared/classes.json's "
                f"{len(classes)}: re-run its training stage (dvc repro)"
            )
    for run, trained in models.items():
        evaluate_model(run, trained, images, labels, cfg)
    sample = gradcam_sample(labels, cfg.gradcam_images)
    plot_gradcam_panel(GRADCAM_IMAGE, images[sample], labels[sample], models)


if __name__ == "__main__":
    run_stage("evaluate", main, lambda: ("evaluate.batch_size", load_params().evaluate.batch_size))
