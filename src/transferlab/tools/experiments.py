"""``transferlab experiments``: each model's best setting among the DVC experiments, chosen on validation
alone, what each varied setting does, and the command that makes the chosen setting's final fit (the why of
each rule: docs/experiments.md).

    transferlab experiments                       # the experiments of the current commit, listed by DVC
    transferlab experiments --json shown.json --out metrics/experiments   # a saved `dvc exp show --json`
    transferlab experiments --table               # the experiments side by side, to read in a terminal

The listing: the completed experiments and their commits, as ``dvc exp show --json`` gives them (DVC's API
in this process, or a saved file). The selection, per model: the settings it ran with (its section,
``runtime:``, ``data:`` but its source, and the features' and the probe's settings where it starts from them;
never ``train_on_val``, the protocol, nor ``data.val_fold``: a setting run on several validation folds is one
setting, scored by its mean over the folds the most settings ran, with that mean's standard error), scored by
the last epoch's ``val/acc`` of its holdout twin, else of its training stage (the epoch a final fit keeps;
the probe's ``best/val_acc``). Left out and named: runs trained on train + val (no validation score), params
today's code rejects, runs on other images than the final fit's ``data.source``, and scores their commit's
dvc.lock shows another run made (the stage that wrote one, or one upstream, ran with other params or data
than the experiment's params.yaml). A summary identical to its baseline commit's is the baseline's (its
stage did not run in that experiment): it counts once, for the baseline. No test metric is read: a
validation-only grid point holds its baseline's. The report: each model's settings ranked and the final-fit
command, ``dvc exp run -S ...`` with the chosen values, any other key where the choice differs from the
workspace's params.yaml and ``train_on_val: true``; it trains on train + val and scores the test split once.

Writes to ``--out``: ``experiments.md`` and ``experiments.csv`` (each model's settings ranked),
``summary.json`` (each model's choice and its final-fit command), ``validation_vs_params.png`` and, for a
model whose experiments vary exactly two settings, ``heatmap_<model>.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from dvc.exceptions import DvcException
from dvc.repo import Repo
from dvc.utils.flatten import flatten
from dvc.utils.serialize import YAMLFileCorruptedError, parse_yaml

from ..config import FINETUNE_ONLY, MODEL_NAMES, MODEL_SECTIONS, MODELS, TRAINED_MODELS, Params, parse_params
from ..errors import ConfigError
from ..figures import plt, save_figure
from ..fileio import read_json, write_csv, write_json, write_text
from ..paths import holdout

log = logging.getLogger("transferlab.tools.experiments")
VALIDATION_METRIC = "the last epoch's val/acc (the probe's: best/val_acc, at its chosen C)"
PROTOCOL = "train_on_val"  # the key that turns a run into a final fit on train + val (no validation score)
# how to get validation scores: each model's grid, queued validation-only
# (up to its holdout stage, never the test split)
VALIDATION_RECIPES = {
    "probe": "dvc exp run --queue train_probe -S 'probe.C=[0.1],[0.3]'",
    "finetune": "dvc exp run --queue holdout_finetune -S 'train.lr=...'",
    "scratch": "dvc exp run --queue holdout_scratch -S 'scratch.lr=...'",
}
NO_VALIDATION_HINT = "queue validation-only runs: " + "; ".join(VALIDATION_RECIPES[model] for model in MODELS)
# a run's validation fold: the same setting on another fold is the same setting, scored on other images, so
# it is left out of the settings as data.source is
FOLD = "data.val_fold"
FINAL_FIT = "trains on train + val with the chosen setting and evaluates the test split once"
HYDRA_WORDS = ("true", "false", "null", "nan", "inf")  # a text value that reads as one of these is quoted


class ExperimentsError(RuntimeError):
    """Nothing to summarize, or dvc could not list the experiments."""


@dataclass(frozen=True)
class Experiment:
    """One experiment (or a commit) as ``dvc exp show --json`` lists it; names can repeat across commits,
    revs do not."""

    name: str
    rev: str
    params: dict  # params.yaml, as run
    metrics: dict  # metrics file path -> its values
    baseline: Experiment | None = None  # the commit it ran on; None for a commit
    # the models whose validation score its dvc.lock shows a run on other params or data made (see own_runs)
    stale_scores: frozenset[str] = frozenset()


@dataclass
class Setting:
    """One distinct setting of one model, with the experiments that ran it: several when it did not change,
    or when it ran on several validation folds (``data.val_fold``), which is one setting scored on each."""

    values: dict  # the settings the model ran with
    experiments: list[Experiment]
    # per validation fold, the best of its runs' scores there (equal unless a run was nondeterministic) ...
    scores: dict[int, float] = dataclasses.field(default_factory=dict)
    scorers: dict[int, str] = dataclasses.field(default_factory=dict)  # ... and the run that scored it
    compared: list[int] = dataclasses.field(default_factory=list)  # the folds it is ranked on (see rank)

    @property
    def runs(self) -> list[str]:
        return [e.name for e in self.experiments]

    @property
    def scored_by(self) -> str:
        return ", ".join(self.scorers[fold] for fold in self.compared)

    @property
    def val_acc(self) -> float:
        """The mean validation accuracy over the compared folds."""
        return mean_and_error([self.scores[fold] for fold in self.compared])[0]

    @property
    def standard_error(self) -> float | None:
        """Of that mean, across the compared folds; None for one fold."""
        return mean_and_error([self.scores[fold] for fold in self.compared])[1]


@dataclass
class Report:
    """What ``transferlab experiments`` writes: each model's choice, and what it left out."""

    models: dict  # per model with a validation score: its settings ranked, its choice (see choose_settings)
    unscored: dict[str, list[str]]  # per model, the experiments that trained it on train + val
    left_out: list[str]  # a note for each experiment (or score) left out
    unchecked: list[str]  # the experiments whose dvc.lock git cannot show here
    base_name: str  # whose params.yaml the final-fit commands start from
    final_fit_all: dict  # one command for every model's final fit (see final_fit_all)


