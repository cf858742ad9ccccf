"""The experiments summary: each model's best setting chosen on validation alone; plots of what each param does."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from conftest import PROJECT
from conftest import run as run_command
from conftest import tiny_params
from transferlab import cli
from transferlab.config import parse_params
from transferlab.experiments import ExperimentsError, experiments_from_show, run


def entry(name: str, overrides: dict, val: dict, test: dict | None = None) -> dict:
    """One experiment as `dvc exp show --json` lists it: params.yaml with dotted overrides, and the metric files."""
    params = copy.deepcopy(tiny_params())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params.setdefault(section, {})[key] = value
    metrics = {f"metrics/train_{model}/metrics.json": {"data": {"best/val_acc": acc}} for model, acc in val.items()}
    for model, acc in (test or {}).items():
        metrics[f"metrics/test_{model}/metrics.json"] = {"data": {"mean_per_class_acc": acc, "top1": acc}}
    return {"rev": f"{abs(hash(name)):040x}"[:40], "name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}, "error": None}


def shown(baseline: dict, experiments: list[dict], queued: list[dict] = ()) -> list:
    wrap = [{"revs": [e], "executor": None, "name": e["name"]} for e in experiments]
    wrap += [{"revs": [e], "executor": {"state": "queued"}, "name": e["name"]} for e in queued]
    return [{"rev": "workspace", "name": None, **{k: baseline[k] for k in ("data", "error")}}, {**baseline, "experiments": wrap}]


def grid() -> list:
    """A 2x2 fine-tuning grid over train.lr x train.epochs; the scratch run's own settings never change.

    The best validation score (lr 0.01, 2 epochs) is not the best test score (lr 0.1, 1 epoch): the choice
    must follow validation.
    """
    scores = {(0.01, 1): (0.60, 0.70), (0.01, 2): (0.80, 0.75), (0.1, 1): (0.70, 0.90), (0.1, 2): (0.50, 0.60)}
    runs = [
        entry(f"exp-{i}", {"train.lr": lr, "train.epochs": epochs}, {"finetune": val, "scratch": 0.3}, {"finetune": test, "scratch": 0.2})
        for i, ((lr, epochs), (val, test)) in enumerate(scores.items())
    ]
    baseline = entry("main", {"train.train_on_val": True}, {}, {"finetune": 0.99})  # the final fit: no validation score
    return shown(baseline, runs, queued=[entry("exp-queued", {"train.lr": 0.5}, {})])


def test_summary_chooses_on_validation_and_plots_the_grid(tmp_path):
    (tmp_path / "shown.json").write_text(json.dumps(grid()))
    summary = run(tmp_path / "shown.json", tmp_path / "out")

    finetune = summary["finetune"]
    assert finetune["varied"] == ["epochs", "lr"]
    assert finetune["chosen"]["runs"] == ["exp-1"] and finetune["chosen"]["values"] == {"epochs": 2, "lr": 0.01}
    assert finetune["chosen"]["val_acc"] == 0.80
    assert finetune["chosen"]["test"] == {"mean_per_class_acc": 0.75, "top1": 0.75}, "the chosen run's test score, not the best test score"
    assert [s.val_acc for s in finetune["settings"]] == [0.80, 0.70, 0.60, 0.50]
    scratch = summary["scratch"]
    assert scratch["varied"] == [] and len(scratch["settings"]) == 1 and len(scratch["settings"][0].runs) == 4, "one setting, run 4 times"
    assert "probe" not in summary, "no probe validation score in these experiments"

    out = tmp_path / "out"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["experiments_without_validation"] == 1 and saved["finetune"]["values"] == {"epochs": 2, "lr": 0.01}
    report = (out / "experiments.md").read_text()
    assert "**epochs=2, lr=0.01**" in report and "mean_per_class_acc 75.00%" in report
    assert "90.00%" not in report, "test scores of runs that were not chosen are never shown"
    assert "train.train_on_val=false" in report, "says how to get validation scores for the left-out run"
    with (out / "experiments.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["val_acc"]) for r in rows][:2] == [("finetune", "0.8"), ("finetune", "0.7")] and len(rows) == 5
    for picture in ("validation_vs_params.png", "heatmap_finetune.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "heatmap_scratch.png").exists()


def test_skips_workspace_queued_and_failed_and_breaks_ties_by_name(tmp_path):
    runs = [entry("b-run", {"scratch.lr": 0.1}, {"scratch": 0.5}), entry("a-run", {"scratch.lr": 0.2}, {"scratch": 0.5})]
    listing = shown(entry("main", {}, {}), runs, queued=[entry("q", {"scratch.lr": 9.0}, {"scratch": 1.0})])
    listing[1]["experiments"].append({"revs": [entry("f", {"scratch.lr": 8.0}, {"scratch": 1.0})], "executor": {"state": "failed"}, "name": "f"})
    assert [e.name for e in experiments_from_show(listing)] == ["main", "b-run", "a-run"]
    (tmp_path / "shown.json").write_text(json.dumps(listing))
    summary = run(tmp_path / "shown.json", tmp_path / "out")
    assert summary["scratch"]["varied"] == ["lr"] and summary["scratch"]["chosen"]["runs"] == ["a-run"]
    assert summary["scratch"]["chosen"]["test"] == {}, "not evaluated: said, not invented"
    assert not list((tmp_path / "out").glob("heatmap_*.png")), "one varied setting: no heatmap"


def test_names_repeated_across_commits_and_invalid_params(tmp_path):
    """With --all-commits an experiment name can repeat under two commits; params this code rejects are listed, not fatal."""
    first = shown(entry("main", {}, {}), [entry("same", {"scratch.lr": 0.1}, {"scratch": 0.4}, {"scratch": 0.1})])
    second = shown(entry("old", {}, {}), [entry("same", {"scratch.lr": 0.2}, {"scratch": 0.6}, {"scratch": 0.3})])
    second[1]["rev"] = "1" * 40
    second[1]["experiments"][0]["revs"][0]["rev"] = "2" * 40
    broken = entry("broken", {"train.lr": -1.0}, {"scratch": 0.9})
    first[1]["experiments"].append({"revs": [broken], "executor": None, "name": "broken"})
    (tmp_path / "shown.json").write_text(json.dumps(first + second[1:]))
    summary = run(tmp_path / "shown.json", tmp_path / "out")
    assert summary["scratch"]["chosen"]["values"] == {"lr": 0.2} and summary["scratch"]["chosen"]["test"]["top1"] == 0.3
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    assert len(saved["left_out"]) == 1 and saved["left_out"][0].startswith("broken: ") and "train.lr" in saved["left_out"][0]
    assert "broken: its params are not valid" in (tmp_path / "out/experiments.md").read_text()


def test_no_validation_score_is_an_error_that_says_what_to_run(tmp_path, capsys):
    listing = shown(entry("main", {}, {}), [entry("final", {"train.train_on_val": True, "train.lr": 0.1}, {})])
    (tmp_path / "shown.json").write_text(json.dumps(listing))
    with pytest.raises(ExperimentsError, match="train.train_on_val=false"):
        run(tmp_path / "shown.json", tmp_path / "out")
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["experiments", "--json", str(tmp_path / "shown.json"), "--out", str(tmp_path / "out")])
    assert exit_code.value.code == 2 and "no experiment has a validation score" in capsys.readouterr().err


def wait_for_queue(repo, timeout_s: float = 900) -> str:
    """Poll `dvc queue status` until every task has finished; its last output."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = run_command(["dvc", "queue", "status"], repo).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout_s} s:\n{status}"
        time.sleep(3)


