"""The linear probe, LP-FT, train/test resolutions and flip TTA, on tiny generated data."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_params
from transferlab import linear_probe, scoring, trained_model, training
from transferlab.config import load_params, parse_params
from transferlab.errors import ConfigError, ModelError
from transferlab.inference import predict_logits
from transferlab.inputs import normalize
from transferlab.model_card import EvalInput
from transferlab.paths import checkpoint_path, evaluation_dir, holdout, train_dir
from transferlab.splits import load_classes, load_features, load_split
from transferlab.stages import evaluate, features, probe
from transferlab.trained_model import TrainedModel


def noisy_blobs(seed: int, count: int, classes: int = 3, dims: int = 20) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    centres = np.random.default_rng(0).normal(size=(classes, dims))
    return (centres[labels] + rng.normal(scale=2.0, size=(count, dims))).astype(np.float32), labels


@pytest.mark.parametrize("winner", [0, 1])
def test_the_regularisation_is_chosen_on_validation(winner):
    """Validation labels are what one of two C values predicts:
    that C must be chosen, whatever the training fit says."""
    train_set, (val_features, _) = noisy_blobs(1, 60), noisy_blobs(2, 200)
    grid = [1e-4, 10.0]
    heads = [linear_probe.fit_head(*train_set, 3, C, 1000) for C in grid]
    predictions = [head.logits(val_features).argmax(1) for head in heads]
    assert (predictions[0] != predictions[1]).mean() > 0.1, (
        "the two C values must disagree for the test to mean anything"
    )
    cfg = dataclasses.replace(parse_params(tiny_params()).probe, C=grid)
    head, chosen, results = linear_probe.choose_c(train_set, (val_features, predictions[winner]), 3, cfg)
    assert chosen["C"] == grid[winner]
    np.testing.assert_array_equal(head.weight, heads[winner].weight)  # the winner, fitted on train only
    assert results[winner]["val_acc"] == 1.0 and results[1 - winner]["val_acc"] < 1.0


def test_the_fitted_head_is_the_logistic_regression_on_raw_features():
    """The standardisation is folded into the weights: the head takes raw features;
    two classes give a proper softmax."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    for classes in (2, 3):
        features, labels = noisy_blobs(3, 90, classes)
        head = linear_probe.fit_head(features, labels, classes, 1.0, 1000)
        scaler = StandardScaler().fit(features)
        reference = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(features), labels)
        expected = reference.predict_proba(scaler.transform(features))
        got = torch.from_numpy(head.logits(features)).softmax(1).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_probe_stage_then_lp_ft_starts_from_exactly_the_probe(project):
    project(probe={"C": [0.01, 1.0], "flip": True})
    features.main()
    probe.main()
    fitted = TrainedModel.load(checkpoint_path("probe"), device="cpu")
    summary = json.loads((train_dir("probe") / "metrics.json").read_text())
    with (train_dir("probe") / "regularization.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["C"]) for r in rows] == [0.01, 1.0]
    best = max(
        rows, key=lambda r: (float(r["val_acc"]), -float(r["val_loss"]))
    )  # ties: the lower validation loss
    assert summary["best/C"] == float(best["C"]) and summary["train_images"] == 3 * 6, "refit on train + val"
    train_features, val_features = load_features("train"), load_features("val")
    assert train_features.shape == (2, 3 * 4, 512) and val_features.shape == (2, 3 * 2, 512), "both views"

    # the checkpoint's head is the logistic regression refitted with the chosen C on train + val (both views)
    labels = np.concatenate([load_split("train")[1], load_split("val")[1]])
    samples = linear_probe.as_samples(
        np.concatenate([train_features, val_features], axis=1), labels, flip=True
    )
    refit = linear_probe.fit_head(*samples, 3, summary["best/C"], 1000)
    np.testing.assert_allclose(fitted.model.fc.weight.detach().numpy(), refit.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fitted.model.fc.bias.detach().numpy(), refit.bias, rtol=1e-5, atol=1e-6)
    images, _ = load_split("val")

    # LP-FT before its first step predicts exactly what the probe predicts
    params = load_params()
    cfg = params.train_config("finetune")
    start, _, prep = training.initial_model(
        params.model.arch,
        project.weights_path,
        load_classes(),
        dataclasses.replace(cfg, init_head="probe"),
        [],
    )
    assert torch.equal(
        predict_logits(start, images, EvalInput(prep, 32, False), 16),
        predict_logits(fitted.model, images, EvalInput(fitted.card.preprocessing, 32, False), 16),
    )
    fresh, _, _ = training.initial_model(params.model.arch, project.weights_path, load_classes(), cfg, [])
    assert not torch.equal(fresh.fc.weight, start.fc.weight), "init_head: random keeps a fresh head"

    with pytest.raises(
        ConfigError, match="probe.train_on_val: true"
    ):  # its head has seen the validation images
        project(init_head="probe", train_on_val=False) or training.fit("finetune")
    project(init_head="probe", train_on_val=True, epochs=1)
    best = training.fit("finetune")
    assert best == {"val_acc": None, "epoch": 1}, "trained on train + val: no validation, the last epoch kept"
    assert not (train_dir("finetune") / "plots" / "metrics" / "val").exists()
    assert not (train_dir("finetune") / "interpolation.csv").exists(), "no validation, no curve"


def test_random_crops_are_more_training_views_for_the_probe_only(project):
    """features.train_crops: the train and validation images get that many more
    views (drawn the same each run), the test images keep two; the probe trains
    on every view and scores validation and test images on the first two."""
    project(probe={"C": [1.0]}, features={"train_crops": 2})
    features.main()
    train, val, test = (np.array(load_features(split)) for split in ("train", "val", "test"))
    assert train.shape == (4, 3 * 4, 512) and val.shape == (4, 3 * 2, 512) and test.shape == (2, 3 * 6, 512)
    assert not np.allclose(train[2], train[0]) and not np.allclose(train[2], train[3]), (
        "the crops are views of their own"
    )
    samples, labels = linear_probe.as_samples(train, load_split("train")[1], flip=True)
    assert samples.shape == (4 * 3 * 4, 512) and np.array_equal(labels[:12], labels[24:36])
    np.testing.assert_array_equal(linear_probe.scored(val, flip=True), val[:2].mean(0))
    features.main()
    np.testing.assert_array_equal(np.array(load_features("train")), train)
    probe.main()
    assert json.loads((train_dir("probe") / "metrics.json").read_text())["train_images"] == 3 * 6


def test_lp_ft_refuses_a_probe_of_another_model(project):
    features.main()
    probe.main()
    other = TrainedModel.load(checkpoint_path("probe"), device="cpu")
    with pytest.raises(ModelError, match="is for resnet18 .*weights none.*re-run train_probe"):
        training.start_from_probe(
            other.model, "resnet18", "none", other.card.classes, [], checkpoint_path("probe")
        )
    checkpoint_path("probe").unlink()
    with pytest.raises(ModelError, match="run its stage first"):
        training.start_from_probe(
            other.model, "resnet18", project.weights_path, other.card.classes, [], checkpoint_path("probe")
        )


def test_train_and_test_resolutions_reach_the_model(project, monkeypatch):
    """Training batches at train.image_size, validation and evaluation at eval_image_size, the probe at
    features.image_size, all cut from the one cached array decoded by prepare at data.cache_size."""
    from transferlab import models, pooled_features

    seen: list[int] = []
    build = models.build_model

    def recording_build(*args):
        model, head, prep = build(*args)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[-1]))
        return model, head, prep

    monkeypatch.setattr(training, "build_model", recording_build)
    monkeypatch.setattr(pooled_features, "build_model", recording_build)  # the features stage's network
    monkeypatch.setattr(trained_model, "build_model", recording_build)
    assert load_split("train")[0].shape[1:] == (40, 40, 3)
    # tested above the training size (Touvron et al.'s train-test resolution), at most the cached crop (35 px
    # of the 40: above it would upsample)
    project(image_size=24, eval_image_size=35, probe={"C": [1.0]}, features={"image_size": 28})
    training.fit("finetune")
    assert set(seen) == {24, 35}
    assert TrainedModel.load(checkpoint_path("finetune"), device="cpu").card.eval_image_size == 35
    seen.clear()
    evaluate.evaluate("finetune")
    assert set(seen) == {35}
    seen.clear()
    features.main()
    probe.main()
    assert (
        set(seen) == {28}
        and TrainedModel.load(checkpoint_path("probe"), device="cpu").card.eval_image_size == 28
    )