def mean_and_error(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None for one value)."""
    error = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else None
    return float(np.mean(values)), None if error is None else float(error)


# the listing


def _experiment(name: str, entry: dict, baseline: Experiment | None = None) -> Experiment | None:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
    if entry.get("error") or not params:
        return None
    metrics = {path: (values or {}).get("data") or {} for path, values in (data.get("metrics") or {}).items()}
    return Experiment(name, entry.get("rev") or name, params, metrics, baseline)


def experiments_from_show(shown: list) -> Iterator[Experiment]:
    """Completed experiments and their baseline commits; the workspace (a copy of one of them) and queued,
    running or failed experiments are skipped."""
    for commit in shown:
        if commit.get("rev") == "workspace":
            continue
        baseline = _experiment(commit.get("name") or commit["rev"][:7], commit)
        if baseline:
            yield baseline
        for exp in commit.get("experiments") or []:
            if (exp.get("executor") or {}).get("state") in ("queued", "running", "failed"):
                continue
            latest = exp["revs"][0]
            found = _experiment(latest.get("name") or latest["rev"][:7], latest, baseline)
            if found:
                yield found


def workspace_params(shown: list) -> dict | None:
    """params.yaml of the workspace, where ``dvc exp run`` applies its ``-S``."""
    for commit in shown:
        if commit.get("rev") == "workspace":
            found = _experiment("workspace", commit)
            return found.params if found else None
    return None


def exp_show(all_commits: bool) -> list:
    """What ``dvc exp show --json`` prints, from DVC's API in this process. Not ``dvc.api.exp_show``: its flat
    records give every value as a float or a string (``epochs: 2`` as 2.0, ``true`` as ``'True'``) and revs
    cut to 7 characters, so params would no longer read back as they ran."""
    try:
        with Repo() as repo:
            return [state.dumpd() for state in repo.experiments.show(all_commits=all_commits)]
    except DvcException as err:
        raise ExperimentsError(f"dvc could not list the experiments: {err}") from err


def only_named(experiments: list[Experiment], names: list[str]) -> list[Experiment]:
    """The named experiments (one grid of several queued together), in the listing's order."""
    missing = sorted(set(names) - {e.name for e in experiments})
    if missing:
        raise ExperimentsError(f"--only: no completed experiment named {', '.join(missing)} in the listing")
    return [e for e in experiments if e.name in names]


def listed_experiments(
    shown_json: Path | None, all_commits: bool, only: list[str] | None
) -> tuple[list, list[Experiment]]:
    """The listing (DVC's here, or a saved ``dvc exp show --json``) and its completed experiments, those of
    ``only`` if given."""
    shown = read_json(shown_json) if shown_json else exp_show(all_commits)
    experiments = list(experiments_from_show(shown))
    if only:
        experiments = only_named(experiments, only)
    if not experiments:
        raise ExperimentsError("dvc exp show lists no completed experiment: run some with dvc exp run first")
    return shown, experiments


# the selection


def _section(prefix: str, config, skip: tuple = ()) -> dict:
    return {f"{prefix}{key}": value for key, value in dataclasses.asdict(config).items() if key not in skip}


def _run_section(run: str, cfg) -> dict:
    """The run's own section, keys without the section name; scratch: without the fine-tuning's keys,
    which it cannot set."""
    return _section("", cfg, (PROTOCOL, *(FINETUNE_ONLY if run == "scratch" else ())))


def model_settings(params: dict) -> dict[str, dict]:
    """The settings each model ran with (see the module's docstring), ``train_on_val`` left out."""
    checked = parse_params(params)
    data = _section("data.", checked.data, ("source", "val_fold"))
    model = _section("model.", checked.model)
    features = _section("features.", checked.features)
    probe = _section("probe.", checked.probe, (PROTOCOL,))
    settings = {"probe": {**data, **model, **features, **probe}}
    for run in TRAINED_MODELS:
        cfg = checked.train_config(run)
        on_features = cfg.mode == "feature_extract" and not cfg.augment
        upstream = {**features, **probe} if cfg.init_head == "probe" else features if on_features else {}
        settings[run] = {
            **data,
            **(model if cfg.mode != "scratch" else {"model.arch": checked.model.arch}),
            **_section("runtime.", checked.runtime),
            **upstream,
            **_run_section(run, cfg),
        }
    return settings


def params_key(model: str, key: str) -> str:
    """The params.yaml key of one of the model's settings: the fine-tuned model's ``lr`` is ``train.lr``."""
    return key if "." in key else f"{MODEL_SECTIONS[model]}.{key}"


def protocol_keys(model: str, values: dict) -> list[str]:
    """The ``train_on_val`` keys the model's final fit sets true: its own, and the probe's when it starts
    from the probe."""
    own = "probe" if model == "probe" else MODEL_SECTIONS[model]
    return [
        f"{own}.{PROTOCOL}",
        *(["probe." + PROTOCOL] if model != "probe" and values.get("init_head") == "probe" else []),
    ]


