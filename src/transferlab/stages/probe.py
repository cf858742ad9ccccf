"""Stage ``train_probe``: a linear probe, a logistic regression on the frozen features.

    python -m transferlab.stages.probe

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

import numpy as np
from dvclive import Live

from ..config import ProbeConfig, load_params
from ..entrypoint import run_stage
from ..fileio import atomic_dir, write_csv
from ..linear_probe import checked_features, fit_probe, save_probe
from ..paths import holdout, train_dir
from ..splits import load_classes, load_features, load_split

log = logging.getLogger("transferlab.stages.probe")
RUN = "probe"


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    cfg, info = params.probe, checked_features(params.model)
    classes = load_classes()
    (_, train_labels), (_, val_labels) = load_split("train"), load_split("val")
    log.info(
        "linear probe on %s's %d-dim features: C in %s, chosen on %d validation images",
        info["arch"],
        info["dim"],
        cfg.C,
        len(val_labels),
    )
    from .. import cores  # torch, for the BLAS pools scikit-learn computes in

    threads = cores.use(params.runtime.threads)
    train = np.asarray(load_features("train")), train_labels
    val = np.asarray(load_features("val")), val_labels
    fitted, on_train, chosen, results, trained_on = fit_probe(cfg, train, val, len(classes))
    for name, head in ((RUN, fitted), (holdout(RUN), on_train)):  # LP-FT's holdout twin starts from on_train
        save_probe(
            name,
            head,
            info,
            classes,
            cfg,
            params.runtime.channels_last,
            C=chosen["C"],
            val_acc=chosen.get("val_acc"),
        )
    summary = {"best/C": chosen["C"], "train_images": trained_on, "threads": threads}
    if "val_acc" in chosen:
        summary["best/val_acc"] = chosen["val_acc"]
    write_metrics(info, cfg, summary, results, started, validated=bool(len(val_labels)))
    log.info(
        "probe: C %g chosen on validation (%s), refitted on %s",
        chosen["C"],
        chosen,
        "train + val" if cfg.train_on_val else "train",
    )


def write_metrics(
    info: dict, cfg: ProbeConfig, summary: dict, results: list[dict], started: float, validated: bool
) -> None:
    """metrics/train_probe/: the settings and a summary (dvclive), every C's scores (regularization.csv)."""
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
            live.summary.update(summary)
            live.summary["wall_time_s"] = round(time.perf_counter() - started, 1)
        keys = ["C", "val_acc", "val_loss", "fit_time_s"] if validated else ["C", "fit_time_s"]
        write_csv(out / "regularization.csv", keys, ([r[k] for k in keys] for r in results))


if __name__ == "__main__":
    run_stage("train probe", main)
