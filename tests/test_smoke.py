"""``transferlab smoke``: the preset is valid, and it runs the whole pipeline as a DVC experiment."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from conftest import PROJECT, run_command
from transferlab import smoke
from transferlab.config import parse_params
from transferlab.errors import ConfigError


def test_the_preset_is_valid_with_the_project_params_and_given_as_dvc_set_params(tmp_path):
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    values = smoke.settings(str(tmp_path))
    params = parse_params(smoke.applied(raw, values))
    assert (params.data.train_per_class, params.train.epochs, params.data.source) == (6, 1, str(tmp_path))
    assert raw["train"]["epochs"] != 1, "applied() leaves the params it was given alone"
    cmd = smoke.command(values, "smoke-x")
    assert cmd[:6] == ["dvc", "exp", "run", "--temp", "--name", "smoke-x"]
    pairs = dict(arg.split("=", 1) for arg in cmd[7::2])
    assert set(cmd[6::2]) == {"-S"} and pairs["train.compile"] == "false" and pairs["data.cache_size"] == "96"


def test_a_source_that_is_not_there_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="--source .*nowhere: no such folder or archive"):
        smoke.settings(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_the_smoke_run_goes_through_every_stage_and_leaves_the_workspace_alone(project_repo, tiny_folder):
    params_before = (project_repo / "params.yaml").read_text()
    command = [sys.executable, "-m", "transferlab.cli", "smoke", "--source", str(tiny_folder)]
    result = run_command(command, project_repo)
    assert "the whole pipeline ran in" in result.stdout
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
