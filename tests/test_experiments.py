"""The experiments summary: each model's best setting chosen on validation alone, plots of what each param
does, and the final fit's command; never a test score of a setting that was not chosen, nor a stale one."""

from __future__ import annotations

import copy
import csv
import hashlib
import itertools
import json
import logging
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from conftest import PROJECT, run_command, tiny_params
from imagegen import make_image_folder
from transferlab.config import load_params, parse_params
from transferlab.tools import cli
from transferlab.tools.experiments import (
    ExperimentsError,
    exp_show,
    experiments_from_show,
    model_settings,
    params_key,
    summarize,
    table,
)

NO_VALIDATION = None  # a run trained on train + val: its training summary has no validation score


def set_dotted(params: dict, overrides: dict) -> dict:
    params = copy.deepcopy(params)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        params.setdefault(section, {})[key] = value
    return params


def entry(
    name: str,
    overrides: dict,
    val: dict,
    test: dict | None = None,
    base: dict | None = None,
    copied: dict | None = None,
) -> dict:
    """One experiment as `dvc exp show --json` lists it: params.yaml (``base``, tiny
    params by default) with dotted overrides, and the metric files: ``val`` model ->
    validation score (NO_VALIDATION: trained on train + val), ``test`` model -> test
    score, ``copied`` path -> a metric file copied as is (a stage that did not run)."""
    params = set_dotted(tiny_params() if base is None else base, overrides)
    metrics = {}
    for model, acc in val.items():
        summary = {"epochs_run": 2, "wall_time_s": int(hashlib.sha1(name.encode()).hexdigest()[:6], 16) / 100}
        scores = {
            "best/val_acc": acc,
            **({} if model == "probe" else {"val": {"acc": acc}}),
        }  # best epoch = last epoch here
        metrics[f"metrics/train_{model}/metrics.json"] = {
            "data": summary if acc is None else {**scores, **summary}
        }
    for model, acc in (test or {}).items():
        metrics[f"metrics/test_{model}/metrics.json"] = {
            "data": {"mean_per_class_acc": acc, "top1": acc, "wall_time_s": 9.9}
        }
    metrics.update(copy.deepcopy(copied or {}))
    rev = hashlib.sha1(name.encode()).hexdigest()
    return {
        "rev": rev,
        "name": name,
        "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics},
        "error": None,
    }


def shown(baseline: dict, experiments: list[dict], queued: list[dict] = ()) -> list:
    wrap = [{"revs": [e], "executor": None, "name": e["name"]} for e in experiments]
    wrap += [{"revs": [e], "executor": {"state": "queued"}, "name": e["name"]} for e in queued]
    return [
        {"rev": "workspace", "name": None, **{k: baseline[k] for k in ("data", "error")}},
        {**baseline, "experiments": wrap},
    ]


def outputs_text(out: Path) -> str:
    return "\n".join(
        (out / name).read_text() for name in ("experiments.md", "summary.json", "experiments.csv")
    )


def assert_no_test_score(text: str, scores: list[float]) -> None:
    for word in ("mean_per_class_acc", "top1", "test_finetune", "test_scratch", "test_probe"):
        assert word not in text, f"{word}: a test metric in the summary"
    for score in scores:
        for shown_as in (repr(score), f"{score:.2%}", f"{score:.6g}"):
            assert shown_as not in text, f"test score {shown_as} in the summary"


def applied_command(command: str, workspace: dict, tmp_path: Path) -> dict:
    """params.yaml after `command`'s -S overrides, applied the way `dvc exp run` applies them,
    read the way the stages read it."""
    args = shlex.split(command)
    assert args[:3] == ["dvc", "exp", "run"] and all(a == "-S" for a in args[3::2]), command
    path = tmp_path / "final" / "params.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(workspace, sort_keys=False))
    apply_overrides(path, args[4::2])
    return yaml.safe_load(path.read_text())


def grid() -> list:
    """A 2x2 fine-tuning grid over train.lr x train.epochs; the scratch run's own settings never change.

    The best validation score (lr 0.01, 2 epochs) is not the best test score (lr 0.1, 1 epoch): the choice
    must follow validation. No test score equals a validation score, so a shown test score is caught.
    """
    scores = {
        (0.01, 1): (0.60, 0.71),
        (0.01, 2): (0.80, 0.77),
        (0.1, 1): (0.70, 0.93),
        (0.1, 2): (0.50, 0.61),
    }
    runs = [
        entry(
            f"exp-{i}",
            {"train.lr": lr, "train.epochs": epochs},
            {"finetune": val, "scratch": 0.3},
            {"finetune": test, "scratch": 0.23},
        )
        for i, ((lr, epochs), (val, test)) in enumerate(scores.items())
    ]
    # the final fit: no validation score
    baseline = entry(
        "main",
        {"train.train_on_val": True},
        {"finetune": NO_VALIDATION, "scratch": NO_VALIDATION},
        {"finetune": 0.99},
    )
    return shown(baseline, runs, queued=[entry("exp-queued", {"train.lr": 0.5}, {})])


GRID_TEST_SCORES = [0.71, 0.77, 0.93, 0.61, 0.23, 0.99]


def test_summary_chooses_on_validation_and_plots_the_grid(tmp_path, capsys):
    (tmp_path / "shown.json").write_text(json.dumps(grid()))
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")

    finetune = summary["finetune"]
    assert finetune["varied"] == ["epochs", "lr"]
    assert finetune["chosen"]["runs"] == ["exp-1"] and finetune["chosen"]["values"] == {
        "epochs": 2,
        "lr": 0.01,
    }
    assert finetune["chosen"]["val_acc"] == 0.80
    assert "test" not in finetune["chosen"], (
        "no test metric is read: a validation-only run's is its baseline's"
    )
    # the workspace (main's params) makes the final fit already: only the chosen values change
    assert finetune["chosen"]["final_fit"]["command"] == "dvc exp run -S train.epochs=2 -S train.lr=0.01"
    assert [s.val_acc for s in finetune["settings"]] == [0.80, 0.70, 0.60, 0.50]
    scratch = summary["scratch"]
    assert (
        scratch["varied"] == [] and len(scratch["settings"]) == 1 and len(scratch["settings"][0].runs) == 4
    ), "one setting, run 4 times"
    # the tiny workspace validates the scratch run: its final fit turns training on train + val on
    assert scratch["chosen"]["final_fit"]["command"] == "dvc exp run -S scratch.train_on_val=true"
    assert "probe" not in summary, "no probe validation score in these experiments"

    out = tmp_path / "out"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["without_validation"] == {"finetune": ["main"], "scratch": ["main"]}
    assert saved["finetune"]["values"] == {"epochs": 2, "lr": 0.01}
    assert (
        saved["final_fit_all"]["command"]
        == "dvc exp run -S train.epochs=2 -S train.lr=0.01 -S scratch.train_on_val=true"
    )
    report = (out / "experiments.md").read_text()
    assert "**epochs=2, lr=0.01**" in report and "`dvc exp run -S train.epochs=2 -S train.lr=0.01`" in report
    assert "trains on train + val with the chosen setting and evaluates the test split once" in report
    assert_no_test_score(outputs_text(out) + capsys.readouterr().out, GRID_TEST_SCORES)
    with (out / "experiments.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["val_acc"]) for r in rows][:2] == [
        ("finetune", "0.8"),
        ("finetune", "0.7"),
    ] and len(rows) == 5
    for picture in ("validation_vs_params.png", "heatmap_finetune.png"):
        assert (out / picture).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "heatmap_scratch.png").exists()