def summary_paths(model: str) -> list[str]:
    """Where a model's training summaries are: its holdout twin's first (the validation run of today's
    pipeline), then its training stage's own (a validation run too with ``train_on_val: false``)."""
    own = f"metrics/train_{model}/metrics.json"
    return [f"metrics/train_{holdout(model)}/metrics.json", own] if model in TRAINED_MODELS else [own]


def fresh_summaries(experiment: Experiment, model: str) -> dict[str, dict]:
    """The model's training summaries this experiment wrote, by path: not those that are its baseline commit's
    (the stages did not run in this experiment), nor missing ones."""
    baseline = experiment.baseline.metrics if experiment.baseline is not None else {}
    return {
        path: experiment.metrics[path]
        for path in summary_paths(model)
        if experiment.metrics.get(path) and experiment.metrics[path] != baseline.get(path)
    }


def scored_path(experiment: Experiment, model: str) -> str | None:
    """The path of the first of the model's training summaries this experiment wrote with a validation
    score."""
    fresh = fresh_summaries(experiment, model)
    return next((path for path, found in fresh.items() if score_in(found, model) is not None), None)


def trained_summary(experiment: Experiment, model: str) -> dict | None:
    """The summary at :func:`scored_path` (else the first the experiment wrote); None when each is its
    baseline commit's or missing."""
    fresh = fresh_summaries(experiment, model)
    path = scored_path(experiment, model) or next(iter(fresh), None)
    return fresh[path] if path else None


def score_in(summary: dict, model: str) -> float | None:
    """The validation accuracy that a final fit of the run's setting stands for. A final fit trains a fixed
    number of epochs and keeps the last, so a trained model's score is its last epoch's (dvclive's latest
    ``val/acc``), not its best epoch's, which can come early in a long cosine schedule and overstate what the
    final fit gets."""
    if model == "probe":
        value = summary.get("best/val_acc")
    else:
        value = summary.get("val/acc", (summary.get("val") or {}).get("acc"))
    return None if value is None else float(value)


def validation_score(experiment: Experiment, model: str) -> float | None:
    return score_in(trained_summary(experiment, model) or {}, model)


def baseline_copy(experiment: Experiment, model: str) -> bool:
    """The model's training summaries are its baseline commit's: its stages did not run in this experiment."""
    return trained_summary(experiment, model) is None and any(
        experiment.metrics.get(p) for p in summary_paths(model)
    )


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def distinct_settings(
    experiments: list[Experiment], model: str
) -> tuple[list[Setting], list[Setting], list[str]]:
    """The model's distinct settings ranked (see :func:`rank`), those left out of the ranking, and the varied
    keys.

    ``experiments`` have valid params (see :func:`valid_experiments`).
    """
    by_values: dict[str, Setting] = {}
    for experiment in sorted(experiments, key=lambda e: (e.name, e.rev)):
        score = validation_score(experiment, model)
        if score is None or baseline_copy(experiment, model) or model in experiment.stale_scores:
            continue
        values, fold = model_settings(experiment.params)[model], experiment.params["data"]["val_fold"]
        setting = by_values.setdefault(_key(values), Setting(values, []))
        setting.experiments.append(experiment)
        if score > setting.scores.get(fold, -math.inf):
            setting.scores[fold], setting.scorers[fold] = score, experiment.name
    ranked, unranked = rank(list(by_values.values()))
    # a key only some settings have (the probe's, for LP-FT runs among random-head ones) varies only if its
    # values do
    keys = dict.fromkeys(key for setting in ranked for key in setting.values)
    varied = [key for key in keys if len({_key(s.values[key]) for s in ranked if key in s.values}) > 1]
    return ranked, unranked, varied


def comparison_folds(settings: list[Setting]) -> list[int]:
    """The validation folds the settings are compared on: of the sets of folds they ran (and the one all of
    them share), the set the most settings ran every fold of; then the larger, then the lower folds."""
    candidates = {tuple(sorted(s.scores)) for s in settings}
    common = set.intersection(*(set(s.scores) for s in settings))
    if common:
        candidates.add(tuple(sorted(common)))

    def covered(folds: tuple) -> tuple:
        return sum(set(folds) <= set(s.scores) for s in settings), len(folds), tuple(-f for f in folds)

    return list(max(candidates, key=covered))


def rank(settings: list[Setting]) -> tuple[list[Setting], list[Setting]]:
    """The settings that ran every comparison fold (see :func:`comparison_folds`), best mean validation
    accuracy over those folds first (ties: the first scoring run's name), so that each comparison is on the
    same images; and the others, left out of the ranking."""
    if not settings:
        return [], []
    folds = comparison_folds(settings)
    ranked = [s for s in settings if set(folds) <= set(s.scores)]
    for setting in ranked:
        setting.compared = folds
    ranked.sort(key=lambda s: (-s.val_acc, min(s.scorers[fold] for fold in folds)))
    return ranked, [s for s in settings if s not in ranked]


def paired_difference(setting: Setting, chosen: Setting) -> tuple[float, float | None]:
    """The setting's validation accuracy minus the chosen one's, fold by fold: the mean and its standard
    error (None for one fold). Unlike each mean's own error, it leaves out how hard each fold is, which
    every setting shares: the measure of whether a candidate is behind by more than the noise."""
    return mean_and_error([setting.scores[fold] - chosen.scores[fold] for fold in chosen.compared])


def without_validation(experiments: list[Experiment]) -> dict[str, list[str]]:
    """For each model, the experiments that trained it without a validation score
    (on train + val: a final fit)."""
    found = {
        model: [
            e.name for e in experiments if trained_summary(e, model) and validation_score(e, model) is None
        ]
        for model in MODELS
    }
    return {model: names for model, names in found.items() if names}


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