def md5_of_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_cache_intact(repo: Path) -> int:
    """Every object in the DVC cache holds the bytes its name (their md5) promises; returns how many there are."""
    objects = md5_of_files(repo / ".dvc/cache/files/md5")
    for name, md5 in objects.items():
        assert name.replace("/", "").removesuffix(".dir") == md5, f"cache object {name} is corrupt"
    return len(objects)


def test_queued_grid_with_two_workers_then_the_summary_picks_the_best_on_validation(project_repo):
    """A 2x2 fine-tuning grid (lr x epochs) queued and run by two workers, with the real dvc commands."""
    repo = project_repo
    run_command(["dvc", "repro"], repo)
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", "baseline"], repo)
    objects_before = assert_cache_intact(repo)
    run_command(["dvc", "exp", "run", "--queue", "-S", "train.lr=0.001,0.05", "-S", "train.epochs=1,2"], repo)
    run_command(["dvc", "queue", "start", "-j", "2"], repo)
    status = wait_for_queue(repo)
    assert status.count("Success") == 4, status

    # Each queued experiment runs in its own copy of the workspace; what they share is the DVC cache, which
    # holds the prepared data they all read: two at once corrupted neither it nor each other's results
    assert assert_cache_intact(repo) > objects_before, "the experiments' models and results are in the cache"
    listing = json.loads(run_command(["dvc", "exp", "show", "--json"], repo).stdout)
    ran = [e["revs"][0] for commit in listing for e in commit.get("experiments") or []]
    baseline_prepared = next(c for c in listing if c["rev"] != "workspace")["data"]["deps"]["data/prepared"]["hash"]
    assert {r["data"]["deps"]["data/prepared"]["hash"] for r in ran} == {baseline_prepared}, "all read the same prepared data"
    grid_points = {(r["data"]["params"]["params.yaml"]["data"]["train"]["lr"], r["data"]["params"]["params.yaml"]["data"]["train"]["epochs"]) for r in ran}
    assert grid_points == {(0.001, 1), (0.001, 2), (0.05, 1), (0.05, 2)}
    for r in ran:  # each experiment's results are its own run's
        train_summary = r["data"]["metrics"]["metrics/train_finetune/metrics.json"]["data"]
        assert train_summary["epochs_run"] == r["data"]["params"]["params.yaml"]["data"]["train"]["epochs"]
    # the best fine-tuning run by validation accuracy, ties to the first name: the baseline commit competes too
    baseline = next(commit for commit in listing if commit["rev"] != "workspace")
    candidates = [(r["name"], r["data"]["metrics"]) for r in ran] + [(baseline["name"], baseline["data"]["metrics"])]
    scores = {name: metrics["metrics/train_finetune/metrics.json"]["data"]["best/val_acc"] for name, metrics in candidates}
    expected = min(scores, key=lambda name: (-scores[name], name))

    summary_run = run_command([sys.executable, "-m", "transferlab.cli", "experiments"], repo)
    summary = json.loads((repo / "metrics/experiments/summary.json").read_text())
    assert summary["finetune"]["runs"] == [expected] and summary["finetune"]["val_acc"] == scores[expected]
    assert summary["finetune"]["varied"] == ["epochs", "lr"], "the grid's two params, as the fine-tuning ran them"
    assert summary["scratch"]["varied"] == [], "train.lr and train.epochs are overridden by scratch: its run never changed"
    expected_test = dict(candidates)[expected]["metrics/test_finetune/metrics.json"]["data"]["mean_per_class_acc"]
    assert summary["finetune"]["test"]["mean_per_class_acc"] == expected_test
    assert (repo / "metrics/experiments/heatmap_finetune.png").read_bytes()[:4] == b"\x89PNG"
    assert "metrics/experiments/summary.json" in summary_run.stdout


def readme_experiment_commands() -> list[list[str]]:
    """The -S overrides of every `dvc exp run` command in the README's code blocks."""
    text = (PROJECT / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("uv run dvc exp run"):
            args = shlex.split(line, comments=True)
            commands.append([args[i + 1] for i, arg in enumerate(args) if arg == "-S"])
    return commands


def test_every_readme_experiment_command_gives_valid_params(tmp_path):
    """Each README recipe, every point of its grid, applied to params.yaml the way dvc does, passes the config checks."""
    commands = readme_experiment_commands()
    assert len(commands) >= 10
    for overrides in commands:
        for point in get_hydra_sweeps({"params.yaml": overrides}):
            params = tmp_path / "params.yaml"
            shutil.copy(PROJECT / "params.yaml", params)
            apply_overrides(params, point["params.yaml"])
            parse_params(yaml.safe_load(params.read_text()), check_arch=False)