def test_validation_only_grids_never_show_the_baselines_stale_test_metrics_and_the_final_fit_carries_the_choice(  # noqa: E501
    tmp_path, capsys
):
    """The README's recipes on the project's own params: grids queued up to a training stage, validation only.

    Their commits hold the baseline's test metrics (the evaluate stages did not run)
    and, for the models their target does not train, the baseline's training summaries.
    The summary shows no test score at all, and each model's final-fit command, applied
    the way dvc applies it, gives exactly the chosen setting, trained on train + val.
    """
    defaults = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert (
        defaults["train"]["train_on_val"]
        and defaults["probe"]["train_on_val"]
        and defaults["train"]["init_head"] == "probe"
    )
    stale_test = {"mean_per_class_acc": 0.9137, "top1": 0.9251, "top5": 0.9911, "wall_time_s": 237.1}
    baseline = entry(
        "main", {}, {"probe": 0.881, "finetune": NO_VALIDATION, "scratch": NO_VALIDATION}, base=defaults
    )
    for model in ("probe", "finetune", "scratch"):
        baseline["data"]["metrics"][f"metrics/test_{model}/metrics.json"] = {"data": stale_test}
    committed = baseline["data"]["metrics"]

    def copied(*paths: str) -> dict:
        return {path: committed[path] for path in paths}

    stale_tests = copied(
        *(f"metrics/test_{model}/metrics.json" for model in ("probe", "finetune", "scratch"))
    )
    runs = []
    # dvc exp run --queue train_finetune -S train.train_on_val=false -S probe.train_on_val=false
    #   -S train.schedule=step -S 'train.lr=0.001,0.01' -S 'train.weight_decay=0,0.0005'
    #   (the probe re-runs: it held the validation images out)
    finetune_val = {(0.001, 0.0): 0.84, (0.001, 0.0005): 0.86, (0.01, 0.0): 0.91, (0.01, 0.0005): 0.89}
    for i, ((lr, decay), val) in enumerate(finetune_val.items()):
        overrides = {
            "train.train_on_val": False,
            "probe.train_on_val": False,
            "train.schedule": "step",
            "train.lr": lr,
            "train.weight_decay": decay,
        }
        runs.append(
            entry(
                f"ft-{i}",
                overrides,
                {"probe": 0.881, "finetune": val},
                base=defaults,
                copied={**stale_tests, **copied("metrics/train_scratch/metrics.json")},
            )
        )
    # dvc exp run --queue train_scratch -S scratch.train_on_val=false -S 'scratch.lr=0.02,0.1'
    for i, (lr, val) in enumerate({0.02: 0.41, 0.1: 0.47}.items()):
        kept = copied("metrics/train_probe/metrics.json", "metrics/train_finetune/metrics.json")
        runs.append(
            entry(
                f"sc-{i}",
                {"scratch.train_on_val": False, "scratch.lr": lr},
                {"scratch": val},
                base=defaults,
                copied={**stale_tests, **kept},
            )
        )
    listing = shown(baseline, runs)
    (tmp_path / "shown.json").write_text(json.dumps(listing))
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")

    assert_no_test_score(outputs_text(tmp_path / "out") + capsys.readouterr().out, [0.9137, 0.9251, 0.9911])
    finetune, scratch, probe = summary["finetune"], summary["scratch"], summary["probe"]
    assert finetune["varied"] == ["lr", "weight_decay"] and finetune["chosen"]["values"] == {
        "lr": 0.01,
        "weight_decay": 0.0,
    }
    assert finetune["chosen"]["runs"] == ["ft-2"] and finetune["chosen"]["val_acc"] == 0.91
    # the varied keys, and the grid's constant train.schedule (not the workspace's);
    # train_on_val is the workspace's: true
    assert (
        finetune["chosen"]["final_fit"]["command"]
        == "dvc exp run -S train.lr=0.01 -S train.weight_decay=0.0 -S train.schedule=step"
    )
    assert scratch["varied"] == ["lr"] and scratch["chosen"]["runs"] == ["sc-1"]
    assert scratch["chosen"]["final_fit"]["command"] == "dvc exp run -S scratch.lr=0.1"
    # the probe re-ran in the fine-tuning grid with the same settings (train_on_val is the protocol,
    # not a setting); in the scratch grid its summary is the baseline's: not a run of its own
    assert probe["varied"] == [] and probe["chosen"]["runs"] == ["ft-0", "ft-1", "ft-2", "ft-3", "main"]
    assert probe["chosen"]["final_fit"]["command"] == "dvc exp run"
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    assert saved["without_validation"] == {"finetune": ["main"], "scratch": ["main"]}, (
        "the copies in the grids are not runs"
    )

    # what each command makes: the chosen setting, trained on train + val
    chosen = {model: part["settings"][0].values for model, part in summary.items()}
    for model, command in [
        *((m, p["chosen"]["final_fit"]["command"]) for m, p in summary.items()),
        ("all", saved["final_fit_all"]["command"]),
    ]:
        params = applied_command(command, defaults, tmp_path)
        settings = model_settings(params)
        for checked in chosen if model == "all" else [model]:
            assert settings[checked] == chosen[checked], f"{command}: not the {checked} model's choice"
        assert (
            params["train"]["train_on_val"]
            and params["probe"]["train_on_val"]
            and params["scratch"]["train_on_val"]
        )
        assert saved["final_fit_all"]["problem"] is None
    assert (
        "-S train.lr=0.01" in saved["final_fit_all"]["command"]
        and "-S scratch.lr=0.1" in saved["final_fit_all"]["command"]
    )


