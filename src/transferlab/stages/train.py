"""Stages ``train_finetune`` and ``train_scratch``: one training loop (``training.py``); the mode is data.

    python -m transferlab.stages.train finetune    # the train: section (mode finetune or feature_extract)
    python -m transferlab.stages.train scratch     # the same architecture from random init: scratch:
    python -m transferlab.stages.train finetune --holdout  # its holdout twin: trained on the train split,
                                                           # validated every epoch

This entry point checks the params and says what it will train within a second; torch and the model
libraries (several seconds to import on a small CPU) load after that. With ``runtime.processes: N`` it
starts N data-parallel processes under torchrun, each of which runs this same command.
"""

from __future__ import annotations

import argparse
import logging
import os

from ..config import TRAINED_MODELS, load_params
from ..entrypoint import run_stage
from ..paths import holdout as holdout_name
from ..run import Run

log = logging.getLogger("transferlab.stages.train")


def plan(run: Run) -> str:
    cfg = run.cfg
    body = f", body at {cfg.lr * cfg.backbone_lr_scale:g}" if cfg.mode == "finetune" else ""
    start = " from the linear probe's head" if cfg.init_head == "probe" else ""
    data = "train + val images" if cfg.train_on_val else "train images, validating every epoch"
    network = f"{run.arch}{start} (weights {run.weights})"
    recipe = f"{cfg.epochs} epochs at {cfg.image_size} px, lr {cfg.lr:g}{body}"
    return f"{run.name}: {cfg.mode} {network}, {recipe}, on the {data}"


def start(model: str, holdout: bool) -> None:
    """Train in this process, or with ``runtime.processes`` > 1 start the data-parallel processes that
    will."""
    # bad params fail here, before anything is imported or started
    run = Run.of(load_params(), model, holdout)
    if os.environ.get("RANK", "0") == "0":  # one of the data-parallel processes says it
        log.info("%s", plan(run))
    from ..distributed import launch, launched_by_torchrun  # torch: imported once the plan is shown

    if run.runtime.processes > 1 and not launched_by_torchrun():
        status = launch(
            run.runtime.processes, "transferlab.stages.train", [model, *(["--holdout"] if holdout else [])]
        )
        if status:
            raise SystemExit(f"train {model}: the data-parallel run failed (exit code {status})")
        return
    from ..training import train

    train(model, holdout)


def batch_setting(model: str) -> tuple[str, int]:
    """The run's batch size and its params key (``train.batch_size`` or ``scratch.batch_size``)."""
    run = Run.of(load_params(), model)
    return run.key("batch_size"), run.cfg.batch_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", choices=TRAINED_MODELS)
    parser.add_argument(
        "--holdout",
        action="store_true",
        help="train the run's holdout twin (train split only, validated every epoch)",
    )
    args = parser.parse_args(argv)
    name = holdout_name(args.model) if args.holdout else args.model
    run_stage(f"train {name}", lambda: start(args.model, args.holdout), lambda: batch_setting(args.model))


if __name__ == "__main__":
    main()
