"""What a model gets wrong and how sure it is: top-k accuracy, confused pairs, calibration, and their
pictures.

Everything here works on the test labels and the model's class probabilities (N x classes); the
pictures come from scikit-learn's display helpers and matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix

from .figures import plt, save_figure


def topk_accuracies(labels: np.ndarray, probs: np.ndarray, ks: list[int]) -> dict[str, float]:
    """``top<k>``: the share of images whose true class is among the k most probable
    (ties count in its favour)."""
    rank = (probs > probs[np.arange(len(labels)), labels][:, None]).sum(
        1
    )  # classes ranked strictly above the true one
    return {f"top{k}": float((rank < k).mean()) for k in ks}


@dataclass(frozen=True)
class ConfusedPair:
    true_class: str
    predicted_class: str
    count: int
    share: float  # of the true class's test images


def mistake_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """The confusion matrix of counts with its diagonal (the right answers) zeroed."""
    matrix = confusion_matrix(labels, predictions, labels=np.arange(num_classes))
    np.fill_diagonal(matrix, 0)
    return matrix


def confused_pairs(labels: np.ndarray, predictions: np.ndarray, classes: list[str]) -> list[ConfusedPair]:
    """Every (true, predicted) pair of different classes that occurs, most frequent first."""
    matrix = mistake_counts(labels, predictions, len(classes))
    support = np.bincount(labels, minlength=len(classes))
    rows, cols = np.nonzero(matrix)
    pairs = [
        ConfusedPair(classes[r], classes[c], int(matrix[r, c]), matrix[r, c] / support[r])
        for r, c in zip(rows, cols, strict=True)
    ]
    return sorted(pairs, key=lambda p: (-p.count, -p.share, p.true_class, p.predicted_class))


def most_confused_classes(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, count: int
) -> np.ndarray:
    """The ``count`` classes involved in most mistakes (as the true or the predicted class),
    in label order."""
    matrix = mistake_counts(labels, predictions, num_classes)
    involvement = matrix.sum(0) + matrix.sum(1)
    chosen = np.argsort(-involvement, kind="stable")[:count]
    return np.sort(chosen)


def plot_confusion_matrix(
    path: Path, labels: np.ndarray, predictions: np.ndarray, classes: list[str], count: int, title: str
) -> None:
    """Row-normalised confusion matrix (each row: where a class's test images went); ``count`` > 0 keeps the
    classes involved in most mistakes, so 101 classes stay readable."""
    normalised = confusion_matrix(labels, predictions, labels=np.arange(len(classes)), normalize="true")
    shown = (
        np.arange(len(classes))
        if count <= 0 or count >= len(classes)
        else most_confused_classes(labels, predictions, len(classes), count)
    )
    size = max(5.0, 0.16 * len(shown) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    display = ConfusionMatrixDisplay(
        normalised[np.ix_(shown, shown)], display_labels=[classes[i] for i in shown]
    )
    display.plot(
        ax=ax,
        include_values=len(shown) <= 12,
        cmap="Blues",
        xticks_rotation="vertical",
        values_format=".2f",
        im_kw={"vmin": 0, "vmax": 1},
    )
    fontsize = 8 if len(shown) <= 30 else 5
    ax.tick_params(labelsize=fontsize)
    subset = "all classes" if len(shown) == len(classes) else f"the {len(shown)} most confused classes"
    ax.set_title(f"{title}: confusion matrix\n{subset}, rows normalised", fontsize=9)
    save_figure(fig, path)


def calibration_bins(
    confidence: np.ndarray, correct: np.ndarray, bins: int
) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each non-empty equal-width confidence bin
    (scikit-learn's binning)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.searchsorted(
        edges[1:-1], confidence
    )  # a confidence on an edge goes to the lower bin, as in scikit-learn
    return [
        (float(confidence[which == b].mean()), float(correct[which == b].mean()), int((which == b).sum()))
        for b in range(bins)
        if (which == b).any()
    ]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """ECE (Guo et al. 2017): the bins' |accuracy - confidence|, weighted by the share of images in
    each bin."""
    return float(
        sum(count * abs(acc - conf) for conf, acc, count in calibration_bins(confidence, correct, bins))
        / len(correct)
    )


def plot_calibration(
    path: Path, confidence: np.ndarray, correct: np.ndarray, bins: int, ece: float, title: str
) -> None:
    """Reliability diagram (accuracy against confidence of the top class) and confidence of right vs wrong
    predictions."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    CalibrationDisplay.from_predictions(correct.astype(int), confidence, n_bins=bins, ax=left, name=title)
    left.set(
        xlabel="confidence (top-class probability)", ylabel="accuracy", title=f"Reliability, ECE {ece:.3f}"
    )
    edges = np.linspace(0, 1, bins + 1)
    right.hist(
        [confidence[correct], confidence[~correct]],
        bins=edges,
        label=["right", "wrong"],
        color=["tab:green", "tab:red"],
    )
    right.set(
        xlabel="confidence (top-class probability)",
        ylabel="test images",
        title="Confidence of right and wrong predictions",
    )
    right.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def gallery_indices(labels: np.ndarray, probs: np.ndarray, count: int, per_pair: int = 2) -> list[int]:
    """The ``count`` most confident mistakes, at most ``per_pair`` of each (true, predicted) pair, so that one
    frequent confusion (Faces_easy -> Faces) does not fill the whole gallery."""
    predictions = probs.argmax(1)
    wrong = np.flatnonzero(predictions != labels)
    chosen, per = [], {}
    for index in wrong[np.argsort(-probs[wrong, predictions[wrong]], kind="stable")]:
        pair = (labels[index], predictions[index])
        if per.get(pair, 0) < per_pair and len(chosen) < count:
            chosen.append(int(index))
            per[pair] = per.get(pair, 0) + 1
    return chosen


def plot_misclassified(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    count: int,
    title: str,
) -> int:
    """A gallery of confident mistakes (true class, predicted class, confidence); returns how many it
    shows."""
    predictions = probs.argmax(1)
    shown = gallery_indices(labels, probs, count)
    columns = 6
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, shown, strict=False):
        ax.imshow(images[index])
        ax.set_title(
            f"{classes[labels[index]]}\n→ {classes[predictions[index]]} "
            f"({probs[index, predictions[index]]:.0%})",
            fontsize=7,
            color="tab:red",
        )
    if not len(shown):
        message = (
            "gallery turned off (evaluate.gallery_size: 0)" if not count else "no misclassified test images"
        )
        axes.flat[0].text(0, 0.5, message, va="center")
    fig.suptitle(
        f"{title}: most confident mistakes, at most 2 per confused pair (true → predicted, confidence)",
        fontsize=10,
    )
    save_figure(fig, path, dpi=80)
    return len(shown)