def test_final_fit_turns_train_on_val_on_and_what_dvc_writes_reads_back(tmp_path):
    """From a validating workspace: the command sets the chosen values (the varied key first), turns the
    final fit on (the probe's too, for a run that starts from it), and what dvc writes reads back."""
    workspace = tiny_params()
    workspace["train"].update(init_head="probe", nesterov=True)
    workspace["probe"]["train_on_val"] = False
    runs = [
        entry("a", {"train.nesterov": False, "train.lr": 0.03}, {"finetune": 0.5}, base=workspace),
        entry("b", {"train.nesterov": False, "train.lr": 0.003}, {"finetune": 0.6}, base=workspace),
        entry("c", {"train.nesterov": False, "train.lr": 0.00003}, {"finetune": 0.4}, base=workspace),
    ]
    (tmp_path / "shown.json").write_text(json.dumps(shown(entry("main", {}, {}, base=workspace), runs)))
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")
    fit = summary["finetune"]["chosen"]["final_fit"]
    assert fit["command"].startswith("dvc exp run -S train.lr=0.003 -S ")
    assert set(fit["command"].split(" -S ")[1:]) == {
        "train.lr=0.003",
        "train.nesterov=false",
        "train.train_on_val=true",
        "probe.train_on_val=true",
    }
    assert fit["problem"] is None
    params = applied_command(fit["command"], workspace, tmp_path)
    assert model_settings(params)["finetune"] == summary["finetune"]["settings"][0].values

    # had c won, dvc would write train.lr: 3e-05
    # (YAML 1.1 would take it for a string; the stages read it as a float)
    runs[2]["data"]["metrics"]["metrics/train_finetune/metrics.json"]["data"]["val"]["acc"] = 0.9
    (tmp_path / "shown.json").write_text(json.dumps(shown(entry("main", {}, {}, base=workspace), runs)))
    fit = summarize(tmp_path / "shown.json", tmp_path / "out")["finetune"]["chosen"]["final_fit"]
    assert "-S train.lr=3e-05" in fit["command"] and fit["problem"] is None
    applied_command(fit["command"], workspace, tmp_path)
    assert "lr: 3e-05" in (tmp_path / "final" / "params.yaml").read_text()
    assert load_params(tmp_path / "final" / "params.yaml").train.lr == 3e-05


def test_a_training_summary_copied_from_the_baseline_is_not_a_new_run(tmp_path):
    """A train_probe grid on a validating LP-FT baseline: train_finetune did
    not run, so its summary (and score) is the baseline's. Counted as a run of
    the experiment's own probe settings, it would win the tie and be chosen."""
    workspace = set_dotted(tiny_params(), {"train.init_head": "probe", "probe.train_on_val": False})
    baseline = entry("main", {}, {"probe": 0.5, "finetune": 0.6}, base=workspace)
    kept = {
        "metrics/train_finetune/metrics.json": baseline["data"]["metrics"][
            "metrics/train_finetune/metrics.json"
        ]
    }
    probe_grid = entry("a-probe-grid", {"probe.C": [0.01]}, {"probe": 0.7}, base=workspace, copied=kept)
    (tmp_path / "shown.json").write_text(json.dumps(shown(baseline, [probe_grid])))
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")
    assert summary["probe"]["varied"] == ["probe.C"] and summary["probe"]["chosen"]["values"] == {
        "probe.C": [0.01]
    }
    assert (
        summary["probe"]["chosen"]["final_fit"]["command"]
        == "dvc exp run -S 'probe.C=[0.01]' -S probe.train_on_val=true"
    )
    assert summary["finetune"]["varied"] == [] and summary["finetune"]["chosen"]["runs"] == ["main"]
    # the two models' choices disagree on the probe the fine-tuning starts from: no single command
    assert "probe.C" in json.loads((tmp_path / "out/summary.json").read_text())["final_fit_all"]["problem"]


def test_skips_workspace_queued_and_failed_and_breaks_ties_by_name(tmp_path):
    runs = [
        entry("b-run", {"scratch.lr": 0.1}, {"scratch": 0.5}),
        entry("a-run", {"scratch.lr": 0.2}, {"scratch": 0.5}),
    ]
    listing = shown(entry("main", {}, {}), runs, queued=[entry("q", {"scratch.lr": 9.0}, {"scratch": 1.0})])
    listing[1]["experiments"].append(
        {
            "revs": [entry("f", {"scratch.lr": 8.0}, {"scratch": 1.0})],
            "executor": {"state": "failed"},
            "name": "f",
        }
    )
    assert [e.name for e in experiments_from_show(listing)] == ["main", "b-run", "a-run"]
    (tmp_path / "shown.json").write_text(json.dumps(listing))
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")
    assert summary["scratch"]["varied"] == ["lr"] and summary["scratch"]["chosen"]["runs"] == ["a-run"]
    assert (
        summary["scratch"]["chosen"]["final_fit"]["command"]
        == "dvc exp run -S scratch.lr=0.2 -S scratch.train_on_val=true"
    )
    assert not list((tmp_path / "out").glob("heatmap_*.png")), "one varied setting: no heatmap"


def test_names_repeated_across_commits_and_invalid_params(tmp_path):
    """With --all-commits an experiment name can repeat under two commits;
    params this code rejects are listed, not fatal."""
    first = shown(
        entry("main", {}, {}), [entry("same", {"scratch.lr": 0.1}, {"scratch": 0.4}, {"scratch": 0.11})]
    )
    second = shown(
        entry("old", {}, {}), [entry("same", {"scratch.lr": 0.2}, {"scratch": 0.6}, {"scratch": 0.33})]
    )
    second[1]["rev"] = "1" * 40
    second[1]["experiments"][0]["revs"][0]["rev"] = "2" * 40
    broken = entry("broken", {"train.lr": -1.0}, {"scratch": 0.9})
    first[1]["experiments"].append({"revs": [broken], "executor": None, "name": "broken"})
    (tmp_path / "shown.json").write_text(json.dumps(first + second[1:]))
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")
    assert (
        summary["scratch"]["chosen"]["values"] == {"lr": 0.2}
        and summary["scratch"]["chosen"]["val_acc"] == 0.6
    )
    assert [e.rev for e in summary["scratch"]["settings"][0].experiments] == ["2" * 40], (
        "the second commit's run"
    )
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    assert (
        len(saved["left_out"]) == 1
        and saved["left_out"][0].startswith("broken: ")
        and "train.lr" in saved["left_out"][0]
    )
    assert "broken: its params are not valid" in (tmp_path / "out/experiments.md").read_text()
    assert_no_test_score(outputs_text(tmp_path / "out"), [0.11, 0.33])


