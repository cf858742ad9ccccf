"""Stage ``evaluate@<model>``: one model on the test split, and what it got wrong.

    python -m transferlab.stages.evaluate finetune     # probe | finetune | scratch

One stage per model (a DVC ``foreach``): an experiment that changes one model re-scores that model only.
Predictions use ``evaluate.tta`` (flip: the mean logits of each image and its mirror image). The linear
probe is scored from the features stage's test features (its head is linear: no second pass of the
backbone); a trained model runs over the test images (``inference.py``: ONNX Runtime on a CPU).
``metrics/test_<model>/`` gets ``metrics.json`` (mean per-class accuracy, the standard Caltech-101
metric; top-k for each k in ``evaluate.topk``; expected calibration error), ``per_class.csv``
(precision, recall = per-class accuracy, F1, support), ``confused_pairs.csv`` (true -> predicted class,
most frequent first), dvclive's interactive confusion matrix, and three pictures:
``confusion_matrix.png`` (row-normalised, the most confused classes), ``calibration.png`` (reliability
diagram, confidence of right and wrong predictions) and ``misclassified.jpg`` (the most confident mistakes).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from ..config import MODELS, EvaluateConfig, load_params
from ..entrypoint import run_stage
from ..errors import ModelError
from ..fileio import atomic_dir, write_csv
from ..paths import checkpoint_path, evaluation_dir
from ..splits import check_classes, features_info, load_classes, load_features, load_split

log = logging.getLogger("transferlab.stages.evaluate")


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, topk: list[int], calibration_bins: int = 15
) -> dict:
    from sklearn.metrics import balanced_accuracy_score

    from ..analysis import expected_calibration_error, topk_accuracies

    confidence, predictions = probs.max(1), probs.argmax(1)
    return {
        # mean of the per-class accuracies (recalls), the standard Caltech-101 metric
        "mean_per_class_acc": float(balanced_accuracy_score(labels, predictions)),
        **topk_accuracies(labels, probs, topk),
        "ece": expected_calibration_error(confidence, predictions == labels, calibration_bins),
        "test_images": int(len(labels)),
    }


def write_per_class(path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> None:
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=np.arange(len(classes)), zero_division=0
    )
    rows = (
        [name, *(f"{v:.4f}" for v in values), int(n)]
        for name, *values, n in zip(classes, precision, recall, f1, support, strict=True)
    )
    write_csv(path, ["class", "precision", "recall", "f1", "support"], rows)


def write_confused_pairs(path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> None:
    from ..analysis import confused_pairs

    rows = (
        (p.true_class, p.predicted_class, p.count, f"{p.share:.4f}")
        for p in confused_pairs(labels, predictions, classes)
    )
    write_csv(path, ["true_class", "predicted_class", "count", "share_of_true_class"], rows)


def probe_probabilities(path: Path, labels: np.ndarray, classes: list[str], tta: str) -> np.ndarray:
    """The linear probe's test probabilities from the frozen test features: its head applied to them
    (torch to read it)."""
    from ..checkpoint import read_model

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
    """A trained model's test probabilities: the network over the test images
    (torch and the model libraries imported here); and whether its training ended at chance."""
    from ..device import resolve_device
    from ..trained_model import TrainedModel

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
    from dvclive import Live

    from ..analysis import plot_calibration, plot_confusion_matrix, plot_misclassified

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=MODELS)
    run = parser.parse_args(argv).model
    run_stage(
        f"evaluate {run}",
        lambda: evaluate(run),
        lambda: ("evaluate.batch_size", load_params().evaluate.batch_size),
    )


def evaluate(run: str) -> dict:
    started = time.perf_counter()
    params = load_params()
    cfg = params.evaluate
    path = checkpoint_path(run)
    if not path.is_file():
        raise ModelError(f"no model at {path}: run its training stage first (dvc repro train_{run})")
    images, labels = load_split("test")
    classes = load_classes()
    source = "the frozen test features" if run == "probe" else "the test images"
    log.info(
        "%s: %s on %d test images (%s), scored from %s", run, path, len(labels), f"tta {cfg.tta}", source
    )
    from .. import cores  # torch

    threads = cores.use(params.runtime.threads)
    if run == "probe":
        probs, flagged = probe_probabilities(path, labels, classes, cfg.tta), False
    else:
        probs, flagged = model_probabilities(path, images, classes, cfg, params.runtime.device)
    if flagged:
        log.warning("%s ended at chance in training and was kept on purpose: its scores mean nothing", run)
    extra = {"threads": threads, "wall_time_s": round(time.perf_counter() - started, 1)}
    metrics = write_results(
        run, probs, images, labels, classes, cfg, extra | ({"at_chance": True} if flagged else {})
    )
    log.info("%s on %d test images: %s (%.1f s)", run, len(labels), metrics, time.perf_counter() - started)
    return metrics


if __name__ == "__main__":
    main()
