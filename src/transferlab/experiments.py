"""Summarise DVC experiments: what each varied setting does, and each model's best setting chosen on validation.

    transferlab experiments                       # reads `dvc exp show --json` in the project
    transferlab experiments --json shown.json --out metrics/experiments

Not a pipeline stage: it reads what ``dvc exp show --json`` lists (the experiments of the current commit, or
of more with ``--all-commits``) and, for each model (linear probe, fine-tuned, scratch), works out the
settings it really ran with (the ``train:`` section with its ``finetune:``/``scratch:`` overrides) and which
of them vary. Writes to ``--out``:

- ``experiments.md`` / ``experiments.csv``: each model's distinct settings, ranked by validation accuracy;
- ``validation_vs_params.png``: validation accuracy against each varied setting, the models side by side;
- ``heatmap_<model>.png``: for a model whose experiments vary exactly two settings (a grid);
- ``summary.json``: each model's chosen setting, its validation accuracy and, reported once, its test metrics.

The choice uses the validation accuracy alone (``best/val_acc`` of the training stage's summary); test
metrics are read only for the chosen setting. Runs without a validation score (``train.train_on_val:
true``, the final fit) are left out, and the summary says how to run them with validation. Settings a
commit's params.yaml does not name are read as today's defaults (with ``--all-commits``, an old commit may
have run with other ones).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .compare import NAMES
from .config import MODELS, RUNS, parse_params
from .errors import ConfigError
from .figures import plt, save_figure
from .fileio import read_json, write_csv, write_json, write_text

log = logging.getLogger("transferlab.experiments")
VALIDATION_METRIC = "best/val_acc"
TEST_METRICS = ("mean_per_class_acc", "top1")
NO_VALIDATION_HINT = "run them with -S train.train_on_val=false -S probe.train_on_val=false"


class ExperimentsError(RuntimeError):
    """Nothing to summarise, or dvc could not list the experiments."""


@dataclass(frozen=True)
class Experiment:
    """One experiment (or a commit) as ``dvc exp show --json`` lists it; names can repeat across commits, revs do not."""

    name: str
    rev: str
    params: dict  # params.yaml, as run
    metrics: dict  # metrics file path -> its values


@dataclass
class Setting:
    """One distinct setting of one model, with the experiments that ran it (several when it did not change)."""

    values: dict  # the settings the model ran with
    experiments: list[Experiment]
    val_acc: float  # the best of its experiments' scores (equal unless a run was nondeterministic) ...
    scored_by: Experiment  # ... scored by this one, whose test metrics are reported if the setting is chosen

    @property
    def runs(self) -> list[str]:
        return [e.name for e in self.experiments]


def experiments_from_show(shown: list) -> Iterator[Experiment]:
    """Completed experiments and their baseline commits; the workspace (a copy of one of them) and queued,
    running or failed experiments are skipped."""
    for commit in shown:
        if commit.get("rev") == "workspace":
            continue
        entries = [(commit.get("name") or commit["rev"][:7], {"rev": commit["rev"], **commit})]
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") in ("queued", "running", "failed"):
                continue
            latest = exp["revs"][0]
            entries.append((latest.get("name") or latest["rev"][:7], latest))
        for name, entry in entries:
            data = entry.get("data") or {}
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
            if entry.get("error") or not params:
                continue
            metrics = {path: (values or {}).get("data") or {} for path, values in (data.get("metrics") or {}).items()}
            yield Experiment(name, entry.get("rev") or name, params, metrics)


def model_settings(params: dict) -> dict[str, dict]:
    """The settings each model ran with: its section after overrides, plus the data and model sections.

    The fine-tuned model started from the probe (``init_head: probe``) also depends on the probe's settings.
    """
    checked = parse_params(params, check_arch=False)
    shared = {f"data.{k}": v for k, v in dataclasses.asdict(checked.data).items() if k != "source"}
    shared.update({f"model.{k}": v for k, v in dataclasses.asdict(checked.model).items()})
    probe = {f"probe.{k}": v for k, v in dataclasses.asdict(checked.probe).items()}
    settings = {"probe": {**shared, **probe}}
    for run in RUNS:
        cfg = checked.train_config(run)
        settings[run] = {**shared, **(probe if cfg.init_head == "probe" else {}), **dataclasses.asdict(cfg)}
    return settings


def validation_score(experiment: Experiment, model: str) -> float | None:
    value = experiment.metrics.get(f"metrics/train_{model}/metrics.json", {}).get(VALIDATION_METRIC)
    return None if value is None else float(value)


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def distinct_settings(experiments: list[Experiment], model: str) -> tuple[list[Setting], list[str]]:
    """The model's distinct settings, best validation accuracy first (ties: the first run name), and the varied keys.

    ``experiments`` have valid params (see :func:`valid_experiments`).
    """
    by_values: dict[str, Setting] = {}
    for experiment in sorted(experiments, key=lambda e: (e.name, e.rev)):
        score = validation_score(experiment, model)
        if score is None:
            continue
        values = model_settings(experiment.params)[model]
        setting = by_values.setdefault(_key(values), Setting(values, [], score, experiment))
        setting.experiments.append(experiment)
        if score > setting.val_acc:
            setting.val_acc, setting.scored_by = score, experiment
    settings = sorted(by_values.values(), key=lambda s: (-s.val_acc, s.scored_by.name))
    varied = [key for key in (settings[0].values if settings else {}) if len({_key(s.values.get(key)) for s in settings}) > 1]
    return settings, varied


def test_metrics(experiment: Experiment, model: str) -> dict:
    """The test metrics of one run: read for the chosen setting only, after the choice."""
    found = experiment.metrics.get(f"metrics/test_{model}/metrics.json", {})
    return {key: found[key] for key in TEST_METRICS if key in found}


def valid_experiments(experiments: list[Experiment]) -> tuple[list[Experiment], list[str]]:
    """The experiments whose params this code accepts, and a note for each of the others."""
    valid, notes = [], []
    for experiment in experiments:
        try:
            model_settings(experiment.params)
        except ConfigError as err:
            notes.append(f"{experiment.name}: its params are not valid for this code ({err})")
            continue
        valid.append(experiment)
    return valid, notes


def summarise(experiments: list[Experiment]) -> dict:
    """For each model with a validation score: its settings ranked, the varied keys, the choice and its test metrics."""
    summary = {}
    for model in MODELS:
        settings, varied = distinct_settings(experiments, model)
        if not settings:
            continue
        chosen = settings[0]
        summary[model] = {
            "settings": settings,
            "varied": varied,
            "chosen": {
                "runs": chosen.runs,
                "scored_by": chosen.scored_by.name,
                "val_acc": chosen.val_acc,
                "values": {key: chosen.values[key] for key in varied},
                "test": test_metrics(chosen.scored_by, model),
            },
        }
    if not summary:
        raise ExperimentsError(f"no experiment has a validation score ({VALIDATION_METRIC}); {NO_VALIDATION_HINT}")
    return summary


def _shown(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(summary: dict, skipped: int, notes: list[str]) -> str:
    lines = ["# Experiments: each model's best setting, chosen on the validation split", ""]
    if skipped:
        lines += [f"{skipped} experiment(s) without a validation score left out (trained on train + val); {NO_VALIDATION_HINT}.", ""]
    if notes:
        lines += ["Left out:", "", *(f"- {note}" for note in notes), ""]
    for model, part in summary.items():
        chosen, varied = part["chosen"], part["varied"]
        test = ", ".join(f"{key} {value:.2%}" for key, value in chosen["test"].items()) or "not evaluated"
        lines += [f"## {NAMES[model]}", ""]
        if not varied:
            lines += [f"No setting of this model varies across these experiments (validation accuracy {chosen['val_acc']:.2%}).", ""]
            continue
        described = ", ".join(f"{key}={_shown(value)}" for key, value in chosen["values"].items())
        lines += [
            f"Chosen on validation: **{described}** ({chosen['scored_by']}), validation accuracy {chosen['val_acc']:.2%}.",
            f"Its test metrics, reported once and never used to choose: {test}.",
            "",
            "| " + " | ".join(["validation accuracy", *varied, "experiments"]) + " |",
            "|" + "---|" * (len(varied) + 2),
        ]
        for setting in part["settings"]:
            cells = [f"{setting.val_acc:.2%}", *(_shown(setting.values[key]) for key in varied), ", ".join(setting.runs)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _positions(values: list) -> tuple[list, list, bool]:
    """x positions, the distinct values in order, and whether to use a log axis (positive values spanning 10x or more)."""
    distinct = sorted({_key(v): v for v in values}.values(), key=lambda v: (not _numeric([v]), v if _numeric([v]) else str(v)))
    if _numeric(distinct):
        return values, distinct, min(distinct) > 0 and max(distinct) / min(distinct) >= 10
    index = {_key(v): i for i, v in enumerate(distinct)}
    return [index[_key(v)] for v in values], distinct, False


def plot_against_params(summary: dict, path: Path) -> None:
    """Validation accuracy against each varied setting: one column per model, one row per setting.

    With two varied settings, one line per value of the other one; otherwise every run is a dot and the line
    joins the best score at each value. The chosen setting is a star.
    """
    models = [m for m, part in summary.items() if part["varied"]]
    rows = max(len(summary[m]["varied"]) for m in models)
    fig, axes = plt.subplots(rows, len(models), figsize=(4.6 * len(models), 3.4 * rows), squeeze=False)
    for column, model in enumerate(models):
        part = summary[model]
        varied, settings, chosen = part["varied"], part["settings"], part["settings"][0]
        for row in range(rows):
            ax = axes[row][column]
            if row >= len(varied):
                ax.axis("off")
                continue
            key = varied[row]
            others = [k for k in varied if k != key]
            x, distinct, log_axis = _positions([s.values[key] for s in settings])
            groups = {"": None}
            if len(others) == 1:
                groups = {_key(value): value for value in _positions([s.values[others[0]] for s in settings])[1]}
            for group_key, group_value in groups.items():
                members = [i for i, s in enumerate(settings) if len(others) != 1 or _key(s.values[others[0]]) == group_key]
                points = sorted((x[i], settings[i].val_acc) for i in members)
                best_at = {}
                for px, py in points:
                    best_at[px] = max(best_at.get(px, py), py)
                label = f"{others[0]}={_shown(group_value)}" if len(others) == 1 else None
                line = ax.plot(list(best_at), list(best_at.values()), marker="o", label=label)[0]
                ax.scatter([p[0] for p in points], [p[1] for p in points], color=line.get_color(), s=12)
            ax.scatter([x[0]], [chosen.val_acc], marker="*", s=220, color="gold", edgecolor="black", zorder=5, label="chosen")
            if log_axis:
                ax.set_xscale("log")
            ax.set_xticks(distinct if _numeric(distinct) else range(len(distinct)), [_shown(v) for v in distinct])
            ax.minorticks_off()
            ax.set_xlabel(key)
            ax.set_ylabel("validation accuracy")
            ax.set_title(NAMES[model], fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Validation accuracy against each varied setting")
    save_figure(fig, path)


def plot_heatmap(model: str, part: dict, path: Path) -> None:
    """A two-setting grid as a heatmap of validation accuracy; the chosen cell is outlined."""
    (row_key, col_key), settings = part["varied"], part["settings"]
    rows = _positions([s.values[row_key] for s in settings])[1]
    cols = _positions([s.values[col_key] for s in settings])[1]
    grid = np.full((len(rows), len(cols)), np.nan)
    for s in settings:
        r, c = [_key(v) for v in rows].index(_key(s.values[row_key])), [_key(v) for v in cols].index(_key(s.values[col_key]))
        grid[r, c] = s.val_acc if math.isnan(grid[r, c]) else max(grid[r, c], s.val_acc)
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 0.8 * len(rows) + 1.8))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (r, c), value in np.ndenumerate(grid):
        if not math.isnan(value):
            ax.text(c, r, f"{value:.1%}", ha="center", va="center", color="white" if value < np.nanmean(grid) else "black", fontsize=9)
    best_r = [_key(v) for v in rows].index(_key(settings[0].values[row_key]))
    best_c = [_key(v) for v in cols].index(_key(settings[0].values[col_key]))
    ax.add_patch(plt.Rectangle((best_c - 0.5, best_r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(cols)), [_shown(v) for v in cols])
    ax.set_yticks(range(len(rows)), [_shown(v) for v in rows])
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    fig.colorbar(image, ax=ax, label="validation accuracy")
    ax.set_title(f"{NAMES[model]}: validation accuracy (chosen: red)", fontsize=10)
    save_figure(fig, path)


def summary_json(summary: dict, skipped: int, notes: list[str]) -> dict:
    return {
        "metric": f"validation accuracy ({VALIDATION_METRIC}); test metrics of the chosen setting only",
        "experiments_without_validation": skipped,
        "left_out": notes,
        **{model: {"varied": part["varied"], **part["chosen"]} for model, part in summary.items()},
    }


def write_outputs(summary: dict, skipped: int, notes: list[str], out: Path) -> list[Path]:
    """Every output file, written atomically; pictures of an earlier summary that no longer apply are removed."""
    for stale in [*out.glob("heatmap_*.png"), out / "validation_vs_params.png"]:
        stale.unlink(missing_ok=True)
    write_text(out / "experiments.md", markdown(summary, skipped, notes))
    write_json(out / "summary.json", summary_json(summary, skipped, notes))
    varied = sorted({key for part in summary.values() for key in part["varied"]})
    rows = [
        [model, f"{s.val_acc:.6g}", *(_shown(s.values.get(key, "")) for key in varied), " ".join(s.runs)]
        for model, part in summary.items()
        for s in part["settings"]
    ]
    write_csv(out / "experiments.csv", ["model", "val_acc", *varied, "experiments"], rows)
    written = [out / "experiments.md", out / "summary.json", out / "experiments.csv"]
    if any(part["varied"] for part in summary.values()):
        plot_against_params(summary, out / "validation_vs_params.png")
        written.append(out / "validation_vs_params.png")
    for model, part in summary.items():
        if len(part["varied"]) == 2:
            plot_heatmap(model, part, out / f"heatmap_{model}.png")
            written.append(out / f"heatmap_{model}.png")
    return written


def dvc_exp_show(all_commits: bool) -> list:
    command = ["dvc", "exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise ExperimentsError("dvc is not on PATH: run this inside the project's environment (uv run ...)") from err
    if result.returncode != 0:
        raise ExperimentsError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout or "[]")


def run(shown_json: Path | None, out: Path, all_commits: bool = False) -> dict:
    shown = read_json(shown_json) if shown_json else dvc_exp_show(all_commits)
    experiments = list(experiments_from_show(shown))
    if not experiments:
        raise ExperimentsError("dvc exp show lists no completed experiment: run some with dvc exp run first")
    experiments, notes = valid_experiments(experiments)
    for note in notes:
        log.warning("left out %s", note)
    skipped = sum(all(validation_score(e, model) is None for model in MODELS) for e in experiments)
    summary = summarise(experiments)
    for path in write_outputs(summary, skipped, notes, out):
        print(path)
    for model, part in summary.items():
        chosen = part["chosen"]
        print(f"{NAMES[model]}: chosen {chosen['values'] or '(nothing varied)'} val {chosen['val_acc']:.2%}, test {chosen['test']}")
    return summary