def test_no_validation_score_is_an_error_that_says_what_to_run(tmp_path, capsys):
    final = entry("final", {"train.train_on_val": True, "train.lr": 0.1}, {"finetune": NO_VALIDATION})
    listing = shown(entry("main", {}, {}), [final])
    (tmp_path / "shown.json").write_text(json.dumps(listing))
    with pytest.raises(ExperimentsError, match=r"--queue holdout_finetune -S"):
        summarize(tmp_path / "shown.json", tmp_path / "out")
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["experiments", "--json", str(tmp_path / "shown.json"), "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert (
        exit_code.value.code == 2
        and "no experiment has a validation score" in error
        and "--queue holdout_scratch -S" in error
    )


@pytest.mark.slow
def test_the_listing_from_dvcs_api_reads_as_the_saved_dvc_exp_show_json(tmp_path, monkeypatch):
    """On a real repo: DVC's API, in this process, lists what `dvc exp show --json` prints, read by the one
    parser: the params as they ran (an int stays an int: `dvc.api.exp_show`'s flat records give 3.0, and
    `'True'` for true), the metrics, the commit each experiment ran on; a queued experiment is skipped.
    Outside a DVC project the listing is an ExperimentsError."""
    repo = tmp_path / "repo"
    repo.mkdir()
    train = {"lr": 0.25, "epochs": 2, "nesterov": True, "C": [0.1], "head": None}
    (repo / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    script = (
        "import json, yaml; p = yaml.safe_load(open('params.yaml'))['train']; "
        "json.dump({'val': {'acc': p['lr']}, 'epochs_run': p['epochs']}, open('m.json', 'w'))"
    )
    stage = {
        "cmd": shlex.join([sys.executable, "-c", script]),
        "params": ["train"],
        "metrics": [{"m.json": {"cache": False}}],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    for command in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        ["dvc", "init", "-q"],
        ["dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "baseline"],
        ["dvc", "exp", "run", "-q", "-n", "own", "-S", "train.epochs=3"],
        ["dvc", "exp", "run", "-q", "--queue", "-n", "later", "-S", "train.lr=0.5"],
    ):
        run_command(command, repo)
    monkeypatch.chdir(repo)
    listed = list(experiments_from_show(exp_show(all_commits=False)))
    saved = json.loads(run_command(["dvc", "exp", "show", "--json"], repo).stdout)
    assert listed == list(experiments_from_show(saved))
    main, own = listed
    assert (main.name, own.name, own.baseline) == ("main", "own", main) and len(own.rev) == 40
    assert own.params == {"train": {**train, "epochs": 3}} and type(own.params["train"]["epochs"]) is int
    assert own.metrics == {"m.json": {"val": {"acc": 0.25}, "epochs_run": 3}}
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExperimentsError, match="dvc could not list the experiments"):
        exp_show(all_commits=False)


def test_each_models_settings_are_params_its_stages_declare_in_dvc_yaml():
    """A model's settings (what tells its runs apart) are params that dvc.yaml declares for the stage that
    scores it (the holdout twin; the probe's own stage) or for a stage upstream of it."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    writers = {
        next(iter(out)) if isinstance(out, dict) else out: name
        for name, stage in stages.items()
        for out in stage.get("outs", [])
    }

    def declared(name: str) -> set[str]:
        upstream = {writers[dep] for dep in stages[name].get("deps", []) if dep in writers}
        return set(stages[name].get("params", [])).union(*(declared(up) for up in upstream))

    # the fine-tuning starts from the probe: its settings hold the features' and the probe's
    params = set_dotted(tiny_params(), {"train.init_head": "probe", "probe.train_on_val": False})
    for model, settings in model_settings(params).items():
        stage = "train_probe" if model == "probe" else f"holdout_{model}"
        entries = declared(stage)
        for key in (params_key(model, key) for key in settings):
            assert key in entries or key.split(".")[0] in entries, f"{model}: {key} is not a param of {stage}"


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
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_cache_intact(repo: Path) -> int:
    """Every object in the DVC cache holds the bytes its name (their md5) promises;
    returns how many there are."""
    objects = md5_of_files(repo / ".dvc/cache/files/md5")
    for name, md5 in objects.items():
        assert name.replace("/", "").removesuffix(".dir") == md5, f"cache object {name} is corrupt"
    return len(objects)


@pytest.mark.slow
def test_queued_validation_only_grid_with_two_workers_then_the_summary_and_its_final_fit(reproduced):
    """A 2x2 fine-tuning grid (lr x epochs) queued up to holdout_finetune, as the README's recipes do,
    and run by two workers, with the real dvc commands; then the summary's final-fit command, run as given.
    The baseline is the shared reproduced project, committed."""
    repo = reproduced
    objects_before = assert_cache_intact(repo)
    grid_args = ["-S", "train.lr=0.001,0.05", "-S", "train.epochs=1,2"]
    run_command(["dvc", "exp", "run", "--queue", "holdout_finetune", *grid_args], repo)
    run_command(["dvc", "queue", "start", "-j", "2"], repo)
    status = wait_for_queue(repo)
    assert status.count("Success") == 4, status

    # Each queued experiment runs in its own copy of the workspace; what they share is the DVC cache, which
    # holds the prepared data they all read: two at once corrupted neither it nor each other's results
    assert assert_cache_intact(repo) > objects_before, "the experiments' models and results are in the cache"
    listing = json.loads(run_command(["dvc", "exp", "show", "--json"], repo).stdout)
    ran = [e["revs"][0] for commit in listing for e in commit.get("experiments") or []]
    baseline = next(commit for commit in listing if commit["rev"] != "workspace")
    baseline_prepared = baseline["data"]["deps"]["data/prepared"]["hash"]
    assert {r["data"]["deps"]["data/prepared"]["hash"] for r in ran} == {baseline_prepared}, (
        "all read the same prepared data"
    )
    grid_points = {
        (
            r["data"]["params"]["params.yaml"]["data"]["train"]["lr"],
            r["data"]["params"]["params.yaml"]["data"]["train"]["epochs"],
        )
        for r in ran
    }
    assert grid_points == {(0.001, 1), (0.001, 2), (0.05, 1), (0.05, 2)}
    for r in (
        ran
    ):  # each experiment's holdout run is its own; its final fit and test metrics are the baseline's (stale)
        train_summary = r["data"]["metrics"]["metrics/train_finetune_holdout/metrics.json"]["data"]
        assert train_summary["epochs_run"] == r["data"]["params"]["params.yaml"]["data"]["train"]["epochs"]
        final = "metrics/train_finetune/metrics.json"
        assert r["data"]["metrics"][final] == baseline["data"]["metrics"][final], "the final fit did not run"
        for model in ("probe", "finetune", "scratch"):
            path = f"metrics/test_{model}/metrics.json"
            assert r["data"]["metrics"][path] == baseline["data"]["metrics"][path], (
                f"{path}: validation-only, evaluate did not run"
            )
    # the best fine-tuning run by validation accuracy, ties to the first name: the (validating) baseline
    # commit competes too, and the grid point with the baseline's own values is the baseline
    # (dvc found its stage unchanged, it did not run)
    holdout = "metrics/train_finetune_holdout/metrics.json"
    copies = [r["name"] for r in ran if r["data"]["metrics"][holdout] == baseline["data"]["metrics"][holdout]]
    assert len(copies) == 1, "the grid point (0.001, 2) is params.yaml's own: a copy of the baseline"
    candidates = [(r["name"], r["data"]["metrics"]) for r in ran if r["name"] not in copies]
    candidates.append((baseline["name"], baseline["data"]["metrics"]))
    scores = {name: metrics[holdout]["data"]["val"]["acc"] for name, metrics in candidates}
    expected = min(scores, key=lambda name: (-scores[name], name))

    summary_run = run_command([sys.executable, "-m", "transferlab.tools.cli", "experiments"], repo)
    out = repo / "metrics/experiments"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finetune"]["runs"] == [expected] and summary["finetune"]["val_acc"] == scores[expected]
    assert summary["finetune"]["varied"] == ["epochs", "lr"], (
        "the grid's two params, as the fine-tuning ran them"
    )
    assert summary["scratch"]["varied"] == [] and summary["scratch"]["runs"] == [baseline["name"]], (
        "the scratch stages did not run in the experiments: "
        "their scratch summaries are the baseline's, counted once"
    )
    assert "test" not in summary["finetune"] and not re.search(
        r"mean_per_class_acc|top1", summary_run.stdout + (out / "experiments.md").read_text()
    )
    assert (out / "heatmap_finetune.png").read_bytes()[:4] == b"\x89PNG"
    assert "metrics/experiments/summary.json" in summary_run.stdout

    # the final fit, as the summary gives it: the chosen values, trained on train + val,
    # then the test split scored once
    chosen = summary["finetune"]["values"]
    command = summary["finetune"]["final_fit"]["command"]
    assert command == (
        f"dvc exp run -S train.epochs={chosen['epochs']} -S train.lr={chosen['lr']!r}"
        " -S train.train_on_val=true"
    )
    run_command(shlex.split(command), repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    assert (params["epochs"], params["lr"], params["train_on_val"]) == (chosen["epochs"], chosen["lr"], True)
    trained = json.loads((repo / "metrics/train_finetune/metrics.json").read_text())
    assert "best/val_acc" not in trained and trained["epochs_run"] == chosen["epochs"], (
        "trained on train + val, every epoch kept"
    )
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    model_hash = next(o["md5"] for o in lock["train_finetune"]["outs"] if o["path"] == "data/models/finetune")
    evaluated = next(
        d["md5"] for d in lock["evaluate@finetune"]["deps"] if d["path"] == "data/models/finetune"
    )
    assert evaluated == model_hash, "the test split was scored with the final fit's model"
    assert "Data and pipelines are up to date" in run_command(["dvc", "status", "dvc.yaml"], repo).stdout


@pytest.mark.slow
def test_scores_committed_without_re_running_the_stages_are_not_ranked_and_the_experiments_own_are(
    reproduced, tmp_path, monkeypatch, caplog
):
    """The user's case: data.source changed in params.yaml and committed without re-running the stages, then
    one experiment. The baseline commit's metrics are the old images' run (its dvc.lock: prepare ran with the
    old data.source): never ranked, each named with the reason, in the summary, its log and the table; the
    experiment's own run, on the new images, is ranked."""
    repo = reproduced
    other = make_image_folder(tmp_path / "other_images", classes=3, per_class=12, seed=1)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    old_source = params["data"]["source"]
    params["data"]["source"] = str(other)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_command(["git", "commit", "-qam", "other images; the stages not re-run"], repo)
    run_command(["dvc", "exp", "run", "holdout_finetune", "-n", "own-run", "-S", "train.lr=0.004"], repo)
    own_score = json.loads((repo / "metrics/train_finetune_holdout/metrics.json").read_text())["val"]["acc"]
    listing = json.loads(run_command(["dvc", "exp", "show", "--json"], repo).stdout)
    baseline = next(commit for commit in listing if commit["rev"] != "workspace")
    committed = baseline["name"] or baseline["rev"][:7]
    stale_scores = _summary_scores(baseline)  # the probe's, the fine-tuned and scratch holdout twins'

    monkeypatch.chdir(repo)
    with caplog.at_level(logging.WARNING, logger="transferlab.tools.experiments"):
        summary = summarize(None, repo / "metrics/experiments")
    finetune = summary["finetune"]
    assert [(s.runs, s.val_acc) for s in finetune["settings"]] == [(["own-run"], own_score)], (
        f"{committed}'s {stale_scores[1]:.2%} is the old images' run: not ranked"
    )
    assert summary["probe"]["chosen"]["runs"] == ["own-run"], "train_probe re-ran on the new images"
    assert "scratch" not in summary, "the scratch stages ran on the old images only"
    reason = f"prepare ran with data.source: {old_source} (params.yaml: {other})"
    (note,) = json.loads((repo / "metrics/experiments/summary.json").read_text())["left_out"]
    assert note.startswith(
        f"{committed}: its Linear probe, Fine-tuned, From scratch validation scores came from stages run on "
        "other params or data than its params.yaml (its dvc.lock: "
    )
    assert reason in note
    assert f"- {note}" in (repo / "metrics/experiments/experiments.md").read_text()
    assert any(committed in r.getMessage() and reason in r.getMessage() for r in caplog.records)

    printed = table(None).splitlines()
    rows = printed[: printed.index("")]
    cells = {row.split()[0]: row.split() for row in rows[2:]}
    assert cells[committed][1:4] == [f"{score:.2%}*" for score in stale_scores], "starred: not its own run"
    assert cells["own-run"][2] == f"{own_score:.2%}" and cells["own-run"][3] == "-"
    assert any(reason in line for line in printed) and max(map(len, rows)) <= 120


def _summary_scores(commit: dict) -> list[float]:
    """The commit's validation scores as the table shows them: the probe's, the fine-tuned and scratch
    holdout twins'."""
    # a metrics file no stage of this commit wrote (the data-efficiency curve's) is an entry without data
    metrics = {path: values["data"] for path, values in commit["data"]["metrics"].items() if "data" in values}
    return [
        metrics["metrics/train_probe/metrics.json"]["best/val_acc"],
        *(
            metrics[f"metrics/train_{model}_holdout/metrics.json"]["val"]["acc"]
            for model in ("finetune", "scratch")
        ),
    ]


def readme_experiment_commands() -> list[list[str]]:
    """Every `dvc exp run` command in the code blocks of the README and the docs, as its arguments."""
    pages = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages).replace("\\\n", " ")
    return [
        shlex.split(line, comments=True)[5:]
        for line in text.splitlines()
        if line.startswith("uv run dvc exp run")
    ]


