"""Stage ``evaluate``: both trained models on the test split.

For each run, ``metrics/test_<run>/`` gets ``metrics.json`` (top-1, top-5, mean per-class
accuracy: the standard Caltech-101 metric), ``per_class.csv`` (precision, recall = per-class
accuracy, F1, support; scikit-learn) and dvclive's confusion-matrix plot.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
from dvclive import Live
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support, top_k_accuracy_score

from .config import RUNS, load_params
from .data import load_split
from .fileio import atomic_path
from .device import resolve_device
from .inference import predict_logits
from .models import Preprocessing, load_checkpoint
from .paths import checkpoint_path, evaluation_dir
from .stage import run_stage

log = logging.getLogger("transferlab.evaluate")


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict:
    classes = np.arange(probs.shape[1])
    return {
        "top1": float(top_k_accuracy_score(labels, probs, k=1, labels=classes)),
        "top5": float(top_k_accuracy_score(labels, probs, k=min(5, len(classes) - 1), labels=classes)),
        # mean of the per-class accuracies (recalls), the standard Caltech-101 metric
        "mean_per_class_acc": float(balanced_accuracy_score(labels, probs.argmax(1))),
        "test_images": int(len(labels)),
    }


def write_per_class(path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> None:
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=np.arange(len(classes)), zero_division=0
    )
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for row in zip(classes, precision, recall, f1, support):
            writer.writerow([row[0], *(f"{v:.4f}" for v in row[1:4]), int(row[4])])


def evaluate_model(run: str, images: np.ndarray, labels: np.ndarray, batch_size: int) -> dict:
    started = time.perf_counter()
    model, checkpoint = load_checkpoint(checkpoint_path(run))
    model.to(resolve_device())
    classes = checkpoint["classes"]
    prep = Preprocessing.from_dict(checkpoint["preprocessing"])
    logits = predict_logits(
        model, images, prep, checkpoint["eval_image_size"], batch_size, checkpoint["train_config"]["channels_last"], f"test {run}"
    )
    probs = logits.softmax(1).numpy()
    metrics = {**classification_metrics(labels, probs), "wall_time_s": round(time.perf_counter() - started, 1)}
    out = evaluation_dir(run)
    with Live(str(out), dvcyaml=False, save_dvc_exp=False) as live:
        for key, value in metrics.items():
            live.summary[key] = value
        names = np.array(classes)
        live.log_sklearn_plot("confusion_matrix", names[labels].tolist(), names[probs.argmax(1)].tolist(), name="confusion_matrix.json")
    write_per_class(out / "per_class.csv", labels, probs.argmax(1), classes)
    log.info("%s on %d test images: %s", run, len(labels), metrics)
    return metrics


def main() -> None:
    params = load_params()
    images, labels = load_split("test")
    for run in RUNS:
        evaluate_model(run, images, labels, params.evaluate.batch_size)


if __name__ == "__main__":
    run_stage("evaluate", main)
