"""``transferlab lr-find RUN``: the learning-rate range test (Smith, WACV 2017; fastai's ``lr_find``).

The run's model starts as its training stage would start it (mode, head, parameter groups, augmentation,
optimizer and weight decay from params.yaml) and trains on the train split, never the validation split,
for ``steps`` optimizer steps while the learning rate rises exponentially from ``start`` to ``end``. Every
parameter group rises together, so fine-tuning keeps its backbone at ``lr * backbone_lr_scale`` and the
value swept is the run's ``lr``. The test stops once the loss has diverged. Nothing is kept: the model
and optimizer are thrown away and no file a stage reads is written.

The suggestion is the middle of the valley: the loss falls, flattens, then climbs as the rate gets too
high, and the valley is where the smoothed loss stays within ``VALLEY`` (10 %) of its whole fall above its
minimum; the suggestion is the geometric mean of its first and last learning rates. fastai's older rule
(the minimum divided by 10) was tried first: on the fine-tune's flat-bottomed valley the minimum lands
anywhere in a decade of noise, and a tenth of it suggested 3e-5 to 1e-4 where the grid found 1e-3
best (docs/hyperparameters.md). The smoothing is centred (it does not lag behind the curve) and
divergence must last several steps, so a single early spike moves nothing; a curve that never falls by
``MIN_DROP`` of its starting level gives no suggestion. The test is repeated with a few seeds (batch
order, augmentation, a random head's start) and the median of their suggestions is the one to use; their
spread shows how far one test can be trusted.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import cores
from ..config import load_params
from ..figures import plt, save_figure
from ..fileio import write_json
from ..inputs import epoch_order
from ..run import Run
from ..training import Assembly, assemble

log = logging.getLogger("transferlab.tools.lrfind")

MIN_DROP = 0.05  # the smoothed loss must fall at least this fraction below its start for a suggestion
VALLEY = (
    0.1  # the valley: where the smoothed loss is within this fraction of its whole fall above its minimum
)
DIVERGE = 4.0  # the loss has diverged when it stays above this multiple of its lowest value ...
DIVERGE_STEPS = 3  # ... for this many steps in a row (one spike is not divergence)


@dataclass
class Suggestion:
    lr: float | None  # None: no clear valley
    reason: str
    valley: tuple[float, float] | None = None  # the first and last learning rates of the valley


def smooth(losses: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (edges padded with the edge values): no lag, unlike an exponential average."""
    window = max(1, min(window, len(losses)) // 2 * 2 + 1)
    padded = np.pad(np.asarray(losses, dtype=float), window // 2, mode="edge")
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def diverged_at(losses: np.ndarray) -> int | None:
    """The first step of the divergence (a non-finite loss, or ``DIVERGE_STEPS`` steps above ``DIVERGE`` x
    the lowest)."""
    lowest, above = np.inf, 0
    for step, loss in enumerate(losses):
        if not np.isfinite(loss):
            return step - above
        above = above + 1 if loss > DIVERGE * lowest else 0
        if above == DIVERGE_STEPS:
            return step - above + 1
        lowest = min(lowest, loss)
    return None


def suggest(lrs: np.ndarray, losses: np.ndarray) -> Suggestion:
    """The suggestion rule (see the module docstring) for one range test's learning rates and losses."""
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    end = diverged_at(losses)
    kept = len(losses) if end is None else end
    if kept < 5:
        return Suggestion(None, f"the loss diverged within {kept} steps: start the range lower (--start)")
    window = max(3, kept // 10)
    smoothed = smooth(losses[:kept], window)
    start = np.median(losses[:window])  # the level it starts from, which one early spike does not raise
    floor = smoothed.min()
    drop = 1 - floor / start
    if drop < MIN_DROP:
        return Suggestion(
            None,
            f"no clear valley: the smoothed loss fell only {drop:.0%} "
            f"below its start (needs {MIN_DROP:.0%}); a network far from trained (from scratch) "
            "needs more steps (--steps) before its loss moves",
        )
    inside = np.flatnonzero(smoothed <= floor + VALLEY * (start - floor))
    first, last = int(inside[0]), int(inside[-1])
    reason = f"middle of the valley (smoothed loss within {VALLEY:.0%} of its fall above the minimum)"
    if end is None and last >= kept - max(3, kept // 20):
        reason += "; the loss was still low at the end of the range (raise --end)"
    return Suggestion(float(np.sqrt(lrs[first] * lrs[last])), reason, (float(lrs[first]), float(lrs[last])))


def lr_factors(steps: int, start: float, end: float) -> np.ndarray:
    """The learning rate of each step, ``start`` to ``end`` exponentially."""
    return start * (end / start) ** (np.arange(steps) / max(steps - 1, 1))


def range_test(model: str, steps: int, start: float, end: float, seed: int) -> dict:
    """One range test of the model's run, with ``seed`` for the batch order, augmentation and a random
    head."""
    # as the holdout twin trains: on the train split, from the probe that never saw the validation images
    run = Run.of(load_params(), model, holdout=True).with_recipe(compile=False, ema_decay=0.0, seed=seed)
    setup = assemble(run, sweep=lr_factors(steps, start, end))
    lrs, losses = sweep_losses(setup, steps, f"lr-find {model} seed {seed}")
    suggestion = suggest(np.array(lrs), np.array(losses))
    log.info(
        "lr-find %s seed %d: %s (%s)",
        model,
        seed,
        f"lr {suggestion.lr:.3g}" if suggestion.lr else "no suggestion",
        suggestion.reason,
    )
    return {"seed": seed, "lr": lrs, "loss": losses, "suggestion": dataclasses.asdict(suggestion)}


def sweep_losses(setup: Assembly, steps: int, description: str) -> tuple[list[float], list[float]]:
    """The run's learning rate and training loss at each step of its sweep, for ``steps`` steps or until the
    loss diverges."""
    trainer, cfg = setup.trainer, setup.trainer.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    lrs, losses = [], []
    trainer.enter_train_mode()
    with tqdm(total=steps, desc=description, leave=False) as bar:
        while len(losses) < steps:
            order = epoch_order(setup.labels, generator, cfg.balanced_sampling)
            for batch in setup.slices[: steps - len(losses)]:
                # the run's lr: the last group's, over that group's share of it
                lrs.append(
                    trainer.optimizer.param_groups[-1]["lr"] * cfg.lr / trainer.schedule.per_step.base_lrs[-1]
                )
                loss_sum, _, seen = trainer.step(setup.batches, order[batch])
                losses.append(float(loss_sum) / seen)
                bar.update()
                bar.set_postfix(lr=f"{lrs[-1]:.2g}", loss=f"{losses[-1]:.3f}")
                if diverged_at(np.array(losses)) is not None:
                    return lrs, losses
    return lrs, losses


def summarise(tests: list[dict]) -> dict:
    """The median of the seeds' suggestions and their spread."""
    values = [t["suggestion"]["lr"] for t in tests if t["suggestion"]["lr"] is not None]
    if not values:
        return {
            "lr": None,
            "spread": None,
            "reason": tests[0]["suggestion"]["reason"] if tests else "no test ran",
        }
    return {
        "lr": float(np.exp(np.median(np.log(values)))),
        "spread": [min(values), max(values)],
        "seeds_with_a_suggestion": f"{len(values)} of {len(tests)}",
    }


def plot(path: Path, run: str, key: str, current: float, tests: list[dict], summary: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lowest, highest = np.inf, -np.inf
    for test, color in zip(tests, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        lrs, losses = np.array(test["lr"]), np.array(test["loss"])
        end = diverged_at(losses) or len(losses)
        smoothed = smooth(losses[:end], max(3, end // 10))
        ax.plot(lrs, losses, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(lrs[:end], smoothed, color=color, label=f"seed {test['seed']} (smoothed)")
        if test["suggestion"]["lr"]:
            ax.axvline(test["suggestion"]["lr"], color=color, linestyle="--", linewidth=0.8)
        lowest, highest = min(lowest, smoothed.min()), max(highest, smoothed[0])
    if summary["lr"]:
        ax.axvline(
            summary["lr"], color="black", linewidth=1.5, label=f"suggestion (median): {summary['lr']:.2g}"
        )
    ax.axvline(current, color="grey", linestyle=":", linewidth=1.5, label=f"params.yaml {key}: {current:g}")
    if np.isfinite(lowest):
        span = max(highest - lowest, 0.02 * highest)
        ax.set_ylim(lowest - 0.1 * span, highest + 0.6 * span)
    ax.set_xscale("log")
    ax.set_xlabel(f"{key} (every parameter group scaled with it)")
    ax.set_ylabel("training loss (per batch)")
    title = f"{run}: learning-rate range test"
    ax.set_title(
        title if summary["lr"] else f"{title}: no suggestion\n{textwrap.fill(summary['reason'], 90)}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)


def find(model: str, steps: int, start: float, end: float, seeds: int, out: Path, command: str) -> dict:
    """Range tests with ``seeds`` seeds; writes ``<out>/<model>.json`` (``command`` made it) and
    ``<out>/<model>.png``."""
    params = load_params()
    run = Run.of(params, model)
    cores.use(params.runtime.threads)
    tests = [range_test(model, steps, start, end, run.cfg.seed + offset) for offset in range(seeds)]
    summary = summarise(tests)
    result = {
        "run": model,
        "command": command,
        "key": run.key("lr"),
        "params_lr": run.cfg.lr,
        "steps": steps,
        "start": start,
        "end": end,
        "summary": summary,
        "tests": tests,
    }
    write_json(out / f"{model}.json", result)
    plot(out / f"{model}.png", model, run.key("lr"), run.cfg.lr, tests, summary)
    return result