def overrides_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "-S"]


def readme_points(args: list[str], tmp_path: Path):
    """params.yaml for each point of the command's grid, applied the way dvc does (Hydra overrides)."""
    for point in get_hydra_sweeps({"params.yaml": overrides_of(args)}):
        params = tmp_path / "params.yaml"
        shutil.copy(PROJECT / "params.yaml", params)
        apply_overrides(params, point["params.yaml"])
        yield yaml.safe_load(params.read_text())


def test_every_readme_experiment_command_gives_valid_params(tmp_path):
    """Each README recipe, every point of its grid, applied to params.yaml the way dvc does,
    passes the config checks."""
    commands = readme_experiment_commands()
    assert len(commands) >= 10
    for args in commands:
        for params in readme_points(args, tmp_path):
            parse_params(params)


# a queued grid's target, and the train_on_val keys it must turn off to get a validation score
# and stop before evaluation
VALIDATION_ONLY = {
    "train_probe": ("probe",),
    # the holdout twins train on the train split and validate whatever train_on_val says
    "holdout_finetune": (),
    "holdout_scratch": (),
    "train_finetune": ("train", "probe"),
    "train_scratch": ("scratch",),
}


def test_every_readme_grid_is_validation_only(tmp_path):
    """Each queued README recipe targets a training or holdout stage (it never scores the test split)
    and validates that model."""
    queued = [args for args in readme_experiment_commands() if "--queue" in args]
    assert queued, "the docs queue no grid"
    for args in queued:
        targets = [
            a
            for i, a in enumerate(args)
            if not a.startswith("-") and args[i - 1] not in ("-S", "--set-param", "-n", "--name")
        ]
        assert len(targets) == 1 and targets[0] in VALIDATION_ONLY, (
            f"dvc exp run {shlex.join(args)}: no training stage as its target, "
            f"one of {', '.join(VALIDATION_ONLY)}"
        )
        for params in readme_points(args, tmp_path):
            for section in VALIDATION_ONLY[targets[0]]:
                assert params[section]["train_on_val"] is False, (
                    f"dvc exp run {shlex.join(args)}: {section}.train_on_val stays true"
                )