def test_flip_tta_in_evaluate_is_the_mean_of_both_views(project, monkeypatch):
    project(probe={"C": [1.0]})
    features.main()
    probe.main()
    trained = TrainedModel.load(checkpoint_path("probe"), device="cpu")
    images, labels = load_split("test")
    crops = trained.crop(images)  # the evaluation crop; TTA adds its mirror image
    with torch.no_grad():
        plain, mirrored = (
            trained.model(normalize(view, trained.card.preprocessing)) for view in (crops, crops.flip(3))
        )
    assert not torch.allclose(plain, mirrored), (
        "the model must see the difference for the test to mean anything"
    )
    expected = ((plain + mirrored) / 2).softmax(1).numpy()
    np.testing.assert_allclose(trained.probabilities(images, tta="flip"), expected, atol=1e-6)

    # evaluate@probe scores from the frozen test features:
    # the same mean of both views, without a backbone pass
    np.testing.assert_allclose(
        scoring.probe_probabilities(checkpoint_path("probe"), labels, trained.card.classes, "flip"),
        expected,
        atol=1e-5,
    )
    cfg = load_params().evaluate
    metrics = evaluate.evaluate("probe")
    with (evaluation_dir("probe") / "per_class.csv").open() as f:
        recall = {row["class"]: float(row["recall"]) for row in csv.DictReader(f)}
    predictions = expected.argmax(1)
    assert recall == {
        name: pytest.approx((predictions[labels == c] == c).mean(), abs=1e-4)
        for c, name in enumerate(trained.card.classes)
    }
    assert cfg.tta == "flip" and metrics["top1"] == pytest.approx((predictions == labels).mean())


