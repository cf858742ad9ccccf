"""The data-efficiency curve: every point's test score (the subset stages' ``metrics.json``, and the main
models' at the full training set), summarised over the draws, drawn against the images per class beside
Zeiler & Fergus's published points, and tabled with each point's training time.
"""

from __future__ import annotations

import html
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .config import MODEL_NAMES, MODELS, EfficiencyConfig
from .errors import ModelError
from .figures import plt, save_figure
from .fileio import read_json
from .paths import evaluation_dir, train_dir
from .report import Table, embedded_image, html_table, markdown, page
from .subsets import Subset

# Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, Table 5: Caltech-101
# mean per-class accuracy (%), mean and standard deviation over 5 draws, at 15 and 30 images per class
PUBLISHED = {
    "ImageNet features, new softmax (Zeiler & Fergus 2014)": {15: (83.8, 0.5), 30: (86.5, 0.5)},
    "From scratch (Zeiler & Fergus 2014)": {15: (22.8, 1.5), 30: (46.5, 1.7)},
}
COLOURS = {"probe": "tab:blue", "finetune": "tab:green", "scratch": "tab:red"}


@dataclass(frozen=True)
class Point:
    """One trained model's test score: a draw of a subset, or (``draw`` None) a main model."""

    model: str
    per_class: int
    draw: int | None
    accuracy: float  # mean per-class, on the test split
    train_time_s: float


@dataclass(frozen=True)
class Summary:
    """A model at one number of images per class, over its draws."""

    model: str
    per_class: int
    mean: float
    std: float  # sample standard deviation over the draws (0 for one)
    low: float
    high: float
    draws: int
    train_time_s: float  # mean over the draws
    by_draw: dict  # each draw's accuracy (draw None: a main model)


def expected(cfg: EfficiencyConfig) -> list[tuple[str, Subset]]:
    """Every point the params ask for: (model, subset)."""
    sizes = {"probe": cfg.sizes, "finetune": cfg.sizes, "scratch": cfg.scratch_sizes}
    return [(model, Subset(n, draw)) for model in MODELS for n in sizes[model] for draw in cfg.draws]


def read_points(cfg: EfficiencyConfig, full: int) -> list[Point]:
    """The points of the params' subsets and the main models' (at ``full`` images per class)."""
    wanted = expected(cfg)
    paths = [evaluation_dir(subset.run(model)) / "metrics.json" for model, subset in wanted]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise ModelError(
            f"{len(missing)} point(s) of the curve have no scores, e.g. {missing[0]}: "
            "run them first (dvc repro efficiency/dvc.yaml)"
        )
    points = []
    for (model, subset), path in zip(wanted, paths, strict=True):
        scores = read_json(path)
        points.append(
            Point(model, subset.per_class, subset.draw, scores["mean_per_class_acc"], scores["train_time_s"])
        )
    for model in MODELS:
        score = read_json(evaluation_dir(model) / "metrics.json")["mean_per_class_acc"]
        points.append(
            Point(model, full, None, score, read_json(train_dir(model) / "metrics.json")["wall_time_s"])
        )
    return points


def summarise(points: list[Point]) -> list[Summary]:
    """The points of each (model, images per class), over their draws; ordered by model, then size."""
    groups: dict[tuple[str, int], list[Point]] = defaultdict(list)
    for point in points:
        groups[point.model, point.per_class].append(point)
    summaries = []
    for (model, per_class), group in sorted(groups.items(), key=lambda g: (MODELS.index(g[0][0]), g[0][1])):
        scores = [p.accuracy for p in group]
        summaries.append(
            Summary(
                model,
                per_class,
                statistics.fmean(scores),
                statistics.stdev(scores) if len(scores) > 1 else 0.0,
                min(scores),
                max(scores),
                len(scores),
                statistics.fmean(p.train_time_s for p in group),
                {p.draw: p.accuracy for p in group},
            )
        )
    return summaries


def findings(summaries: list[Summary]) -> list[str]:
    """The two answers the curve gives, one sentence each: how many images the scratch model needs to match
    the probe at 5 per class (or its fewest), and where the fine-tuned model first beats the probe."""
    of = {(s.model, s.per_class): s for s in summaries}
    probe_sizes = sorted(n for model, n in of if model == "probe")
    at = 5 if 5 in probe_sizes else probe_sizes[0]
    reference = of["probe", at]
    scratch = sorted((s for s in summaries if s.model == "scratch"), key=lambda s: s.per_class)
    matched = next((s for s in scratch if s.mean >= reference.mean), None)
    probe = f"the linear probe's {percent(reference.mean)} at {at} images per class"
    if matched:
        first = (
            f"The scratch model matches {probe} with {matched.per_class} images per class "
            f"({percent(matched.mean)})."
        )
    else:
        last = scratch[-1]
        first = (
            f"The scratch model never matches {probe}: with {last.per_class} images per class it reaches "
            f"{percent(last.mean)}."
        )
    second = finetune_against_probe(
        [(s, of["probe", s.per_class]) for s in summaries if s.model == "finetune"]
    )
    return [first, second]