# the final fit


def hydra_value(value) -> str:
    """A value as a Hydra override writes it (``dvc exp run -S``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][\w./-]*", text) and text.lower() not in HYDRA_WORDS:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _applied(base: dict, overrides: dict) -> dict:
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][name] = value
    return raw


def _command(overrides: dict) -> str:
    """``dvc exp run`` with one ``-S`` per override (params.yaml names every key: no ``++`` needed)."""
    parts = ["dvc", "exp", "run"]
    for key, value in overrides.items():
        parts += ["-S", shlex.quote(f"{key}={hydra_value(value)}")]
    return " ".join(parts)


def _problem(overrides: dict, base: dict, chosen: dict[str, dict]) -> str | None:
    """Why ``overrides`` on ``base`` would not make the final fit of each model's ``chosen`` setting,
    or None."""
    try:
        settings = model_settings(_applied(base, overrides))
    except ConfigError as err:
        return f"the final fit's params are not valid: {err}"
    for model, values in chosen.items():
        differ = [key for key, value in values.items() if _key(settings[model].get(key)) != _key(value)]
        if differ:
            return (
                f"{params_key(model, differ[0])} would not be the {MODEL_NAMES[model]} model's chosen value"
            )
    return None


def final_fit(model: str, chosen: Setting, varied: list[str], base: dict) -> dict:
    """The command that makes the chosen setting's final fit from ``base`` (the params ``dvc exp run``
    starts from).

    It sets the varied keys to the chosen values, every other key where the choice differs from ``base``, and
    ``train_on_val: true`` (see :func:`protocol_keys`): the fit on train + val, whose evaluation scores the
    test split once.
    """
    target = {params_key(model, key): value for key, value in chosen.values.items()}
    target.update(dict.fromkeys(protocol_keys(model, chosen.values), True))
    current = _flat_params(parse_params(base))
    first = [params_key(model, key) for key in varied]
    overrides = {key: target[key] for key in first if key in target}
    changed = [key for key, value in target.items() if _key(current.get(key)) != _key(value)]
    overrides.update({key: target[key] for key in changed if key not in overrides})
    return _fit(overrides, base, {model: chosen.values})


def _fit(overrides: dict, base: dict, chosen: dict[str, dict]) -> dict:
    """A final fit: its command, its overrides and why it would not make the ``chosen`` settings (or None)."""
    return {
        "command": _command(overrides),
        "overrides": overrides,
        "problem": _problem(overrides, base, chosen),
    }


def _flat_params(checked: Params) -> dict:
    sections = ("data", "model", "runtime", "features", "probe", *MODEL_SECTIONS.values())
    skipped = {"scratch": FINETUNE_ONLY}
    return {
        key: value
        for section in sections
        for key, value in _section(f"{section}.", getattr(checked, section), skipped.get(section, ())).items()
    }


def final_fit_all(models: dict, base: dict) -> dict:
    """One command for every model's final fit at once, when their choices agree on the keys they share."""
    overrides = {}
    for part in models.values():
        overrides.update(part["chosen"]["final_fit"]["overrides"])
    return _fit(overrides, base, {model: part["settings"][0].values for model, part in models.items()})


def choose_base(shown: list, experiments: list[Experiment]) -> tuple[str, dict]:
    """The params the final-fit commands start from: the workspace's, else the first commit's listed,
    else an experiment's."""
    workspace = workspace_params(shown)
    candidates = [("the workspace", workspace)] if workspace else []
    candidates += [(f"commit {e.name}", e.params) for e in experiments if e.baseline is None]
    candidates += [(f"experiment {e.name}", e.params) for e in experiments]
    for name, params in candidates:
        try:
            parse_params(params)
        except ConfigError:
            continue
        return name, params
    raise ExperimentsError("no listed params are valid for this code")


# what is left out: runs on other images, and scores their dvc.lock shows another run made


def data_source(params: dict) -> str:
    return str((params.get("data") or {}).get("source", "download"))


def on_the_same_data(experiments: list[Experiment], base: dict) -> tuple[list[Experiment], list[str]]:
    """The experiments on ``base``'s images (``data.source``), and a note for the others: validation scores
    on other images are not comparable, so they are never ranked together."""
    source = data_source(base)
    kept = [e for e in experiments if data_source(e.params) == source]
    notes = [
        f"{e.name}: it ran on other images (data.source: {data_source(e.params)}), "
        f"not those of the final fit's params ({source})"
        for e in experiments
        if data_source(e.params) != source
    ]
    return kept, notes


