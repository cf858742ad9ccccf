"""``transferlab ensemble``: is averaging the linear probe's and the fine-tuned model's predictions worth a
second network?

The two are scored where neither has trained: on the validation split, by the holdout twins
(``probe_holdout``, which ``train_probe`` fits on the train split only, and ``finetune_holdout``, which
``holdout_finetune`` trains on it, from that probe with ``train.init_head: probe``). For each probe weight
w from 0 to 1 the ensemble predicts ``w * p_probe + (1 - w) * p_finetuned`` (class probabilities, each
with ``--tta``); its mean per-class accuracy goes to ``ensemble.csv`` and ``ensemble.png``. w = 1 is the
probe alone, w = 0 the fine-tuned model alone. The test split is not touched: a mix worth its cost would
become a pipeline row, scored once.

Both ends were chosen on these same images (the probe's C; the fine-tuned twin keeps its best epoch), so
their scores here are slightly flattered; ``ensemble.json`` records both choices. The cost of a mix is a
second network at inference, with its own parameters except those the two share bit for bit (the layers
fine-tuning kept frozen): the summary counts them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, ModelError
from ..fileio import write_csv, write_json
from ..paths import checkpoint_path, holdout
from ..splits import check_classes, load_classes, load_split

if TYPE_CHECKING:  # only annotated here: torch loads where the command runs
    from ..model_card import ModelCard

log = logging.getLogger("transferlab.tools.ensemble")


def mix_accuracies(
    labels: np.ndarray, p_probe: np.ndarray, p_finetuned: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Mean per-class accuracy of ``w * p_probe + (1 - w) * p_finetuned`` for each probe weight w."""
    from sklearn.metrics import balanced_accuracy_score

    return np.array(
        [balanced_accuracy_score(labels, (w * p_probe + (1 - w) * p_finetuned).argmax(1)) for w in weights]
    )


def best_mix(accuracies: np.ndarray) -> int:
    """Index of the best weight; a mix must beat both networks alone to win: ties go to a single network,
    the probe (the last weight) first, then among mixes to the lowest weight."""
    order = [len(accuracies) - 1, 0, *range(1, len(accuracies) - 1)]
    return max(order, key=lambda i: round(float(accuracies[i]), 9))  # k / n accuracies, summed in any order


def distinct_parameters(first, second) -> tuple[int, int]:
    """The parameters of two networks, those both hold bit for bit alike counted once, and how many those
    are. Buffers (batch-norm statistics) are not compared: frozen layers keep theirs too."""
    ours, theirs = first.model.state_dict(), second.model.state_dict()
    together = sum(p.numel() for p in first.model.parameters()) + sum(
        p.numel() for p in second.model.parameters()
    )
    shared = sum(
        ours[name].numel()
        for name, _ in first.model.named_parameters()
        if name in theirs and ours[name].shape == theirs[name].shape and ours[name].equal(theirs[name])
    )
    return together - shared, shared


def plot(path: Path, weights: np.ndarray, accuracies: np.ndarray, tta: str) -> None:
    from ..figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(weights, 100 * accuracies, marker="o")
    ax.set(
        xlabel="probe weight (0: fine-tuned alone, 1: probe alone)",
        ylabel="validation mean per-class accuracy (%)",
        title=f"Probe + fine-tuned ensemble, holdout twins (tta {tta})",
    )
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def chosen_on_validation(card: ModelCard) -> dict:
    """What the twin's own stage chose on the validation images: the probe's C, the fine-tune's epoch."""
    if card.mode == "linear_probe":
        return {"C": card.extra["C"]}
    return {"epoch": card.extra["epoch"], "epochs": card.config["epochs"]}


def ensemble(out: Path, steps: int, batch_size: int, tta: str, command: str) -> dict:
    """Score the mixes on the validation split; write ``ensemble.csv``, ``ensemble.png`` and
    ``ensemble.json`` (the summary, with ``command``) in ``out``."""
    from ..trained_model import TrainedModel

    images, labels = load_split("val")
    if not len(labels):
        raise ConfigError("the validation split is empty (data.val_per_class is 0): nothing to score on")
    classes, models = load_classes(), {}
    for run, stage in (("probe", "train_probe"), ("finetune", "holdout_finetune")):
        path = checkpoint_path(holdout(run))
        if not path.is_file():
            raise ModelError(f"no model at {path}: run its stage first (dvc repro {stage})")
        models[run] = TrainedModel.load(path)
        check_classes(path, models[run].card.classes, classes)
    log.info(
        "%s and %s on %d validation images (tta %s)", *(m.path for m in models.values()), len(labels), tta
    )
    p_probe, p_finetuned = (
        model.probabilities(images, batch_size, f"val {model.path.parent.name}", tta)
        for model in models.values()
    )
    weights = np.linspace(0, 1, steps).round(4)
    accuracies = mix_accuracies(labels, p_probe, p_finetuned, weights)
    best = best_mix(accuracies)
    parameters, shared = distinct_parameters(models["probe"], models["finetune"])
    summary = {
        "command": command,
        "val_images": int(len(labels)),
        "tta": tta,
        "chosen_on_validation": {run: chosen_on_validation(m.card) for run, m in models.items()},
        "probe_acc": float(accuracies[-1]),
        "finetune_acc": float(accuracies[0]),
        "best_probe_weight": float(weights[best]),
        "best_acc": float(accuracies[best]),
        "parameters": parameters,
        "shared_parameters": shared,
    }
    finetune = summary["chosen_on_validation"]["finetune"]
    if finetune["epoch"] != finetune["epochs"]:
        log.warning(
            "%s keeps epoch %d of %d, the best on these validation images: its score here is flattered",
            models["finetune"].path,
            finetune["epoch"],
            finetune["epochs"],
        )
    write_csv(
        out / "ensemble.csv", ["probe_weight", "mean_per_class_acc"], zip(weights, accuracies, strict=True)
    )
    write_json(out / "ensemble.json", summary)
    plot(out / "ensemble.png", weights, accuracies, tta)
    return summary