def finetune_against_probe(pairs: list[tuple[Summary, Summary]]) -> str:
    """Where the fine-tuned model first beats the probe: at the fewest images per class where it scores
    higher in every draw (each draw's fine-tune starts from that draw's probe), with the mean gap."""
    gaps = {}
    for finetune, probe in sorted(pairs, key=lambda pair: pair[0].per_class):
        gaps[finetune.per_class] = [finetune.by_draw[d] - probe.by_draw[d] for d in finetune.by_draw]
    ahead = [n for n, gap in gaps.items() if min(gap) > 0]
    if ahead:
        n = ahead[0]
        return (
            f"The fine-tuned model first beats the probe at {n} images per class, in every draw "
            f"(by {100 * statistics.fmean(gaps[n]):.2f} points on average)."
        )
    means = [100 * statistics.fmean(gap) for gap in gaps.values()]
    return (
        "The fine-tuned model beats the probe in every draw at no size measured "
        f"(the mean gaps run from {min(means):+.2f} to {max(means):+.2f} points)."
    )


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def table(summaries: list[Summary]) -> Table:
    """A row per number of images per class; each model's mean ± standard deviation over its draws, and its
    training time per point."""
    of = {(s.model, s.per_class): s for s in summaries}
    sizes = sorted({s.per_class for s in summaries})

    def cell(model: str, n: int) -> str:
        s = of.get((model, n))
        if s is None:
            return "–"
        spread = f" ± {100 * s.std:.2f}" if s.draws > 1 else ""
        return f"{100 * s.mean:.2f}{spread} ({s.draws}×, {s.train_time_s / 60:.1f} min)"

    return Table(
        "Test mean per-class accuracy (%) against training images per class",
        ["Images per class", *(MODEL_NAMES[model] for model in MODELS)],
        [[str(n), *(cell(model, n) for model in MODELS)] for n in sizes],
    )


def plot(summaries: list[Summary], path: Path) -> None:
    """Accuracy against images per class (log axis): a line per model through the draws' mean, the band
    between the lowest and highest draw, and the published points with their standard deviations."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for model in MODELS:
        line = [s for s in summaries if s.model == model]
        x = [s.per_class for s in line]
        ax.plot(x, [100 * s.mean for s in line], "o-", color=COLOURS[model], label=MODEL_NAMES[model])
        ax.fill_between(
            x, [100 * s.low for s in line], [100 * s.high for s in line], color=COLOURS[model], alpha=0.2
        )
    for (label, published), marker in zip(PUBLISHED.items(), ("s", "D"), strict=True):
        sizes = sorted(published)
        ax.errorbar(
            sizes,
            [published[n][0] for n in sizes],
            yerr=[published[n][1] for n in sizes],
            fmt=marker,
            mfc="none",
            color="black",
            capsize=3,
            label=label,
        )
    sizes = sorted({s.per_class for s in summaries})
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("test mean per-class accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("What ImageNet pretraining is worth in labelled images (band: lowest to highest draw)")
    save_figure(fig, path)


def as_metrics(summaries: list[Summary]) -> dict:
    """Each model's mean and standard deviation per size (``probe.n5.mean``), for ``dvc metrics``."""
    metrics: dict[str, dict] = defaultdict(dict)
    for s in summaries:
        metrics[s.model][f"n{s.per_class}"] = {"mean": round(s.mean, 4), "std": round(s.std, 4)}
    return dict(metrics)


def markdown_page(summary_table: Table, sentences: list[str], note: str) -> str:
    lines = [f"# {summary_table.title}", "", *sentences, "", *markdown(summary_table)[2:], note, ""]
    return "\n".join(lines)


def html_page(summary_table: Table, sentences: list[str], note: str, picture: Path) -> str:
    return page(
        "transferlab: data-efficiency curve",
        [
            f"<h1>{html.escape(summary_table.title)}</h1>",
            *(f"<p>{html.escape(s)}</p>" for s in sentences),
            embedded_image(picture, "test accuracy against training images per class"),
            html_table(summary_table, heading=False),
            f"<p>{html.escape(note)}</p>",
            "<p><a href='report.html'>The main comparison (report.html)</a></p>",
        ],
    )
