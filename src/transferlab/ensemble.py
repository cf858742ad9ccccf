"""``transferlab ensemble``: is averaging the linear probe's and the fine-tuned model's predictions worth a
second network?

The two are scored where neither has trained: on the validation split, by the holdout twins
(``probe_holdout``, fitted on the train split only, and ``finetune_holdout``, fine-tuned from it), as the
holdout stages leave them. For each probe weight w from 0 to 1 the ensemble predicts
``w * p_probe + (1 - w) * p_finetuned`` (class probabilities, each with ``--tta``), and its mean per-class
accuracy is written to ``ensemble.csv`` and drawn in ``ensemble.png``. w = 1 is the probe alone, w = 0 the
fine-tuned model alone. The test split is not touched: a mix worth its cost would become a pipeline row,
scored once.

The cost is a second network at inference, with its own parameters except those the two share bit for bit
(the layers fine-tuning kept frozen): the summary counts them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import ModelError
from .evaluate import classification_metrics
from .fileio import write_csv, write_json
from .paths import checkpoint_path, holdout
from .splits import load_split

log = logging.getLogger("transferlab.ensemble")


def distinct_parameters(first, second) -> tuple[int, int]:
    """Parameters of two networks together, and how many of them the two hold bit for bit alike."""
    ours, theirs = first.model.state_dict(), second.model.state_dict()
    together = sum(p.numel() for p in first.model.parameters()) + sum(
        p.numel() for p in second.model.parameters()
    )
    names = {name for name, _ in first.model.named_parameters()}
    shared = sum(
        ours[name].numel()
        for name in names
        if name in theirs and ours[name].shape == theirs[name].shape and ours[name].equal(theirs[name])
    )
    return together - shared, shared


def plot(path: Path, weights: np.ndarray, accuracies: np.ndarray, tta: str) -> None:
    from .figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(weights, 100 * accuracies, marker="o")
    ax.set(
        xlabel="probe weight (0: fine-tuned alone, 1: probe alone)",
        ylabel="validation mean per-class accuracy (%)",
        title=f"Probe + fine-tuned ensemble, holdout twins (tta {tta})",
    )
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def ensemble(out: Path, steps: int, batch_size: int, tta: str) -> dict:
    """Score the mixes on the validation split; write ``ensemble.csv``, ``ensemble.png`` and
    ``ensemble.json`` (the summary) in ``out``."""
    from .trained_model import TrainedModel

    paths = [checkpoint_path(holdout(run)) for run in ("probe", "finetune")]
    for path, stage in zip(paths, ("train_probe", "holdout_finetune"), strict=True):
        if not path.is_file():
            raise ModelError(f"no model at {path}: run its stage first (dvc repro {stage})")
    images, labels = load_split("val")
    if not len(labels):
        raise ModelError("the validation split is empty (data.val_per_class: 0): nothing to score on")
    probe, finetuned = (TrainedModel.load(path) for path in paths)
    if probe.classes != finetuned.classes:
        raise ModelError(f"{paths[0]} and {paths[1]} know different classes: re-run dvc repro")
    p_probe, p_finetuned = (
        model.probabilities(images, batch_size, f"val {model.path.parent.name}", tta)
        for model in (probe, finetuned)
    )
    weights = np.linspace(0, 1, steps)
    accuracies = np.array(
        [
            classification_metrics(labels, w * p_probe + (1 - w) * p_finetuned, [1])["mean_per_class_acc"]
            for w in weights
        ]
    )
    parameters, shared = distinct_parameters(probe, finetuned)
    # a mix must beat both networks alone to win: ties go to a single network, the probe first
    order = [len(weights) - 1, 0, *range(1, len(weights) - 1)]
    best = max(order, key=lambda i: accuracies[i].round(9))
    summary = {
        "val_images": int(len(labels)),
        "tta": tta,
        "probe_val_acc": float(accuracies[-1]),
        "finetune_val_acc": float(accuracies[0]),
        "best_probe_weight": float(weights[best]),
        "best_val_acc": float(accuracies[best]),
        "parameters": parameters,
        "shared_parameters": shared,
    }
    write_csv(
        out / "ensemble.csv", ["probe_weight", "val_acc"], zip(weights.round(4), accuracies, strict=True)
    )
    write_json(out / "ensemble.json", summary)
    plot(out / "ensemble.png", weights, accuracies, tta)
    return summary