def test_holdout_twins_score_whole_experiments_and_holdout_grids(tmp_path):
    """Today's pipeline validates in the holdout twins: a `holdout_finetune` grid point (its
    final fit is the baseline's) and a whole `dvc exp run -S train.lr=…` (its final fit has
    no score, its holdout twin has one) are both scored by their holdout runs, and the
    baseline by its own; the scratch twin, not re-run, counts once, for the baseline."""
    defaults = yaml.safe_load((PROJECT / "params.yaml").read_text())
    holdouts = {model: f"metrics/train_{model}_holdout/metrics.json" for model in ("finetune", "scratch")}

    def summary(acc: float, epochs: int = 3) -> dict:
        return {"data": {"best/val_acc": acc, "val": {"acc": acc}, "epochs_run": epochs}}

    baseline = entry(
        "main", {}, {"probe": 0.88, "finetune": NO_VALIDATION, "scratch": NO_VALIDATION}, base=defaults
    )
    committed = baseline["data"]["metrics"]
    committed.update({holdouts["finetune"]: summary(0.90), holdouts["scratch"]: summary(0.45)})
    unchanged = {path: committed[path] for path in committed if path != holdouts["finetune"]}
    grid_point = entry(
        "grid-1",
        {"train.lr": 0.004},
        {},
        base=defaults,
        copied={**unchanged, holdouts["finetune"]: summary(0.93)},
    )
    rerun = {path: committed[path] for path in committed if "finetune" not in path}
    whole = entry(
        "whole",
        {"train.lr": 0.0005},
        {"finetune": NO_VALIDATION},
        base=defaults,
        copied={**rerun, holdouts["finetune"]: summary(0.91)},
    )
    (tmp_path / "shown.json").write_text(json.dumps(shown(baseline, [grid_point, whole])))
    summary_ = summarize(tmp_path / "shown.json", tmp_path / "out")
    finetune = summary_["finetune"]
    assert [(s.runs, s.val_acc) for s in finetune["settings"]] == [
        (["grid-1"], 0.93),
        (["whole"], 0.91),
        (["main"], 0.90),
    ]
    assert (
        finetune["varied"] == ["lr"]
        and finetune["chosen"]["final_fit"]["command"] == "dvc exp run -S train.lr=0.004"
    )
    assert [(s.runs, s.val_acc) for s in summary_["scratch"]["settings"]] == [(["main"], 0.45)]
    assert json.loads((tmp_path / "out/summary.json").read_text())["without_validation"] == {}