def lock_stages(rev: str) -> dict | None:
    """The stages of dvc.lock as committed at ``rev``, read as DVC reads it (YAML 1.2: ``1e-05`` is a
    number); None where git cannot show it here (a saved listing's commit from another clone, a commit
    without a dvc.lock)."""
    try:
        shown = subprocess.run(
            ["git", "show", f"{rev}:./dvc.lock"], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:  # no git
        return None
    if shown.returncode != 0:
        return None
    try:
        return parse_yaml(shown.stdout, f"{rev}:dvc.lock").get("stages") or {}
    except YAMLFileCorruptedError:
        return None


def _writer(stages: dict, path: str) -> tuple[str, dict] | None:
    """The dvc.lock stage whose outputs hold ``path``, and that output."""
    for name, stage in stages.items():
        for out in stage.get("outs") or []:
            if path == out["path"] or path.startswith(out["path"].rstrip("/") + "/"):
                return name, out
    return None


def params_differences(recorded: dict, params: dict) -> list[str]:
    """Each key of ``recorded`` (what dvc.lock says a stage ran with from params.yaml: a whole section, or one
    key) whose value in ``params`` differs, with both values; a key a recorded section lacks counts too."""
    missing = "(not set)"
    ran, now = flatten(recorded), flatten(params)
    added = [key for key in now if key not in ran and any(key.startswith(f"{name}.") for name in recorded)]
    return [
        f"{key}: {_shown(ran.get(key, missing))} (params.yaml: {_shown(now.get(key, missing))})"
        for key in [*ran, *added]
        if _key(ran.get(key, missing)) != _key(now.get(key, missing))
    ]


def lock_differences(stages: dict, path: str, params: dict) -> list[str]:
    """How the run that wrote ``path`` differs from one on ``params``, as dvc.lock records the stage that
    wrote it and each stage upstream of it: a param one of them ran with another value of, an input one of
    them read another version of than the stage that makes it last wrote. Empty for the params' own run."""
    found = _writer(stages, path)
    if found is None:
        return [f"no stage of its dvc.lock wrote {path}"]
    differences, pending, seen = [], [found[0]], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        stage = stages[name]
        recorded = (stage.get("params") or {}).get("params.yaml") or {}
        differences += [f"{name} ran with {change}" for change in params_differences(recorded, params)]
        for dep in stage.get("deps") or []:
            upstream = _writer(stages, dep["path"])
            if upstream is None:  # a source file, not a stage's output
                continue
            pending.append(upstream[0])
            if upstream[1]["path"] == dep["path"] and upstream[1].get("md5") != dep.get("md5"):
                differences.append(f"{name} ran on another {dep['path']} than {upstream[0]} last wrote")
    return list(dict.fromkeys(differences))


def own_runs(experiments: list[Experiment]) -> tuple[list[Experiment], list[str], list[str]]:
    """The experiments, each marked with the models whose validation score is not its own params' run (its
    commit's dvc.lock records the stage that wrote it, or one upstream, run with other params or on other
    data: params.yaml changed and committed without re-running them); a note for each such experiment; and
    the names of those whose dvc.lock git cannot show here (not checked)."""
    checked, notes, unchecked = [], [], []
    for experiment in experiments:
        scored = {model: path for model in MODELS if (path := scored_path(experiment, model))}
        stages = lock_stages(experiment.rev) if scored else {}
        if stages is None:
            unchecked.append(experiment.name)
            checked.append(experiment)
            continue
        stale = {model: lock_differences(stages, path, experiment.params) for model, path in scored.items()}
        stale = {model: differences for model, differences in stale.items() if differences}
        if stale:
            differences = "; ".join(dict.fromkeys(d for found in stale.values() for d in found))
            scores = "score" if len(stale) == 1 else "scores"
            notes.append(
                f"{experiment.name}: its {', '.join(MODEL_NAMES[m] for m in stale)} validation {scores} "
                "came from "
                f"stages run on other params or data than its params.yaml (its dvc.lock: {differences}); "
                "re-run its stages to score it"
            )
        checked.append(dataclasses.replace(experiment, stale_scores=frozenset(stale)))
    return checked, notes, unchecked


def checked_runs(experiments: list[Experiment]) -> tuple[list[Experiment], list[str], list[str]]:
    """:func:`own_runs`, its notes and what it could not check logged."""
    experiments, stale, unchecked = own_runs(experiments)
    for note in stale:
        log.warning("not ranked %s", note)
    if unchecked:
        log.warning(
            "not checked against dvc.lock (git cannot show it at their commits): %s", ", ".join(unchecked)
        )
    return experiments, stale, unchecked


# the choice


def choose_settings(experiments: list[Experiment], base: dict) -> dict:
    """For each model with a validation score: its settings ranked, the varied keys, the choice and its
    final-fit command."""
    models = {}
    for model in MODELS:
        settings, unranked, varied = distinct_settings(experiments, model)
        if not settings:
            continue
        chosen = settings[0]
        models[model] = {
            "settings": settings,
            "unranked": unranked,
            "varied": varied,
            "chosen": {
                "runs": chosen.runs,
                "scored_by": chosen.scored_by,
                "val_acc": chosen.val_acc,
                "folds": chosen.compared,
                "val_acc_se": chosen.standard_error,
                "values": {key: chosen.values[key] for key in varied if key in chosen.values},
                "final_fit": final_fit(model, chosen, varied, base),
            },
        }
    if not models:
        raise ExperimentsError(
            f"no experiment has a validation score ({VALIDATION_METRIC}); {NO_VALIDATION_HINT}"
        )
    return models


def report_of(shown: list, experiments: list[Experiment]) -> Report:
    """The experiments' report: each model's choice among those that count, and a note for the others (each
    logged as it is found)."""
    experiments, left_out = valid_experiments(experiments)
    for note in left_out:
        log.warning("left out %s", note)
    base_name, base = choose_base(shown, experiments)
    experiments, other_data = on_the_same_data(experiments, base)
    for note in other_data:
        log.warning("left out %s", note)
    experiments, stale, unchecked = checked_runs(experiments)
    models = choose_settings(experiments, base)
    unscored = without_validation(experiments)
    left_out += other_data + stale
    return Report(models, unscored, left_out, unchecked, base_name, final_fit_all(models, base))


# the report


def _shown(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _final_fit_line(fit: dict) -> list[str]:
    lines = [
        f"Final fit ({FINAL_FIT}): `{fit['command']}`"
        + ("" if fit["overrides"] else ", the params as they are")
    ]
    if fit["problem"]:
        lines.append(f"Not runnable as it stands: {fit['problem']}.")
    return lines


def _accuracy(setting: Setting) -> str:
    error = setting.standard_error
    return f"{setting.val_acc:.2%}" + ("" if error is None else f" ± {error:.2%}")


def _folds(folds: list[int]) -> str:
    return f"fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))}"


def _folds_lines(part: dict) -> list[str]:
    """Which validation folds the scores are means of, when the settings ran on several."""
    settings, unranked = part["settings"], part["unranked"]
    folds = sorted({fold for s in [*settings, *unranked] for fold in s.scores})
    if len(folds) == 1:
        return []
    compared = settings[0].compared
    lines = [
        f"Validation folds run ({FOLD}): {', '.join(map(str, folds))}. The settings are compared on "
        f"{_folds(compared)}, the folds the most of them ran, so that each comparison is on the same images"
        + (
            ": each is scored by its mean over them, ± the standard error of that mean across folds, and "
            "is measured against the chosen one fold by fold (vs chosen: the mean difference ± its standard "
            "error, which leaves out how hard each fold is)."
            if len(compared) > 1
            else "."
        )
    ]
    extra = [
        f"fold {fold} ({s.scorers[fold]})" for s in settings for fold in sorted(set(s.scores) - {*compared})
    ]
    if extra:
        lines.append(f"Not in the comparison: {', '.join(extra)}.")
    if unranked:
        described = "; ".join(f"{', '.join(s.runs)} ({_folds(sorted(s.scores))})" for s in unranked)
        lines.append(f"Not ranked, as they did not run every one of those folds: {described}.")
    return [*lines, ""]


def _markdown_preamble(report: Report) -> list[str]:
    """What the summary reads, the final fit of every model, and what it left out."""
    lines = [
        "# Experiments: each model's best setting, chosen on the validation split",
        "",
        "No test metric is shown: the grid's experiments are validation-only (what their commits hold under "
        "metrics/test_* is the baseline's), and the test split is scored once, "
        "by the final fit of the chosen setting. "
        f"The final-fit commands start from the params.yaml of {report.base_name}.",
        "",
    ]
    together = report.final_fit_all
    if len(report.models) > 1 and together["problem"]:
        lines += [
            f"No single final fit for every model: {together['problem']}; run each model's command.",
            "",
        ]
    elif len(report.models) > 1:
        lines += [f"Every model's final fit in one run ({FINAL_FIT}): `{together['command']}`", ""]
    if report.unscored:
        described = "; ".join(
            f"{MODEL_NAMES[model]}: {', '.join(names)}" for model, names in report.unscored.items()
        )
        lines += [f"Left out, trained on train + val (no validation score): {described}.", ""]
    if report.left_out:
        lines += ["Left out:", "", *(f"- {note}" for note in report.left_out), ""]
    if report.unchecked:
        checked = ", ".join(report.unchecked)
        lines += [f"Not checked against their dvc.lock (git cannot show it here): {checked}.", ""]
    return lines


def _settings_table(part: dict) -> list[str]:
    """The model's settings ranked; on several folds, each fold's score and the difference to the chosen."""
    varied, best = part["varied"], part["settings"][0]
    folds = best.compared
    by_fold = [f"per fold ({' / '.join(map(str, folds))})", "vs chosen"] if len(folds) > 1 else []
    lines = [
        _row(["validation accuracy", *by_fold, *varied, "experiments"]),
        "|" + "---|" * (len(varied) + 2 + len(by_fold)),
    ]
    for setting in part["settings"]:
        cells = [_accuracy(setting)]
        if by_fold:
            difference, error = paired_difference(setting, best)
            cells += [
                " / ".join(f"{setting.scores[fold]:.2%}" for fold in folds),
                "" if setting is best else f"{100 * difference:+.2f} ± {100 * error:.2f} points",
            ]
        cells += [*(_shown(setting.values.get(key, "-")) for key in varied), ", ".join(setting.runs)]
        lines.append(_row(cells))
    return lines


def _model_lines(model: str, part: dict) -> list[str]:
    """One model's section: the choice, its final fit, and its settings ranked."""
    chosen, best = part["chosen"], part["settings"][0]
    lines = [f"## {MODEL_NAMES[model]}", "", *_folds_lines(part)]
    if not part["varied"]:
        return [
            *lines,
            "No setting of this model varies across these experiments "
            f"(validation accuracy {_accuracy(best)}).",
            *_final_fit_line(chosen["final_fit"]),
            "",
        ]
    described = ", ".join(f"{key}={_shown(value)}" for key, value in chosen["values"].items())
    return [
        *lines,
        f"Chosen on validation: **{described}** ({chosen['scored_by']}), "
        f"validation accuracy {_accuracy(best)}.",
        *_final_fit_line(chosen["final_fit"]),
        "",
        *_settings_table(part),
        "",
    ]


def markdown(report: Report) -> str:
    lines = _markdown_preamble(report)
    for model in MODELS:
        if model in report.models:
            lines += _model_lines(model, report.models[model])
        elif model in report.unscored:
            name = MODEL_NAMES[model]
            lines += [f"## {name}", "", f"No validation score: `{VALIDATION_RECIPES[model]}`.", ""]
    return "\n".join(lines)


def summary_json(report: Report) -> dict:
    return {
        "metric": (
            f"validation accuracy ({VALIDATION_METRIC}) alone; "
            "no test metric is read: each final-fit command scores the test split once"
        ),
        "final_fit_from": report.base_name,
        "final_fit_all": report.final_fit_all if len(report.models) > 1 else None,
        "without_validation": report.unscored,
        "left_out": report.left_out,
        "not_checked_against_dvc_lock": report.unchecked,
        **{
            model: {
                "varied": part["varied"],
                **part["chosen"],
                "not_ranked": [{"runs": s.runs, "folds": sorted(s.scores)} for s in part["unranked"]],
            }
            for model, part in report.models.items()
        },
    }


def write_csv_table(models: dict, path: Path) -> None:
    """Every model's settings ranked, one row each, with the values of every varied key."""
    varied = sorted({key for part in models.values() for key in part["varied"]})
    rows = [
        [
            model,
            f"{s.val_acc:.6g}",
            "" if s.standard_error is None else f"{s.standard_error:.6g}",
            " ".join(map(str, s.compared)),
            *(_shown(s.values.get(key, "")) for key in varied),
            " ".join(s.runs),
        ]
        for model, part in models.items()
        for s in part["settings"]
    ]
    write_csv(path, ["model", "val_acc", "val_acc_se", "folds", *varied, "experiments"], rows)


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _positions(values: list) -> tuple[list, list, bool]:
    """x positions, the distinct values in order, and whether to use a log axis
    (positive values spanning 10x or more)."""
    distinct = sorted(
        {_key(v): v for v in values}.values(),
        key=lambda v: (not _numeric([v]), v if _numeric([v]) else str(v)),
    )
    if _numeric(distinct):
        return values, distinct, min(distinct) > 0 and max(distinct) / min(distinct) >= 10
    index = {_key(v): i for i, v in enumerate(distinct)}
    return [index[_key(v)] for v in values], distinct, False


def _line(ax, points: list[tuple], label: str | None) -> None:
    """Every run a dot at (x, validation accuracy), the line joining the best at each x; the standard errors
    as bars (several validation folds)."""
    best_at = {}
    for px, py, _ in points:
        best_at[px] = max(best_at.get(px, py), py)
    line = ax.plot(list(best_at), list(best_at.values()), marker="o", label=label)[0]
    ax.scatter([p[0] for p in points], [p[1] for p in points], color=line.get_color(), s=12)
    with_error = [p for p in points if p[2] is not None]
    if with_error:
        ax.errorbar(*zip(*with_error, strict=True), fmt="none", ecolor=line.get_color(), capsize=3)


def _panel(ax, model: str, part: dict, key: str) -> bool:
    """Validation accuracy against ``key``: with two varied settings, one line per value of the other one.
    False where no setting has the keys the panel needs (the probe's, among random-head runs)."""
    others = [k for k in part["varied"] if k != key]
    other = others[0] if len(others) == 1 else None
    on_panel = [s for s in part["settings"] if key in s.values and (other is None or other in s.values)]
    if not on_panel:
        return False
    x, distinct, log_axis = _positions([s.values[key] for s in on_panel])
    groups = {"": None}
    if other is not None:
        groups = {_key(v): v for v in _positions([s.values[other] for s in on_panel])[1]}
    for group_key, group_value in groups.items():
        members = [i for i, s in enumerate(on_panel) if other is None or _key(s.values[other]) == group_key]
        points = sorted((x[i], on_panel[i].val_acc, on_panel[i].standard_error) for i in members)
        _line(ax, points, None if other is None else f"{other}={_shown(group_value)}")
    chosen = part["settings"][0]
    if chosen in on_panel:
        star = {"marker": "*", "s": 220, "color": "gold", "edgecolor": "black", "zorder": 5}
        ax.scatter([x[on_panel.index(chosen)]], [chosen.val_acc], **star, label="chosen")
    if log_axis:
        ax.set_xscale("log")
    ax.set_xticks(distinct if _numeric(distinct) else range(len(distinct)), [_shown(v) for v in distinct])
    ax.minorticks_off()
    ax.set_xlabel(key)
    ax.set_ylabel("validation accuracy")
    ax.set_title(MODEL_NAMES[model], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return True


def plot_against_params(models: dict, path: Path) -> None:
    """Validation accuracy against each varied setting: one column per model, one row per setting; every run
    a dot, the line joining the best score at each value, the chosen setting a star."""
    plotted = [m for m, part in models.items() if part["varied"]]
    rows = max(len(models[m]["varied"]) for m in plotted)
    fig, axes = plt.subplots(rows, len(plotted), figsize=(4.6 * len(plotted), 3.4 * rows), squeeze=False)
    for column, model in enumerate(plotted):
        varied = models[model]["varied"]
        for row in range(rows):
            if row >= len(varied) or not _panel(axes[row][column], model, models[model], varied[row]):
                axes[row][column].axis("off")
    fig.suptitle("Validation accuracy against each varied setting")
    save_figure(fig, path)


def plot_heatmap(model: str, part: dict, path: Path) -> None:
    """A two-setting grid as a heatmap of validation accuracy; the chosen cell is outlined."""
    (row_key, col_key) = part["varied"]
    # a key only some settings have (the probe's, among random-head runs) leaves the others out
    settings = [s for s in part["settings"] if row_key in s.values and col_key in s.values]
    rows, cols = (_positions([s.values[key] for s in settings])[1] for key in (row_key, col_key))

    def cell(setting: Setting) -> tuple[int, int]:
        return (
            [_key(v) for v in rows].index(_key(setting.values[row_key])),
            [_key(v) for v in cols].index(_key(setting.values[col_key])),
        )

    grid = np.full((len(rows), len(cols)), np.nan)
    for s in settings:
        r, c = cell(s)
        grid[r, c] = s.val_acc if math.isnan(grid[r, c]) else max(grid[r, c], s.val_acc)
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 0.8 * len(rows) + 1.8))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (r, c), value in np.ndenumerate(grid):
        if not math.isnan(value):
            color = "white" if value < np.nanmean(grid) else "black"
            ax.text(c, r, f"{value:.1%}", ha="center", va="center", color=color, fontsize=9)
    chosen = part["settings"][0]
    if chosen in settings:
        best_r, best_c = cell(chosen)
        outline = plt.Rectangle(
            (best_c - 0.5, best_r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5
        )
        ax.add_patch(outline)
    ax.set_xticks(range(len(cols)), [_shown(v) for v in cols])
    ax.set_yticks(range(len(rows)), [_shown(v) for v in rows])
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    fig.colorbar(image, ax=ax, label="validation accuracy")
    ax.set_title(f"{MODEL_NAMES[model]}: validation accuracy (chosen: red)", fontsize=10)
    save_figure(fig, path)


def write_outputs(report: Report, out: Path) -> list[Path]:
    """Every output file, written atomically; pictures of an earlier summary that no longer apply
    are removed."""
    for stale in [*out.glob("heatmap_*.png"), out / "validation_vs_params.png"]:
        stale.unlink(missing_ok=True)
    write_text(out / "experiments.md", markdown(report))
    write_json(out / "summary.json", summary_json(report))
    write_csv_table(report.models, out / "experiments.csv")
    written = [out / "experiments.md", out / "summary.json", out / "experiments.csv"]
    if any(part["varied"] for part in report.models.values()):
        plot_against_params(report.models, out / "validation_vs_params.png")
        written.append(out / "validation_vs_params.png")
    for model, part in report.models.items():
        if len(part["varied"]) == 2:
            plot_heatmap(model, part, out / f"heatmap_{model}.png")
            written.append(out / f"heatmap_{model}.png")
    return written


# the commands


def summarize(
    shown_json: Path | None, out: Path, all_commits: bool = False, only: list[str] | None = None
) -> dict:
    """``transferlab experiments``: the report written to ``out``, each model's choice printed; returns
    :attr:`Report.models`."""
    shown, experiments = listed_experiments(shown_json, all_commits, only)
    report = report_of(shown, experiments)
    for path in write_outputs(report, out):
        print(path)
    for model, part in report.models.items():
        chosen = part["chosen"]
        print(
            f"{MODEL_NAMES[model]}: chosen {chosen['values'] or '(nothing varied)'} "
            f"val {chosen['val_acc']:.2%}; "
            f"final fit: {chosen['final_fit']['command']}"
        )
    return report.models


TABLE_LEGEND = [
    "val acc: each model's validation accuracy, the last epoch's val/acc of its holdout twin (else of its",
    "training stage; the probe's: best/val_acc); -: none of its own (its stage did not run there, so its",
    "commit's counts; or it trained on train + val). Then the params.yaml keys that vary, by section.",
]


def _score_cell(experiment: Experiment, model: str) -> str:
    """The model's own validation accuracy in the experiment, starred where it is not its params' run (see
    :func:`own_runs`); ``-`` for none."""
    path = scored_path(experiment, model)
    if path is None:
        return "-"
    stale = "*" if model in experiment.stale_scores else ""
    return f"{score_in(experiment.metrics[path], model):.2%}{stale}"


def varied_params(experiments: list[Experiment]) -> list[str]:
    """The params.yaml keys (dotted, in the file's order) whose values differ among the experiments."""
    flat = [flatten(e.params) for e in experiments]
    keys = dict.fromkeys(key for params in flat for key in params)
    return [key for key in keys if len({_key(params.get(key)) for params in flat}) > 1]


def _aligned(lines: list[list[str]]) -> list[str]:
    widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


def table(shown_json: Path | None, all_commits: bool = False, only: list[str] | None = None) -> str:
    """The experiments side by side, narrow enough for a terminal (``dvc exp show`` has a column for every
    param and metric): each one's validation accuracy per model and the params that vary among them; a score
    that is not its experiment's params' run is starred and explained. ``transferlab experiments --table``."""
    _, experiments = listed_experiments(shown_json, all_commits, only)
    experiments, stale, unchecked = own_runs(experiments)
    models = [model for model in MODELS if any(_score_cell(e, model) != "-" for e in experiments)]
    keys = varied_params(experiments)
    sections = [key.split(".", 1)[0] if "." in key else "" for key in keys]
    groups = [
        "",
        *("val acc" if i == 0 else "" for i in range(len(models))),
        *(section if i == 0 or sections[i - 1] != section else "" for i, section in enumerate(sections)),
    ]
    header = ["experiment", *models, *(key.split(".", 1)[-1] for key in keys)]
    rows = [
        [
            ("  " if e.baseline else "") + e.name,
            *(_score_cell(e, model) for model in models),
            *(_shown(flatten(e.params).get(key, "-")) for key in keys),
        ]
        for e in experiments
    ]
    lines = [*_aligned([groups, header, *rows]), "", *TABLE_LEGEND]
    if stale:
        lines += ["*: not its experiment's own run, so not ranked by transferlab experiments:"]
        lines += [f"  {note}" for note in stale]
    if unchecked:
        lines.append(f"Not checked against their dvc.lock (git cannot show it here): {', '.join(unchecked)}")
    return "\n".join(lines)
