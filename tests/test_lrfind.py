"""The learning-rate range test: its suggestion rule on synthetic curves, and a real test on tiny data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from transferlab.paths import RESUME_DIR, checkpoint_path
from transferlab.tools import lrfind
from transferlab.tools.cli import main as cli_main

LRS = np.logspace(-5, 0, 100)


def valley(noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """A loss that falls from 4.6 to about 1.6 between lr 1e-4 and 3e-2, bottoms out near 0.1,
    then explodes."""
    x = np.log10(LRS)
    loss = 4.6 - 3 / (1 + np.exp(-3 * (x + 2.5))) + 40 * np.clip(x + 1, 0, None) ** 2
    return loss + np.random.default_rng(seed).normal(0, noise, len(x))


def test_a_clean_valley_suggests_its_middle():
    """The valley of `valley()`: within 10 % of the fall (3.0) above the minimum
    (1.6), from where the descent is 90 % done (log10 lr = -2.5 + ln(9)/3 = -1.77)
    to where the rise reaches 0.3 (log10 lr = -1 + sqrt(0.3/40) = -0.91)."""
    suggestion = lrfind.suggest(LRS, valley())
    low, high = 10 ** (-2.5 + np.log(9) / 3), 10 ** (-1 + np.sqrt(0.3 / 40))
    assert suggestion.valley == pytest.approx(
        (low, high), rel=0.25
    )  # the smoothing rounds the sharp rise off a little
    assert suggestion.lr == pytest.approx(np.sqrt(low * high), rel=0.15)


def test_an_early_spike_and_noise_do_not_move_the_suggestion():
    clean = lrfind.suggest(LRS, valley()).lr
    spiky = valley(noise=0.05)
    spiky[3] = 40.0  # one bad batch early on: neither a divergence nor a minimum
    assert lrfind.diverged_at(spiky) > 80
    assert lrfind.suggest(LRS, spiky).lr == pytest.approx(clean, rel=0.25)
    # reruns (other noise) agree within a factor of about 1.5
    reruns = [lrfind.suggest(LRS, valley(noise=0.05, seed=s)).lr for s in range(5)]
    assert max(reruns) / min(reruns) < 1.5


def test_a_flat_curve_gives_no_suggestion():
    flat = 4.6 + np.random.default_rng(0).normal(0, 0.05, len(LRS))
    suggestion = lrfind.suggest(LRS, flat)
    assert suggestion.lr is None and "no clear valley" in suggestion.reason and "--steps" in suggestion.reason


def test_divergence_is_non_finite_or_lasting():
    losses = np.array([3.0, 2.0, 1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 5.0, 9.0])
    assert lrfind.diverged_at(losses) == 6
    assert lrfind.diverged_at(np.array([3.0, 2.0, np.nan, 1.0])) == 2
    assert lrfind.diverged_at(np.array([3.0, 2.0, 1.0])) is None
    early = lrfind.suggest(LRS[:4], np.array([3.0, np.inf, 1.0, 1.0]))
    assert early.lr is None and "--start" in early.reason


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["finetune", "feature_extract", "scratch"])
def test_range_test_raises_the_lr_as_set_and_keeps_nothing(project, tmp_path, mode):
    if mode == "feature_extract":
        project(mode="feature_extract", augment=False, probe={"train_on_val": False})
        from transferlab.stages import features

        features.main()
    else:
        project(mode="finetune", backbone_lr_scale=0.1)
    run = "scratch" if mode == "scratch" else "finetune"
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    cli_main_status(
        ["lr-find", run, "--steps", "12", "--start", "1e-4", "--end", "10", "--seeds", "2", "--out", "lr"]
    )
    result = json.loads((tmp_path / "lr" / f"{run}.json").read_text())
    assert (tmp_path / "lr" / f"{run}.png").stat().st_size > 0
    assert [t["seed"] for t in result["tests"]] == [0, 1]
    for test in result["tests"]:
        steps = len(test["lr"])
        assert steps == len(test["loss"]) and 5 <= steps <= 12
        np.testing.assert_allclose(test["lr"], lrfind.lr_factors(12, 1e-4, 10)[:steps], rtol=1e-6)
    assert result["command"].startswith(f"transferlab lr-find {run} --steps 12")
    # the model and optimizer were thrown away: no checkpoint, no resume state, no file changed
    assert not checkpoint_path(run).exists() and not RESUME_DIR.exists()
    after = {
        p: digest(p)
        for p in tmp_path.rglob("*")
        if p.is_file() and "lr" not in p.relative_to(tmp_path).parts[:1]
    }
    assert after == before


def test_the_backbone_keeps_its_share_of_the_swept_lr(project, monkeypatch):
    project(mode="finetune", backbone_lr_scale=0.1)
    seen = []
    original = lrfind.range_test

    def spy(*args):
        from transferlab import training

        step = training.Trainer.step

        def recording(self, inputs, indices):
            seen.append({g["name"]: g["lr"] for g in self.optimizer.param_groups})
            return step(self, inputs, indices)

        monkeypatch.setattr(training.Trainer, "step", recording)
        return original(*args)

    monkeypatch.setattr(lrfind, "range_test", spy)
    lrfind.find("finetune", 4, 1e-3, 1e-1, 1, Path("lr"), "test")
    assert [s["head"] for s in seen] == pytest.approx(list(lrfind.lr_factors(4, 1e-3, 1e-1)))
    assert all(s["backbone"] == pytest.approx(0.1 * s["head"]) for s in seen)
    assert Path("lr/finetune.json").is_file()


def cli_main_status(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0


def test_a_range_that_does_not_rise_is_refused(project, capsys):
    project()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["lr-find", "finetune", "--start", "1", "--end", "0.1"])
    assert exit_info.value.code == 2
    assert "0 < start < end" in capsys.readouterr().err
