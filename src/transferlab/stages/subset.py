"""Stages ``subset_probe``, ``subset_finetune`` and ``subset_scratch`` (``efficiency/dvc.yaml``): one point of
the data-efficiency curve, a model trained on n images per class and scored on the test split.

    python -m transferlab.stages.subset finetune --per-class 5 --draw 0    # probe | finetune | scratch

The n images of each class are drawn from the train split with the draw's seed (``subsets.py``: nested, never
a validation or test image). Each model keeps its recipe from params.yaml, chosen at 30 images per class, and
trains on the subset alone with no validation, keeping its last epoch as a final fit does: the probe with
the C ``train_probe`` chose (no validation image is spent on a point), fitted on the subset's frozen features;
the fine-tuned model from that probe (LP-FT); the scratch model from random weights. Each is scored as
``evaluate`` scores the main models (every test image, ``evaluate.tta``, mean per-class accuracy), and
``metrics/efficiency/test_<model>_n<n>_d<draw>/metrics.json`` holds the scores with the training and test
times. The params are checked and the plan said before torch and the model libraries load.
"""

from __future__ import annotations

import argparse
import logging
import time

from ..config import MODELS, Params, load_params
from ..entrypoint import run_stage
from ..errors import ConfigError
from ..fileio import read_json, write_json
from ..linear_probe import fit_subset
from ..paths import checkpoint_path, evaluation_dir, train_dir
from ..splits import load_classes, load_split
from ..subsets import Subset

log = logging.getLogger("transferlab.stages.subset")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--per-class", type=int, required=True, help="training images per class")
    parser.add_argument("--draw", type=int, required=True, help="the draw's seed")
    args = parser.parse_args(argv)
    subset = Subset(args.per_class, args.draw)
    run_stage(
        subset.run(args.model),
        lambda: score_point(args.model, subset),
        lambda: ("evaluate.batch_size", load_params().evaluate.batch_size),
    )


def score_point(model: str, subset: Subset) -> dict:
    """Train ``model`` on ``subset``, score it on the test split and write its metrics.json."""
    started = time.perf_counter()
    params = load_params()
    params.check_efficiency()
    if not params.drawable(subset.per_class):
        raise ConfigError(params.undrawable("--per-class", subset.per_class))
    name = subset.run(model)
    log.info("%s: %s on %d images per class (draw %d)", name, model, subset.per_class, subset.draw)
    from .. import cores, scoring  # torch, scikit-learn and the model libraries: once the plan is shown

    threads = cores.use(params.runtime.threads)
    training_started = time.perf_counter()
    trained = train(params, model, subset)
    trained["train_images"] = len(subset.rows(load_split("train")[1]))
    trained_at = time.perf_counter()
    images, labels = load_split("test")
    cfg, path = params.evaluate, checkpoint_path(name)
    if model == "probe":
        probs = scoring.probe_probabilities(path, labels, load_classes(), cfg.tta)
    else:
        probs, at_chance = scoring.model_probabilities(
            path, images, load_classes(), cfg, params.runtime.device
        )
        trained |= {"at_chance": True} if at_chance else {}
    metrics = {
        "model": model,
        "images_per_class": subset.per_class,
        "draw": subset.draw,
        **trained,
        **scoring.classification_metrics(labels, probs, cfg.topk, cfg.calibration_bins),
        "train_time_s": round(trained_at - training_started, 1),
        "test_time_s": round(time.perf_counter() - trained_at, 1),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "threads": threads,
    }
    write_json(evaluation_dir(name) / "metrics.json", metrics)
    log.info("%s: mean per-class accuracy %.4f", name, metrics["mean_per_class_acc"])
    return metrics


def train(params: Params, model: str, subset: Subset) -> dict:
    """Fit ``model``'s point and save it; for the probe, the C it was fitted with."""
    if model == "probe":
        C = read_json(train_dir("probe") / "metrics.json")["best/C"]
        fit_subset(params.probe, params.model, subset, C, params.runtime.channels_last)
        return {"C": C}
    from ..training import fit  # torch

    fit(model, subset=subset)
    return {}


if __name__ == "__main__":
    main()