def test_no_validation_images_the_probe_and_cached_feature_training_still_run(project):
    """An empty validation split (train_on_val, or data.val_per_class: 0) is no work, not a crash."""
    project(mode="feature_extract", augment=False, train_on_val=True, init_head="random")
    with pytest.raises(ModelError, match="no frozen features"):
        training.fit("finetune")
    features.main()
    assert training.fit("finetune") == {"val_acc": None, "epoch": 2}


def test_a_head_on_frozen_features_without_a_validation_split(project):
    """data.val_per_class: 0 stores the validation features as an empty array;
    training on train + val still runs."""
    import yaml

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["data"]["val_per_class"] = 0
    params["probe"]["C"] = [1.0]
    params["train"].update(mode="feature_extract", augment=False, train_on_val=True, init_head="random")
    Path("params.yaml").write_text(yaml.safe_dump(params))
    from transferlab.stages import prepare

    prepare.main()
    features.main()
    assert load_features("val").shape[1] == 0
    assert training.fit("finetune") == {"val_acc": None, "epoch": 2}


def test_the_holdout_twin_of_lp_ft_starts_from_the_probe_fitted_on_train_only_and_validates(project):
    """With train + val for the final fits, the holdout twins still validate: the
    probe's twin is the chosen C fitted on the train split, and LP-FT's twin starts
    from exactly it, trains on the train split and logs validation curves."""
    project(probe={"C": [0.01, 1.0]}, init_head="probe", train_on_val=True, epochs=2)
    features.main()
    probe.main()
    summary = json.loads((train_dir("probe") / "metrics.json").read_text())
    train_only = linear_probe.fit_head(
        *linear_probe.as_samples(load_features("train"), load_split("train")[1], flip=True),
        3,
        summary["best/C"],
        1000,
    )
    twin = TrainedModel.load(checkpoint_path(holdout("probe")), device="cpu")
    np.testing.assert_allclose(twin.model.fc.weight.detach().numpy(), train_only.weight, rtol=1e-5, atol=1e-6)
    final = TrainedModel.load(checkpoint_path("probe"), device="cpu")
    assert not torch.allclose(final.model.fc.weight, twin.model.fc.weight), (
        "the final probe is refitted on train + val"
    )

    params = load_params()
    start, _, _ = training.initial_model(
        params.model.arch,
        project.weights_path,
        load_classes(),
        params.train_config("finetune", holdout=True),
        [],
        holdout("probe"),
    )
    assert torch.equal(start.fc.weight, twin.model.fc.weight)
    best = training.fit("finetune", holdout=True)
    assert best["val_acc"] is not None and best["epoch"] in (1, 2)
    assert (
        json.loads((train_dir(holdout("finetune")) / "metrics.json").read_text())["best/val_acc"]
        == best["val_acc"]
    )
    assert (train_dir(holdout("finetune")) / "plots" / "metrics" / "val" / "acc.tsv").is_file()
    kept = torch.load(checkpoint_path(holdout("finetune")), weights_only=True)
    assert kept["run"] == holdout("finetune") and kept["config"]["train_on_val"] is False
    assert not checkpoint_path("finetune").exists(), "the twin writes under its own name only"


