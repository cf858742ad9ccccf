"""The real dvc commands, end to end, on a tiny generated dataset in a temporary git repo."""

from __future__ import annotations

import json

import pytest
import yaml
from PIL import Image

from browser import open_page
from conftest import run_command
from imagegen import make_image_folder

pytestmark = pytest.mark.slow  # every test here runs dvc or training stages end to end

MODELS = ("probe", "finetune", "scratch")
STAGES = [
    "prepare",
    "features",
    "train_probe",
    "train_finetune",
    "train_scratch",
    "holdout_finetune",
    "holdout_scratch",
    *(f"evaluate@{m}" for m in MODELS),
    "gradcam",
    "compare",
]


def check_report(repo):
    """The HTML report: a DVC output (not in git), one file that renders in chromium with every picture."""
    report = repo / "metrics/report.html"
    assert "report.html" in (repo / "metrics/.gitignore").read_text()
    seen = open_page(report, repo / "screenshot.png")
    assert seen.console_errors == [] and seen.broken_images == []
    assert seen.images == 3 + 3 * 3, (
        "curves, Grad-CAM, per-class gain; per model: confusion matrix, calibration, mistakes"
    )
    assert "Mean per-class accuracy" in seen.text and "Params of each model" in seen.text
    with Image.open(repo / "screenshot.png") as shot:
        assert shot.width == 1280 and shot.height > 3000, "the whole page, pictures included"
        assert len(shot.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50, "not a blank page"


def test_repro_then_experiment_then_plots(project_repo):
    """The project's default recipe (probe, LP-FT from it, train + val) on tiny data,
    with the real dvc commands."""
    repo = project_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(init_head="probe", train_on_val=True)
    params["scratch"]["train_on_val"] = True
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run_command(["dvc", "repro"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout

    assert (repo / "metrics/train_probe/regularization.csv").read_text().startswith("C,val_acc,val_loss")
    for mode in ("finetune", "scratch"):
        curve = (repo / f"metrics/train_{mode}/plots/metrics/train/acc.tsv").read_text().splitlines()
        assert len(curve) == 1 + 2, "one header line plus one row per epoch"
        assert not (repo / f"metrics/train_{mode}/plots/metrics/val").exists(), "trained on train + val"
        held_out = (repo / f"metrics/train_{mode}_holdout/plots/metrics/val/acc.tsv").read_text().splitlines()
        assert len(held_out) == 1 + 2, "its holdout twin validates every epoch"
    for mode in MODELS:
        assert (repo / f"data/models/{mode}/model.pt").is_file()
        test = json.loads((repo / f"metrics/test_{mode}/metrics.json").read_text())
        assert 0 <= test["top1"] <= test["top5"] <= 1
        assert test["test_images"] == 3 * (12 - 6)
        assert (repo / f"metrics/test_{mode}/plots/sklearn/confusion_matrix.json").is_file()
        per_class = (repo / f"metrics/test_{mode}/per_class.csv").read_text().splitlines()
        assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 1 + 3
    report = (repo / "metrics/comparison.md").read_text()
    assert (
        "| Mean per-class accuracy |" in report
        and "Gain over scratch" in report
        and "| Fine-tuned (LP-FT) |" in report
    )
    assert (repo / "plots/learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    curve = (repo / "metrics/train_finetune_holdout/interpolation.csv").read_text().splitlines()
    assert curve[0] == "interpolation,val_acc,val_loss" and len(curve) == 1 + 6, (
        "LP-FT's twin: the WiSE-FT curve"
    )
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    for mode in MODELS:
        for picture in ("confusion_matrix.png", "calibration.png", "misclassified.jpg", "confused_pairs.csv"):
            assert (repo / f"metrics/test_{mode}/{picture}").is_file()
    check_report(repo)

    # a complete run leaves nothing to do
    assert "Data and pipelines are up to date" in run_command(["dvc", "repro"], repo).stdout

    # the team's shared storage: a DVC remote for data and models, a git remote for code, params and dvc.lock
    remote, origin = repo.parent / "dvc-remote", repo.parent / "origin.git"
    run_command(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", "baseline run"], repo)
    run_command(["dvc", "push"], repo)
    run_command(["git", "init", "-q", "--bare", str(origin)], repo)
    run_command(["git", "remote", "add", "origin", str(origin)], repo)
    run_command(["git", "push", "-q", "origin", "HEAD"], repo)

    # an experiment on one model's params re-runs that model's stages only
    # (and the panel where the three meet)
    exp = run_command(["dvc", "exp", "run", "-S", "train.lr=0.0005"], repo)
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in exp.stdout}
    assert ran == {"train_finetune", "holdout_finetune", "evaluate@finetune", "gradcam", "compare"}, ran
    for stage in (
        "prepare",
        "features",
        "train_probe",
        "train_scratch",
        "holdout_scratch",
        "evaluate@probe",
        "evaluate@scratch",
    ):
        assert f"Stage '{stage}' didn't change" in exp.stdout, stage
    shown = json.loads(run_command(["dvc", "exp", "show", "--json"], repo).stdout)
    runs = [e for commit in shown for e in (commit.get("experiments") or [])]
    lrs = {
        r["revs"][0]["name"]: r["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]["lr"]
        for r in runs
    }
    (experiment,) = [name for name, lr in lrs.items() if lr == 0.0005]

    # the experiment against the baseline commit: both revisions of the learning curves
    # (`dvc exp run` leaves the experiment in the workspace)
    diff = json.loads(run_command(["dvc", "plots", "diff", "HEAD", "--json"], repo).stdout)["data"]
    points = diff["training_accuracy"][0]["content"]["data"]["values"]
    assert {(p["rev"], p["filename"].split("/")[0]) for p in points} == {
        (rev, stage) for rev in ("workspace", "HEAD") for stage in ("train_finetune", "train_scratch")
    }
    held_out = diff["heldout_accuracy"][0]["content"]["data"]["values"]
    assert {(p["rev"], p["filename"].split("/")[0]) for p in held_out} == {
        (rev, stage)
        for rev in ("workspace", "HEAD")
        for stage in ("train_finetune_holdout", "train_scratch_holdout")
    }
    confusion = diff["metrics/test_finetune/plots/sklearn/confusion_matrix.json"][0]["content"]["data"][
        "values"
    ]
    assert {p["actual"] for p in confusion} == {"class_0", "class_1", "class_2"}

    # a teammate clones, pulls the baseline's data and models instead of re-running,
    # then the pushed experiment
    run_command(["dvc", "exp", "push", "origin", experiment], repo)
    clone = repo.parent / "clone"
    run_command(["git", "clone", "-q", str(origin), str(clone)], repo.parent)
    run_command(["dvc", "pull"], clone)
    assert "Data and pipelines are up to date" in run_command(["dvc", "repro", "--dry"], clone).stdout, (
        "pulled outputs need no re-run"
    )
    run_command(["dvc", "exp", "pull", "origin", experiment], clone)
    run_command(["dvc", "exp", "apply", experiment], clone)
    for path in ("data/models/finetune/model.pt", "metrics/test_finetune/metrics.json"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path


def test_a_probe_experiment_reuses_the_frozen_features_and_stops_at_validation(project_repo):
    """`dvc exp run train_probe -S probe.C=...`: the features stage's output is reused,
    nothing is scored on test."""
    repo = project_repo
    run_command(["dvc", "repro", "train_probe"], repo)
    features = (repo / "data/features/train.npy").read_bytes()
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", "baseline"], repo)
    exp = run_command(
        ["dvc", "exp", "run", "train_probe", "-S", "probe.C=[0.5]", "-S", "probe.train_on_val=false"], repo
    )
    assert "Stage 'features' didn't change" in exp.stdout and "Running stage 'train_probe'" in exp.stdout
    assert "evaluate" not in exp.stdout and not (repo / "metrics/test_probe").exists(), (
        "a grid point stops at validation"
    )
    assert (repo / "data/features/train.npy").read_bytes() == features
    summary = json.loads((repo / "metrics/train_probe/metrics.json").read_text())
    assert summary["best/C"] == 0.5 and 0 <= summary["best/val_acc"] <= 1


def test_pointing_data_source_at_other_images_re_runs_prepare(project_repo, tmp_path):
    """data.source is a param DVC sees: another folder of images makes prepare (and what follows)
    out of date."""
    repo = project_repo
    run_command(["dvc", "repro", "prepare"], repo)
    assert "Data and pipelines are up to date" in run_command(["dvc", "status", "prepare"], repo).stdout
    other = make_image_folder(tmp_path / "other_images", classes=4, per_class=12, seed=3)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = str(other)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "modified:" in run_command(["dvc", "status", "prepare"], repo).stdout
    result = run_command(["dvc", "repro", "prepare"], repo)
    assert "Running stage 'prepare'" in result.stdout
    report = json.loads((repo / "metrics/prepare.json").read_text())
    assert report["source"] == str(other) and report["classes"] == 4
