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

from ..config import MODELS, load_params
from ..entrypoint import run_stage
from ..errors import ModelError
from ..paths import checkpoint_path
from ..splits import load_classes, load_split

log = logging.getLogger("transferlab.stages.evaluate")


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
    from .. import cores, scoring  # torch, scikit-learn and the model libraries: once the plan is shown

    threads = cores.use(params.runtime.threads)
    if run == "probe":
        probs, flagged = scoring.probe_probabilities(path, labels, classes, cfg.tta), False
    else:
        probs, flagged = scoring.model_probabilities(path, images, classes, cfg, params.runtime.device)
    if flagged:
        log.warning("%s ended at chance in training and was kept on purpose: its scores mean nothing", run)
    extra = {"threads": threads, "wall_time_s": round(time.perf_counter() - started, 1)}
    metrics = scoring.write_results(
        run, probs, images, labels, classes, cfg, extra | ({"at_chance": True} if flagged else {})
    )
    log.info("%s on %d test images: %s (%.1f s)", run, len(labels), metrics, time.perf_counter() - started)
    return metrics


if __name__ == "__main__":
    main()
