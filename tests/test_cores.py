"""The thread count a run computes with: set by ``runtime.threads``, fixed before its first step, the same
whatever computes beside it (``dvc queue start -j 2`` and DDP on a CPU split the cores when they start)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from threadpoolctl import threadpool_info

from conftest import make_image_folder, run_command, tiny_params
from transferlab import cores


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    cores.use(threads)


def test_the_count_is_the_param_or_this_machines_cores_split_between_queue_workers(monkeypatch):
    monkeypatch.setattr(cores, "available_cores", lambda: 4)
    monkeypatch.setattr(cores, "queue_workers", lambda: 0)
    assert cores.resolve(3) == 3 and cores.resolve(1, processes=2) == 1, "a number is taken as it is"
    assert cores.resolve(0) == 4, "alone: every core"
    assert cores.resolve(0, processes=2) == 2, "a data-parallel run: a share per process"
    monkeypatch.setattr(cores, "queue_workers", lambda: 2)
    assert cores.resolve(0) == 2 and cores.resolve(0, processes=2) == 1
    monkeypatch.setattr(cores, "queue_workers", lambda: 8)
    assert cores.resolve(0) == 1, "never fewer than one"


def test_use_fixes_torch_and_the_blas_pools_that_scikit_learn_computes_in(restore_threads):
    import sklearn.linear_model  # noqa: F401  (loads the BLAS and OpenMP libraries threadpoolctl limits)

    assert cores.use(1) == 1 and cores.threads() == 1 and torch.get_num_threads() == 1
    assert {pool["num_threads"] for pool in threadpool_info()} == {1}
    assert cores.use(2) == 2 and torch.get_num_threads() == 2


def test_dvc_queue_workers_are_counted_from_the_process_table():
    before = cores.queue_workers()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "print(flush=True); import time; time.sleep(30)",
            "exp",
            "queue-worker",
            "x@localhost",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        worker.stdout.readline()  # started: its command line is the one given
        assert cores.queue_workers() == before + 1
    finally:
        worker.kill()
        worker.wait()


def finished_run(project: Path) -> dict:
    """What a fine-tuning run leaves, as bytes: its weights file, its curves, its summary less the time."""
    folder = project / "metrics/train_finetune"
    summary = json.loads((folder / "metrics.json").read_text())
    return {
        "model.pt": (project / "data/models/finetune/model.pt").read_bytes(),
        "curves": {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*.tsv"))},
        "summary": {key: value for key, value in summary.items() if key != "wall_time_s"},
    }


@pytest.mark.slow
def test_a_run_beside_another_training_computes_the_same_bytes_as_alone(project, tmp_path):
    """Item 1, 4 and 5 of "same params, same numbers": the same tiny training alone, then with another
    transferlab training computing beside it for its whole length: byte-identical model.pt and curves."""
    project(epochs=3, batch_size=4)
    train = [sys.executable, "-m", "transferlab.stages.train"]
    run_command([*train, "finetune"], tmp_path)
    alone = finished_run(tmp_path)

    neighbour = shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-neighbour")
    params = yaml.safe_load((neighbour / "params.yaml").read_text())
    params["scratch"].update(epochs=500)  # still computing when the run below ends
    (neighbour / "params.yaml").write_text(yaml.safe_dump(params))
    other = subprocess.Popen(
        [*train, "scratch"], cwd=neighbour, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (neighbour / "data/resume/scratch.pt").exists():  # its first epoch is done
            assert other.poll() is None and time.monotonic() < deadline, "the neighbour did not start"
            time.sleep(0.05)
        run_command([*train, "finetune"], tmp_path)
        assert other.poll() is None, "the neighbour computed for the whole run"
    finally:
        other.kill()
        other.wait()
    beside = finished_run(tmp_path)
    assert beside["curves"] == alone["curves"]
    assert beside["summary"] == alone["summary"] and alone["summary"]["threads"] == cores.resolve(0)
    assert beside["model.pt"] == alone["model.pt"], "the same run writes the same bytes"


@pytest.mark.slow
def test_features_and_evaluation_give_the_same_bytes_with_one_thread_or_two(tmp_path):
    """docs/reproducibility.md's table, on tiny data: the features stage (the test split on ONNX Runtime,
    the others eager) and evaluate do not depend on the thread count; the probe's fit and training do and
    are not asserted here."""
    images = make_image_folder(tmp_path / "images", classes=3, per_class=50)  # 132 test images, 264 views
    params = tiny_params()
    params["data"]["source"] = str(images)
    params["probe"]["C"] = [1.0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage = [sys.executable, "-m"]
    run_command([*stage, "transferlab.stages.prepare"], tmp_path)
    run_command([*stage, "transferlab.stages.features"], tmp_path)
    run_command([*stage, "transferlab.stages.probe"], tmp_path)
    run_command([*stage, "transferlab.stages.train", "finetune"], tmp_path)
    outputs = {}
    for threads in (1, 2):
        params["runtime"]["threads"] = threads
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        logged = run_command([*stage, "transferlab.stages.features"], tmp_path).stderr
        logged += run_command([*stage, "transferlab.stages.evaluate", "finetune"], tmp_path).stderr
        assert "features test: 132 images on onnxruntime" in logged
        assert "test finetune: 132 images on onnxruntime" in logged
        evaluated = json.loads((tmp_path / "metrics/test_finetune/metrics.json").read_text())
        assert evaluated.pop("threads") == threads
        evaluated.pop("wall_time_s")
        outputs[threads] = {
            **{f.name: f.read_bytes() for f in sorted((tmp_path / "data/features").glob("*.npy"))},
            "network.pt": (tmp_path / "data/features/network.pt").read_bytes(),
            "per_class.csv": (tmp_path / "metrics/test_finetune/per_class.csv").read_bytes(),
            "metrics": evaluated,
        }
    assert outputs[1] == outputs[2]