def test_runs_on_other_images_are_left_out_and_named(tmp_path):
    """Validation scores on two datasets are not comparable:
    only runs on the final fit's data.source are ranked."""
    workspace = tiny_params()
    mine = entry("mine", {"scratch.lr": 0.1}, {"scratch": 0.5}, base=workspace)
    theirs = entry(
        "theirs", {"scratch.lr": 0.2, "data.source": "/photos/holiday"}, {"scratch": 0.9}, base=workspace
    )
    (tmp_path / "shown.json").write_text(
        json.dumps(shown(entry("main", {}, {}, base=workspace), [mine, theirs]))
    )
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")
    assert summary["scratch"]["chosen"]["runs"] == ["mine"] and summary["scratch"]["chosen"]["val_acc"] == 0.5
    saved = json.loads((tmp_path / "out/summary.json").read_text())
    (note,) = saved["left_out"]
    assert note.startswith("theirs: it ran on other images (data.source: /photos/holiday)")
    assert "theirs: it ran on other images" in (tmp_path / "out/experiments.md").read_text()


def test_a_run_is_scored_by_the_epoch_its_final_fit_keeps(tmp_path):
    """A final fit trains a fixed number of epochs and keeps the last: a 5-epoch run whose best
    epoch was the 2nd (92.7 %) but whose last was 91.5 % loses to a 2-epoch run ending at 91.9 %."""
    workspace = tiny_params()
    long = entry("long", {"train.epochs": 5}, {"finetune": 0.927}, base=workspace)
    long["data"]["metrics"]["metrics/train_finetune/metrics.json"]["data"]["val"]["acc"] = 0.915
    short = entry("short", {"train.epochs": 2}, {"finetune": 0.919}, base=workspace)
    (tmp_path / "shown.json").write_text(
        json.dumps(shown(entry("main", {}, {}, base=workspace), [long, short]))
    )
    summary = summarize(tmp_path / "shown.json", tmp_path / "out")
    assert [(s.runs, s.val_acc) for s in summary["finetune"]["settings"]] == [
        (["short"], 0.919),
        (["long"], 0.915),
    ]


def test_only_summarises_the_named_experiments(tmp_path):
    """Several grids queued together: --only keeps one grid's runs; a name not in the listing is an error."""
    (tmp_path / "shown.json").write_text(json.dumps(grid()))
    summary = summarize(tmp_path / "shown.json", tmp_path / "out", only=["exp-0", "exp-3"])
    assert [s.runs for s in summary["finetune"]["settings"]] == [["exp-0"], ["exp-3"]]
    assert summary["finetune"]["chosen"]["runs"] == ["exp-0"], "exp-1 scored higher but is not in this grid"
    with pytest.raises(ExperimentsError, match="no completed experiment named exp-queued, nope"):
        summarize(tmp_path / "shown.json", tmp_path / "out", only=["exp-0", "nope", "exp-queued"])


def test_a_head_grid_varies_the_head_not_the_probe_settings_only_lp_ft_runs_have(tmp_path):
    """LP-FT runs depend on the features' and probe's settings, random-head runs do not: those keys, present
    in only some settings, do not vary, so the grid is init_head x lr (a heatmap) whichever head wins."""
    workspace = set_dotted(tiny_params(), {"probe.train_on_val": False})
    for winner, command in (
        ("probe", "-S train.init_head=probe -S train.lr=0.001"),
        ("random", "-S train.init_head=random -S train.lr=0.004"),
    ):
        scores = {
            ("probe", 0.001): 0.91,
            ("probe", 0.004): 0.90,
            ("random", 0.001): 0.47,
            ("random", 0.004): 0.93 if winner == "random" else 0.88,
        }
        runs = [
            entry(
                f"{head}-{lr}", {"train.init_head": head, "train.lr": lr}, {"finetune": acc}, base=workspace
            )
            for (head, lr), acc in scores.items()
        ]
        (tmp_path / "shown.json").write_text(json.dumps(shown(entry("main", {}, {}, base=workspace), runs)))
        finetune = summarize(tmp_path / "shown.json", tmp_path / winner)["finetune"]
        assert finetune["varied"] == ["init_head", "lr"], winner
        assert finetune["chosen"]["runs"] == [f"{winner}-{0.001 if winner == 'probe' else 0.004}"]
        assert finetune["chosen"]["final_fit"]["command"].startswith(f"dvc exp run {command} ")
        assert (tmp_path / winner / "heatmap_finetune.png").is_file()
        assert (
            "| 47.00% | random | 0.001 | random-0.001 |" in (tmp_path / winner / "experiments.md").read_text()
        )


def test_a_setting_on_several_folds_is_scored_by_its_mean_over_the_folds_compared(tmp_path):
    """Candidates closer than one split's noise are decided on several validation folds: one setting per
    recipe whatever its fold, ranked by the mean over the folds the most settings ran (the baseline commit's
    fold 0, which the rival did not run, would otherwise decide; a setting run on fold 0 only is not ranked,
    though its one score is the highest), the best of repeated runs on a fold, the standard error across
    folds and the paired difference to the chosen one; the fold is never a varied key nor in the final fit."""
    workspace = tiny_params()
    default, rival, lucky = (
        workspace["train"]["lr"],
        2 * workspace["train"]["lr"],
        4 * workspace["train"]["lr"],
    )
    scores = {  # (name, lr, fold): validation accuracy
        ("default-1", default, 1): 0.80,
        ("default-2", default, 2): 0.84,
        ("rival-1", rival, 1): 0.83,
        ("rival-1-again", rival, 1): 0.81,
        ("rival-2", rival, 2): 0.85,
        ("lucky-0", lucky, 0): 0.995,
    }
    runs = [
        entry(name, {"train.lr": lr, "data.val_fold": fold}, {"finetune": acc}, base=workspace)
        for (name, lr, fold), acc in scores.items()
    ]
    baseline = entry("main", {}, {"finetune": 0.99}, base=workspace)  # fold 0
    (tmp_path / "shown.json").write_text(json.dumps(shown(baseline, runs)))
    finetune = summarize(tmp_path / "shown.json", tmp_path / "out")["finetune"]

    assert finetune["varied"] == ["lr"]
    best, second = finetune["settings"]
    assert best.values["lr"] == rival and best.scores == {1: 0.83, 2: 0.85} and best.compared == [1, 2]
    assert second.scores == {0: 0.99, 1: 0.80, 2: 0.84} and second.val_acc == pytest.approx(0.82)
    assert best.val_acc == pytest.approx(0.84) and best.standard_error == pytest.approx(0.01)
    assert [s.runs for s in finetune["unranked"]] == [["lucky-0"]]
    chosen = finetune["chosen"]
    assert chosen["folds"] == [1, 2] and chosen["val_acc_se"] == pytest.approx(0.01)
    assert chosen["scored_by"] == "rival-1, rival-2"
    assert chosen["final_fit"]["command"] == f"dvc exp run -S train.lr={rival!r} -S train.train_on_val=true"
    report = (tmp_path / "out/experiments.md").read_text()
    assert "| validation accuracy | per fold (1 / 2) | vs chosen | lr | experiments |" in report
    assert f"| 84.00% ± 1.00% | 83.00% / 85.00% |  | {rival!r} | rival-1, rival-1-again, rival-2 |" in report
    assert "| 82.00% ± 2.00% | 80.00% / 84.00% | -2.00 ± 1.00 points |" in report
    assert "Not in the comparison: fold 0 (main)." in report
    assert "Not ranked, as they did not run every one of those folds: lucky-0 (fold 0)." in report
    assert json.loads((tmp_path / "out/summary.json").read_text())["finetune"]["not_ranked"] == [
        {"runs": ["lucky-0"], "folds": [0]}
    ]
    with (tmp_path / "out/experiments.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["val_acc"], r["val_acc_se"], r["folds"]) for r in rows] == [
        ("0.84", "0.01", "1 2"),
        ("0.82", "0.02", "1 2"),
    ]
    assert (tmp_path / "out/validation_vs_params.png").is_file()