def test_features_from_several_layers_reach_the_probe_and_lp_ft_starts_from_its_predictions(project):
    """features.layers: the pooled outputs of those blocks beside the head's features (shape), the probe's
    standardisation fitted on its training images only, and LP-FT's network reading the same layers with
    the probe as its head: the probe's predictions before the first step."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    project(probe={"C": [1.0], "flip": True}, features={"layers": ["layer2", "layer3"]})
    features.main()
    train, val = np.array(load_features("train")), np.array(load_features("val"))
    assert train.shape == (2, 3 * 4, 128 + 256 + 512) and val.shape == (2, 3 * 2, 128 + 256 + 512)
    probe.main()
    fitted = TrainedModel.load(checkpoint_path(holdout("probe")), device="cpu")
    assert fitted.model.layers == ["layer2", "layer3"] and fitted.model.head.in_features == 896

    # the holdout probe (fitted on the train split only) is the regression on train-standardised features
    samples, labels = linear_probe.as_samples(train, load_split("train")[1], flip=True)
    scaler = StandardScaler().fit(samples)
    reference = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(samples), labels)
    expected = reference.predict_proba(scaler.transform(linear_probe.scored(val, flip=True)))
    images, _ = load_split("val")
    got = predict_logits(fitted.model, images, EvalInput(fitted.card.preprocessing, 32, False), 16, flip=True)
    got = got.softmax(1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)

    params = load_params()
    cfg = dataclasses.replace(params.train_config("finetune", holdout=True), init_head="probe")
    start, head, prep = training.initial_model(
        params.model.arch, project.weights_path, load_classes(), cfg, ["layer2", "layer3"], holdout("probe")
    )
    assert head == "head" and torch.equal(
        predict_logits(start, images, EvalInput(prep, 32, False), 16),
        predict_logits(fitted.model, images, EvalInput(prep, 32, False), 16),
    )
    with pytest.raises(
        ModelError, match=r"reads the layers \['layer2', 'layer3'\].*not features.layers \[\]"
    ):
        training.initial_model(
            params.model.arch, project.weights_path, load_classes(), cfg, [], holdout("probe")
        )
    scratch = dataclasses.replace(params.train_config("scratch"), init_head="random")
    assert not hasattr(
        training.initial_model("resnet18", "none", load_classes(), scratch, ["layer2"])[0], "layers"
    )

    project(
        probe={"C": [1.0]},
        features={"layers": ["layer2", "layer3"]},
        init_head="probe",
        train_on_val=True,
        epochs=1,
    )
    training.fit("finetune", holdout=True)
    trained = TrainedModel.load(checkpoint_path(holdout("finetune")), device="cpu")
    assert trained.model.layers == ["layer2", "layer3"] and trained.probabilities(images).shape == (6, 3)
    with pytest.raises(ModelError, match=r"features.layers: 'layer9' is not a block of resnet18"):
        project(features={"layers": ["layer9"]}) or features.main()


def test_an_evaluation_crop_never_upsamples_the_prepared_images(project):
    """The tiny cache is 40 px; resnet18's evaluation crop keeps its centre 0.875: 45 px need 52."""
    project(features={"image_size": 45})
    with pytest.raises(
        ConfigError, match=r"data.cache_size: the prepared images are 40 px, but a 45 px .*52"
    ):
        features.main()
    assert not Path("data/features").exists(), "refused before any work"
