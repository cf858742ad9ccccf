from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRANSFERLAB_SHARED", PROJECT.parent / "shared")).resolve()
CALTECH = SHARED / "datasets" / "caltech-101" / "101_ObjectCategories"
HF_HOME = SHARED / "hf"
# Tests never reach a model hub. huggingface_hub reads these when first imported, so set them first.
os.environ["HF_HUB_OFFLINE"] = "1"
if HF_HOME.is_dir():
    os.environ["HF_HOME"] = str(HF_HOME)

sys.path.insert(0, str(Path(__file__).parent))
from imagegen import make_image_folder  # noqa: E402
from transferlab.config import TrainConfig, parse_params  # noqa: E402
from transferlab.stages import prepare  # noqa: E402

# Small enough to train in seconds on 2 CPU cores. A training run here needs no probe and validates every
# epoch; test_pipeline puts the project's defaults back (LP-FT from the probe, train + val).
TINY_PARAMS = {
    "data": {
        "train_per_class": 6,
        "val_per_class": 2,
        "cache_size": 40,
        "exclude_classes": ["BACKGROUND_Google"],
    },
    "model": {"arch": "resnet18", "weights": "none"},
    "features": {"image_size": 32, "batch_size": 16, "layers": []},
    "train": {
        "epochs": 2,
        "batch_size": 8,
        "image_size": 32,
        "eval_image_size": 32,
        "init_head": "random",
        "train_on_val": False,
        "compile": False,
        "frozen_layers": 0,
    },
    "scratch": {"epochs": 2, "batch_size": 8, "image_size": 32, "eval_image_size": 32, "train_on_val": False},
    "efficiency": {"sizes": [1, 3], "scratch_sizes": [2], "draws": [0, 1]},
}


def tiny_params() -> dict:
    """params.yaml of the project with the TINY_PARAMS values put in."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params.setdefault(section, {}).update(values)
    return params


def recipe(**changes) -> TrainConfig:
    """The tiny params' ``train:`` recipe with ``changes``:
    a complete TrainConfig (the code has no defaults)."""
    return dataclasses.replace(parse_params(tiny_params()).train, **changes)


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.delenv("TRANSFERLAB_DATA", raising=False)


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images", classes=3, per_class=12)


def run_command(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def make_project_repo(repo: Path, images: Path) -> Path:
    """A fresh git + DVC repo at ``repo`` holding the project's pipeline, src and tiny params,
    first commit made."""
    repo.mkdir()
    shutil.copytree(PROJECT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", "efficiency/dvc.yaml"):
        (repo / name).parent.mkdir(exist_ok=True)
        shutil.copy(PROJECT / name, repo / name)
    params = tiny_params()
    params["data"]["source"] = str(images)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_command(["git", "init", "-q"], repo)
    run_command(["git", "config", "user.email", "test@example.com"], repo)
    run_command(["git", "config", "user.name", "test"], repo)
    run_command(["dvc", "init", "-q"], repo)
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", "init"], repo)
    return repo


@pytest.fixture
def project_repo(tmp_path, tiny_folder) -> Path:
    return make_project_repo(tmp_path / "repo", tiny_folder)


@pytest.fixture(scope="session")
def reproduced_once(tmp_path_factory) -> Path:
    """The tiny project after one ``dvc repro`` of the whole pipeline, committed: shared, never changed.
    Tests that change it take a copy (:func:`reproduced`)."""
    root = tmp_path_factory.mktemp("reproduced")
    repo = make_project_repo(root / "repo", make_image_folder(root / "images", classes=3, per_class=12))
    run_command(["dvc", "repro"], repo)
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", "baseline"], repo)
    return repo


@pytest.fixture
def reproduced(reproduced_once, tmp_path) -> Path:
    """A copy of the reproduced tiny project, for one test to change."""
    return shutil.copytree(reproduced_once, tmp_path / "repo", symlinks=True)


@pytest.fixture
def project(tmp_path, tiny_folder, monkeypatch):
    """A prepared tiny project whose model.weights is a (random)
    resnet18 state dict standing in for ImageNet's."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    weights = tmp_path / "resnet18_imagenet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    params = tiny_params()
    params["data"]["source"] = str(tiny_folder)
    params["model"]["weights"] = str(weights)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main()

    def configure(
        probe: dict | None = None, features: dict | None = None, runtime: dict | None = None, **train_values
    ):
        """Set train: keys (and probe:, features: and runtime: keys) in params.yaml."""
        params["train"].update(train_values)
        for section, values in (("probe", probe), ("features", features), ("runtime", runtime)):
            params[section].update(values or {})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    configure.weights = torch.load(weights, weights_only=True)
    configure.weights_path = str(weights)
    return configure
