"""``transferlab smoke``: the preset is valid, and it runs the whole pipeline as a DVC experiment."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from dvc.utils.hydra import apply_overrides, get_hydra_sweeps

from conftest import PROJECT, run_command
from transferlab.config import parse_params, read_yaml
from transferlab.errors import ConfigError
from transferlab.tools import smoke


def test_the_preset_is_valid_with_the_project_params_and_given_as_dvc_set_params(tmp_path, monkeypatch):
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    odd = tmp_path / "my photos, 2026"  # a comma would make a Hydra sweep unless quoted
    odd.mkdir()
    values = smoke.settings(str(odd), raw)
    params = parse_params(smoke.applied(raw, values))
    assert (params.data.train_per_class, params.train.epochs, params.data.source) == (6, 1, str(odd))
    assert raw["train"]["epochs"] != 1, "applied() leaves the params it was given alone"
    monkeypatch.chdir(tmp_path)  # no data/raw here: nothing to copy along
    command = smoke.command(values, "smoke-x")
    assert command[:6] == ["dvc", "exp", "run", "--temp", "--name", "smoke-x"]
    pairs = dict(arg.split("=", 1) for arg in command[7::2])
    assert (
        set(command[6::2]) == {"-S"}
        and pairs["train.compile"] == "false"
        and pairs["data.cache_size"] == "110"
    )
    (sweep,) = get_hydra_sweeps({"params.yaml": command[7::2]})  # one experiment, not a sweep
    written = tmp_path / "params.yaml"
    written.write_text(yaml.safe_dump(raw))
    apply_overrides(str(written), sweep["params.yaml"])  # as dvc exp run -S writes params.yaml
    assert parse_params(read_yaml(written.read_text())) == params


def test_relative_paths_in_params_are_made_absolute_and_the_download_is_copied_along(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"")
    raw = {"data": {"source": "photos"}, "model": {"weights": "weights.pth"}}
    values = smoke.settings(None, raw)
    assert values["data.source"] == str(tmp_path / "photos") and values["model.weights"] == str(
        tmp_path / "weights.pth"
    )
    assert "data.source" not in smoke.settings(
        None, {"data": {"source": "download"}, "model": {"weights": "imagenet"}}
    )
    (tmp_path / "data/raw").mkdir(parents=True)
    command = smoke.command(values, "smoke-x")
    assert command[6:8] == ["--copy-paths", "data/raw"]


def test_a_source_that_is_not_there_or_no_params_file_is_refused_before_anything_runs(tmp_path):
    raw = {"data": {"source": "download"}, "model": {"weights": "imagenet"}}
    with pytest.raises(ConfigError, match="--source .*nowhere: no such folder or archive"):
        smoke.settings(str(tmp_path / "nowhere"), raw)
    with pytest.raises(ConfigError, match="not found: run from the project root"):
        smoke.launch(params=tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("[]")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        smoke.launch(params=tmp_path / "params.yaml")


@pytest.mark.slow
def test_the_smoke_run_goes_through_every_stage_and_leaves_the_workspace_alone(project_repo, tiny_folder):
    params_before = (project_repo / "params.yaml").read_text()
    command = [sys.executable, "-m", "transferlab.tools.cli", "smoke", "--source", str(tiny_folder)]
    result = run_command(command, project_repo)
    assert "the whole pipeline ran in" in result.stdout
    assert (
        "6 training images (4 to train on, 2 held out for validation; the final fits use all 6)"
        in result.stdout
    )
    assert "`dvc exp apply smoke-" in result.stdout, "says where its models went"
    assert (project_repo / "params.yaml").read_text() == params_before
    assert not (project_repo / "metrics").exists()
    listing = json.loads(run_command(["dvc", "exp", "show", "--json"], project_repo).stdout)
    (experiment,) = [e["revs"][0] for commit in listing for e in commit.get("experiments") or []]
    assert experiment["name"].startswith("smoke-")
    metrics = experiment["data"]["metrics"]
    for model in ("probe", "finetune", "scratch"):
        test = metrics[f"metrics/test_{model}/metrics.json"]["data"]
        assert test["test_images"] == 3 * 4, "4 test images per class"
    assert metrics["metrics/train_finetune/metrics.json"]["data"]["epochs_run"] == 1
    assert metrics["metrics/train_probe/metrics.json"]["data"]["train_images"] == 3 * 6, (
        "the final fit: all 6"
    )
