"""The data-efficiency curve: seeded nested subsets of the train split, a point per model, size and draw
(efficiency/dvc.yaml), and the curve drawn from them."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
import yaml

from conftest import run_command, tiny_params
from transferlab.config import parse_params
from transferlab.efficiency import Summary, findings
from transferlab.errors import ConfigError
from transferlab.run import Run
from transferlab.subsets import Subset


def test_subsets_are_nested_seeded_and_hold_every_class():
    labels = np.repeat(np.arange(4), 10)
    np.random.default_rng(0).shuffle(labels)
    for draw in (0, 1):
        previous = np.zeros(0, dtype=int)
        for n in (1, 3, 5, 10):
            rows = Subset(n, draw).rows(labels)
            assert np.bincount(labels[rows]).tolist() == [n] * 4
            assert set(previous) <= set(rows), "a draw's larger subset holds its smaller one"
            assert np.array_equal(rows, Subset(n, draw).rows(labels)), "the same seed, the same subset"
            previous = rows
    assert not np.array_equal(Subset(3, 0).rows(labels), Subset(3, 1).rows(labels)), "draws differ"


def test_a_class_with_fewer_images_than_asked_trains_on_all_it_has(caplog):
    labels = np.array([0] * 8 + [1] * 2)
    with caplog.at_level(logging.WARNING):
        rows = Subset(5, 0).rows(labels)
    assert np.bincount(labels[rows]).tolist() == [5, 2]
    assert "class 1 has 2 training images, fewer than 5" in caplog.text


def test_sizes_the_train_split_cannot_hold_fail_the_curve_naming_the_key_and_only_the_curve():
    params = tiny_params()  # 6 training images per class, 2 of them validate: subsets of up to 4
    params["efficiency"]["sizes"] = [1, 5]
    checked = parse_params(params)  # the main pipeline's stages do not read the curve's sizes
    with pytest.raises(ConfigError, match=r"efficiency.sizes: \[5\] is not within 1 to 4"):
        checked.check_efficiency()
    params["efficiency"].update(sizes=[1], scratch_sizes=[6])
    with pytest.raises(ConfigError, match=r"efficiency.scratch_sizes: \[6\]"):
        parse_params(params).check_efficiency()
    params["efficiency"].update(scratch_sizes=[], draws=[0, 0])
    with pytest.raises(ConfigError, match="efficiency.draws lists a value twice"):
        parse_params(params)


def test_a_recipe_that_watches_validation_cannot_make_a_point():
    params = tiny_params()
    params["scratch"].update(schedule="plateau")  # valid for the main run, which validates every epoch
    with pytest.raises(ConfigError, match="scratch.schedule watches the validation split, but a point"):
        parse_params(params).check_efficiency()


def summary(model: str, n: int, by_draw: dict) -> Summary:
    scores = list(by_draw.values())
    return Summary(model, n, float(np.mean(scores)), 0.0, min(scores), max(scores), len(scores), 1.0, by_draw)


def test_the_fine_tune_beats_the_probe_only_where_it_wins_every_draw():
    summaries = [
        summary("probe", 5, {0: 0.80, 1: 0.82}),
        summary("finetune", 5, {0: 0.70, 1: 0.95}),  # ahead on the mean, behind in draw 0
        summary("scratch", 5, {0: 0.10, 1: 0.12}),
        summary("probe", 10, {0: 0.85, 1: 0.86}),
        summary("finetune", 10, {0: 0.86, 1: 0.87}),
        summary("scratch", 10, {0: 0.20, 1: 0.22}),
        summary("probe", 30, {None: 0.90}),
        summary("finetune", 30, {None: 0.89}),
        summary("scratch", 30, {None: 0.85}),
    ]
    scratch, finetune = findings(summaries)
    assert finetune == (
        "The fine-tuned model first beats the probe at 10 images per class, in every draw (by 1.00 points on "
        "average)."
    )
    assert scratch == (
        "The scratch model matches the linear probe's 81.00 % at 5 images per class with 30 images per class "
        "(85.00 %)."
    )


def test_a_point_trains_on_its_subset_from_the_probe_of_the_same_subset():
    run = Run.of(parse_params(tiny_params()), "finetune", subset=Subset(3, 1))
    assert (run.name, run.probe) == ("efficiency/finetune_n3_d1", "efficiency/probe_n3_d1")
    assert run.cfg.train_on_val, "no validation: the last epoch is kept, as in a final fit"
    assert run.described()["images_per_class"] == 3, "in its params and its resume fingerprint"


def rows_of(repo, split: str, column: str = "path") -> list[str]:
    with (repo / f"data/prepared/{split}.csv").open() as f:
        return [row[column] for row in csv.DictReader(f)]


@pytest.mark.slow
def test_the_curve_runs_as_its_own_pipeline(reproduced):
    """`dvc repro` left the curve alone; `dvc repro efficiency/dvc.yaml` trains and scores every point on its
    own subset (LP-FT from its own probe), draws the curve with the main models at the full size, and
    leaves `dvc status` clean."""
    repo = reproduced
    assert not (repo / "metrics/efficiency").exists(), "the default dvc repro is the main comparison only"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(init_head="probe", train_on_val=True)  # the project's LP-FT
    params["efficiency"].update(sizes=[3])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_command(["dvc", "repro"], repo)
    result = run_command(["dvc", "repro", "efficiency/dvc.yaml"], repo)
    for model, n in (("probe", 3), ("finetune", 3), ("scratch", 2)):
        for draw in (0, 1):
            assert f"subset_{model}@{n}-{draw}" in result.stdout
    assert "Running stage 'efficiency/dvc.yaml:efficiency'" in result.stdout
    status = run_command(["dvc", "status"], repo).stdout
    assert "up to date" in status, status

    classes = json.loads((repo / "data/prepared/classes.json").read_text())
    train = rows_of(repo, "train")
    train_labels = np.array(rows_of(repo, "train", "label"), dtype=int)
    drawn = {train[i] for draw in (0, 1) for i in Subset(3, draw).rows(train_labels)}
    assert drawn and not drawn & {*rows_of(repo, "val"), *rows_of(repo, "test")}, "train-split images only"
    points = {}
    for model, n, draw in (("probe", 3, 0), ("finetune", 3, 0), ("finetune", 3, 1), ("scratch", 2, 1)):
        name = f"{model}_n{n}_d{draw}"
        points[name] = json.loads((repo / f"metrics/efficiency/test_{name}/metrics.json").read_text())
        assert points[name]["train_images"] == n * len(classes)
        assert points[name]["test_images"] == len(rows_of(repo, "test"))
    # each point is its own model: scored again from its file, it gives its metrics
    from transferlab.scoring import classification_metrics
    from transferlab.trained_model import TrainedModel

    test = np.load(repo / "data/prepared/test.npy")
    labels = np.array(rows_of(repo, "test", "label"), dtype=int)
    states = {}
    for name in ("finetune_n3_d0", "finetune_n3_d1"):
        trained = TrainedModel.load(repo / f"data/models/efficiency/{name}/model.pt", torch.device("cpu"))
        probs = trained.probabilities(test, 16, name, "flip")
        rescored = classification_metrics(labels, probs, [1], 15)["mean_per_class_acc"]
        assert rescored == pytest.approx(points[name]["mean_per_class_acc"], abs=1e-6)
        states[name] = trained.model.state_dict()
        assert trained.card.config["train_on_val"] and trained.card.run == f"efficiency/{name}"
    assert any(not torch.equal(a, states["finetune_n3_d1"][k]) for k, a in states["finetune_n3_d0"].items())

    curve = json.loads((repo / "metrics/efficiency.json").read_text())
    main = {m: json.loads((repo / f"metrics/test_{m}/metrics.json").read_text()) for m in curve}
    for model in ("probe", "finetune", "scratch"):
        assert curve[model]["n6"]["mean"] == round(main[model]["mean_per_class_acc"], 4), "the main models"
        assert curve[model]["n6"]["std"] == 0
    draws = [points["finetune_n3_d0"], points["finetune_n3_d1"]]
    assert curve["finetune"]["n3"]["mean"] == round(np.mean([p["mean_per_class_acc"] for p in draws]), 4)
    table = (repo / "metrics/efficiency.md").read_text()
    assert "| Images per class | Linear probe | Fine-tuned | From scratch |" in table
    assert "The scratch model" in table and "The fine-tuned model" in table
    assert (repo / "plots/efficiency.png").stat().st_size > 10_000
    assert "data:image/png;base64," in (repo / "metrics/efficiency.html").read_text()
