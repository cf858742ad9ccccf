"""Weights combined in weight space: WiSE-FT interpolation and the moving average, on tiny generated data."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from transferlab import training
from transferlab.paths import checkpoint_path, holdout, train_dir
from transferlab.splits import load_split
from transferlab.stages import features, probe
from transferlab.trained_model import TrainedModel
from transferlab.weight_space import CURVE_POINTS, interpolate, moving_average

TWIN = holdout("finetune")


def kept_state(run: str) -> dict:
    return torch.load(checkpoint_path(run), weights_only=True)["model"]


def val_logits(run: str) -> torch.Tensor:
    trained = TrainedModel.load(checkpoint_path(run), device="cpu")
    return torch.from_numpy(trained.probabilities(load_split("val")[0], 16))


def curve(run: str) -> dict[float, float]:
    with (train_dir(run) / "interpolation.csv").open() as f:
        return {float(row["interpolation"]): float(row["val_acc"]) for row in csv.DictReader(f)}


def test_interpolation_at_0_is_the_start_at_1_the_end_and_between_the_mix(project):
    """LP-FT's holdout twin: at 0 the kept weights are exactly the probe it started from,
    at 1 the fine-tuned ones."""
    project(probe={"C": [1.0]}, init_head="probe", train_on_val=True, epochs=1)
    features.main()
    probe.main()
    runs = {}
    for weight in (1.0, 0.0, 0.3):
        project(probe={"C": [1.0]}, init_head="probe", train_on_val=True, epochs=1, interpolation=weight)
        best = training.fit("finetune", holdout=True)
        runs[weight] = {
            "state": kept_state(TWIN),
            "best": best,
            "curve": curve(TWIN),
            "logits": val_logits(TWIN),
        }
    start, end = kept_state(holdout("probe")), runs[1.0]["state"]  # one epoch: the best is the last
    assert all(torch.equal(runs[0.0]["state"][key], value) for key, value in start.items()), (
        "0: exactly the probe"
    )
    assert torch.equal(runs[0.0]["logits"], val_logits(holdout("probe"))), "0: the probe's predictions"
    assert not torch.equal(end["fc.weight"], start["fc.weight"]) and not torch.equal(
        end["layer1.0.conv1.weight"], start["layer1.0.conv1.weight"]
    )
    for key in ("fc.weight", "layer1.0.conv1.weight"):
        torch.testing.assert_close(runs[0.3]["state"][key], start[key] + 0.3 * (end[key] - start[key]))
    # one curve, the same whichever weight is kept, drawn at every point and the kept one;
    # its ends are the runs' scores
    assert set(runs[1.0]["curve"]) == set(CURVE_POINTS) and set(runs[0.3]["curve"]) == {*CURVE_POINTS, 0.3}
    assert runs[0.0]["curve"] == runs[1.0]["curve"]
    assert runs[1.0]["curve"][1.0] == runs[1.0]["best"]["val_acc"]
    assert runs[0.3]["best"] == {"val_acc": runs[0.3]["curve"][0.3], "epoch": 1}
    val_labels = load_split("val")[1]
    assert runs[0.0]["curve"][0.0] == pytest.approx(
        (runs[0.0]["logits"].argmax(1).numpy() == val_labels).mean()
    )


def test_the_line_ends_at_the_last_epoch_which_a_final_fit_keeps(project):
    project(probe={"C": [1.0]}, init_head="probe", train_on_val=True, epochs=4, lr=0.003)
    features.main()
    probe.main()
    training.fit("finetune", holdout=True)
    accs = [
        float(r.split("\t")[1])
        for r in (train_dir(TWIN) / "plots" / "metrics" / "val" / "acc.tsv").read_text().splitlines()[1:]
    ]
    assert accs.index(max(accs)) != len(accs) - 1, "a run whose best epoch is not its last"
    assert curve(TWIN)[1.0] == accs[-1]


def test_interpolation_is_exact_at_both_ends():
    start, end = (
        {"w": torch.randn(50), "n": torch.tensor(3)},
        {"w": torch.randn(50) * 1e6, "n": torch.tensor(7)},
    )
    assert torch.equal(interpolate(start, end, 0.0)["w"], start["w"]) and torch.equal(
        interpolate(start, end, 1.0)["w"], end["w"]
    )
    assert interpolate(start, end, 0.5)["n"] == 7, "counters are not mixed"


def test_the_moving_average_is_the_exponential_average_of_the_weights_it_saw():
    decay, layer = 0.75, nn.Linear(3, 2)
    seen = []
    average = moving_average(layer, decay)
    for step in range(4):
        with torch.no_grad():
            layer.weight.copy_(torch.full_like(layer.weight, float(step + 1) ** 2))
        seen.append(layer.weight.detach().clone())
        average.update_parameters(layer)
    expected = seen[0]  # the first update copies
    for weights in seen[1:]:
        expected = decay * expected + (1 - decay) * weights
    torch.testing.assert_close(average.module.weight, expected)
    assert expected[0, 0].item() == pytest.approx(
        ((0.75 * 1 + 0.25 * 4) * 0.75 + 0.25 * 9) * 0.75 + 0.25 * 16
    )


def test_the_moving_average_copies_integer_buffers():
    """Index tables and step counters are integers:
    an average would truncate them (torch's EMA function does)."""
    layer = nn.Linear(2, 2)
    layer.register_buffer("index", torch.arange(20000))
    average = moving_average(layer, 0.9999)
    for step in range(6):
        layer.index.add_(step)
        average.update_parameters(layer)
    assert torch.equal(average.module.index, layer.index)


def test_the_moving_average_is_what_training_validates_and_keeps(project):
    """A decay near 1 keeps nearly the starting weights;
    near 0 nearly the last ones (the run without an average)."""
    project(epochs=2)
    without = training.fit("finetune")
    last = kept_state("finetune")
    project(epochs=2, ema_decay=1e-9)
    assert training.fit("finetune") == without
    torch.testing.assert_close(kept_state("finetune")["fc.weight"], last["fc.weight"])
    project(epochs=2, ema_decay=0.999999)
    best = training.fit("finetune")
    images, labels = load_split("val")
    kept = TrainedModel.load(checkpoint_path("finetune"), device="cpu")
    assert best["val_acc"] == pytest.approx((kept.probabilities(images, 16).argmax(1) == labels).mean()), (
        "the average is validated"
    )
    torch.testing.assert_close(
        kept_state("finetune")["layer1.0.conv1.weight"],
        project.weights["layer1.0.conv1.weight"],
        rtol=1e-4,
        atol=1e-5,
    )
    assert not torch.allclose(
        last["layer1.0.conv1.weight"], project.weights["layer1.0.conv1.weight"], rtol=1e-4, atol=1e-5
    )