def test_equal_scores_go_to_the_first_scoring_run(tmp_path):
    """A setting run twice (a nondeterministic run) is scored by its best run: a tie with another setting
    goes to the first name among the runs that scored it, not among all its runs."""
    workspace = tiny_params()
    lr = workspace["train"]["lr"]
    runs = [
        entry("a-run", {"train.lr": lr}, {"finetune": 0.80}, base=workspace),
        entry("z-run", {"train.lr": lr}, {"finetune": 0.90}, base=workspace),
        entry("b-run", {"train.lr": 2 * lr}, {"finetune": 0.90}, base=workspace),
    ]
    (tmp_path / "shown.json").write_text(json.dumps(shown(entry("main", {}, {}, base=workspace), runs)))
    finetune = summarize(tmp_path / "shown.json", tmp_path / "out")["finetune"]
    assert [(s.runs, s.val_acc) for s in finetune["settings"]] == [
        (["b-run"], 0.90),
        (["a-run", "z-run"], 0.90),
    ]


def test_a_key_only_some_settings_have_varies_and_the_plots_leave_the_others_out(tmp_path):
    """probe.C varies among the probe-headed runs, which random-head runs do not have: the plots draw each
    panel from the settings that have its keys, and the heatmap outlines the choice only where it is."""
    workspace = set_dotted(tiny_params(), {"probe.train_on_val": False})
    runs = [
        entry("probe-c1", {"train.init_head": "probe", "probe.C": [0.1]}, {"finetune": 0.90}, base=workspace),
        entry("probe-c3", {"train.init_head": "probe", "probe.C": [0.3]}, {"finetune": 0.88}, base=workspace),
        entry("random", {"train.init_head": "random"}, {"finetune": 0.95}, base=workspace),
    ]
    (tmp_path / "shown.json").write_text(json.dumps(shown(entry("main", {}, {}, base=workspace), runs)))
    finetune = summarize(tmp_path / "shown.json", tmp_path / "out")["finetune"]
    assert finetune["varied"] == ["init_head", "probe.C"] and finetune["chosen"]["runs"] == ["random"]
    assert finetune["chosen"]["values"] == {"init_head": "random"}, "a random head has no probe.C"
    for picture in ("validation_vs_params.png", "heatmap_finetune.png"):
        assert (tmp_path / "out" / picture).read_bytes()[:4] == b"\x89PNG"


def test_the_table_shows_each_runs_own_scores_and_the_params_that_vary_in_120_columns(tmp_path):
    """`transferlab experiments --table`, for the docs' widest grid (five train: keys, 32 points, on a step
    schedule and 4 epochs): one row a run, its validation score per model (`-` where the stage did not run in
    it, its baseline's counting), the keys that vary under their section, and no line over 120 characters,
    where `dvc exp show` truncates all 238 of its columns. A listing saved elsewhere cannot be checked against
    its dvc.lock: it says so."""
    workspace = tiny_params()
    grid_keys = {
        "train.batch_size": (16, 32),
        "train.lr": (0.001, 0.005),
        "train.step_epochs": (1, 2),
        "train.gamma": (0.1, 0.5),
        "train.weight_decay": (0, 0.0005),
    }
    baseline = entry("main", {}, {"probe": 0.88, "finetune": 0.45, "scratch": 0.3}, base=workspace)
    not_run = {
        path: baseline["data"]["metrics"][path]
        for path in ("metrics/train_probe/metrics.json", "metrics/train_scratch/metrics.json")
    }
    runs = [
        entry(
            f"grid-point-{i:02d}",  # wider than dvc's names (adjective-noun, 10 characters)
            {"train.schedule": "step", "train.epochs": 4, **dict(zip(grid_keys, values, strict=True))},
            {"finetune": 0.5 + i / 100},
            base=workspace,
            copied=not_run,
        )
        for i, values in enumerate(itertools.product(*grid_keys.values()))
    ]
    (tmp_path / "shown.json").write_text(json.dumps(shown(baseline, runs)))
    lines = table(tmp_path / "shown.json").splitlines()

    rows = lines[: lines.index("")]
    assert len(rows) == 2 + 33 and max(map(len, rows)) <= 120
    cells = [" ".join(row.split()) for row in rows]
    assert cells[0] == "val acc train"
    # the varied keys in params.yaml's order
    assert (
        cells[1]
        == "experiment probe finetune scratch epochs batch_size lr weight_decay schedule step_epochs gamma"
    )
    assert cells[2] == "main 88.00% 45.00% 30.00% 2 8 0.001 5e-05 cosine 2 0.1"
    assert cells[3] == "grid-point-00 - 50.00% - 4 16 0.001 0 step 1 0.1"
    assert cells[-1] == "grid-point-31 - 81.00% - 4 32 0.005 0.0005 step 2 0.5"
    assert "*" not in "\n".join(rows)
    assert lines[-1].startswith(
        "Not checked against their dvc.lock (git cannot show it here): main, grid-point-00"
    )
