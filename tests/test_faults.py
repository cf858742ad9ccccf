"""Killing a stage at any moment (SIGKILL: no clean-up runs) never leaves a corrupt output, and the re-run
finishes with the results of an uninterrupted run. Two ways to pick the moment: a stage made to kill itself
right after a chosen write (while its outputs are half-written), and kills at moments spread over the
writing of a real ``dvc repro``."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from conftest import run_command
from test_resume import assert_same_results, results, set_train, uninterrupted, wait_for

pytestmark = pytest.mark.slow  # every test here runs dvc or training stages end to end

# Runs ``python -m <module> <args>`` with <owner>.<function> replaced by one that calls the original and then
# SIGKILLs the process, on the first call with an argument whose text contains <match>.
DIES_AFTER = """
import importlib, os, runpy, signal, sys
module, target, match, *args = sys.argv[1:]
owner_name, name = target.rsplit(".", 1)
owner = importlib.import_module(owner_name)
original = getattr(owner, name)

def dies_after(*call_args, **kwargs):
    result = original(*call_args, **kwargs)
    if any(match in str(arg) for arg in (*call_args, *kwargs.values())):
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, dies_after)
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__")
"""

EVALUATED = ("probe", "finetune", "scratch")
PREPARED_FILES = {"classes.json", "train.npy", "train.csv", "val.npy", "val.csv", "test.npy", "test.csv"}
EVALUATION_FILES = {
    "metrics.json",
    "per_class.csv",
    "confused_pairs.csv",
    "confusion_matrix.png",
    "calibration.png",
    "misclassified.jpg",
}


def die_after(repo: Path, module: str, target: str, match: str, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", DIES_AFTER, module, target, match, *args],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode == -signal.SIGKILL, (
        f"the stage should have been killed:\n{result.stderr[-2000:]}"
    )


def snapshot(folder: Path) -> dict[str, object]:
    """A folder's files, comparable across runs: bytes, JSON without wall times, pictures decoded."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = str(path.relative_to(folder))
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            files[key] = (
                {k: v for k, v in data.items() if k != "wall_time_s"} if isinstance(data, dict) else data
            )
        elif path.suffix in (".png", ".jpg"):
            with Image.open(path) as picture:
                files[key] = (picture.size, picture.mode, len(picture.tobytes()))  # decodes the whole file
        else:
            files[key] = path.read_bytes()
    return files


def assert_whole_or_absent(folder: Path, expected: dict, names: set[str]) -> bool:
    """An output folder is either absent or complete and the same as the uninterrupted run's;
    True if present."""
    if not folder.exists():
        return False
    got = snapshot(folder)
    assert names <= set(got), f"{folder} is incomplete: {sorted(names - set(got))} missing"
    assert got == expected, f"{folder} differs from the uninterrupted run's"
    return True


@pytest.fixture(scope="module")
def reference(reproduced_once) -> dict:
    """The outputs of the uninterrupted ``dvc repro`` of the shared tiny project."""
    found = {"prepared": snapshot(reproduced_once / "data/prepared")}
    found.update({run_: snapshot(reproduced_once / f"metrics/test_{run_}") for run_ in EVALUATED})
    return found


@pytest.fixture
def finished(reproduced, reference) -> tuple[Path, dict]:
    """A copy of that project for one test to break, and the outputs it had."""
    return reproduced, reference


def assert_pipeline_matches(repo: Path, reference: dict) -> None:
    """After the re-run of the killed stage, the rest of the pipeline (dvc repro)
    and the outputs are as before."""
    run_command(["dvc", "repro"], repo)
    assert snapshot(repo / "data/prepared") == reference["prepared"]
    for run_ in EVALUATED:
        assert snapshot(repo / f"metrics/test_{run_}") == reference[run_]
    assert "up to date" in run_command(["dvc", "status", "dvc.yaml"], repo).stdout
    assert not list(repo.rglob("*.partial")), "the re-run clears the staging folders"


def staging_folders(repo: Path) -> list[Path]:
    return [*repo.glob("data/*.partial"), *repo.glob("metrics/*.partial")]


def writing(repo: Path) -> bool:
    """Whether a staging folder holds files: an output folder is half-written."""
    for folder in staging_folders(repo):
        with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
            if any(folder.iterdir()):
                return True
    return False


@pytest.mark.parametrize(
    ("target", "match", "staged"),
    [
        ("numpy.save", "train.npy", {"train.npy"}),
        ("transferlab.fileio.write_csv", "val.csv", {"train.npy", "train.csv", "val.npy", "val.csv"}),
        (
            "transferlab.fileio.write_json",
            "classes.json",
            PREPARED_FILES,
        ),  # all written, not yet renamed into place
    ],
)
def test_prepare_killed_while_writing_its_outputs(finished, target, match, staged):
    repo, reference = finished
    shutil.rmtree(repo / "data/prepared")  # as dvc repro does before it runs the stage
    die_after(repo, "transferlab.stages.prepare", target, match)
    assert not (repo / "data/prepared").exists(), "no half-written data/prepared"
    assert {p.name for p in (repo / "data/prepared.partial").iterdir()} == staged
    run_command(
        ["dvc", "repro", "-f", "-s", "prepare"], repo
    )  # -f: else DVC restores the missing output from its cache
    assert_pipeline_matches(repo, reference)


def test_one_models_evaluation_killed_while_writing_leaves_the_others_alone(finished):
    """evaluate@finetune killed after its last picture, before its folder is renamed into place."""
    repo, reference = finished
    shutil.rmtree(repo / "metrics/test_finetune")
    die_after(
        repo,
        "transferlab.stages.evaluate",
        "transferlab.analysis.plot_misclassified",
        "test_finetune.partial",
        "finetune",
    )
    assert not (repo / "metrics/test_finetune").exists(), "nothing half-written in place"
    for run_ in ("probe", "scratch"):
        assert assert_whole_or_absent(repo / f"metrics/test_{run_}", reference[run_], EVALUATION_FILES), (
            "the other models' results stay"
        )
    assert "evaluate@finetune" in run_command(["dvc", "status"], repo).stdout
    assert_pipeline_matches(repo, reference)


def stage_process(dvc: subprocess.Popen, module: str) -> psutil.Process | None:
    for process in psutil.Process(dvc.pid).children(recursive=True):
        try:
            if process.cmdline()[1:3] == ["-m", module]:
                return process
        except psutil.Error:
            pass
    return None


def start_evaluate(repo: Path) -> tuple[subprocess.Popen, float]:
    """``dvc repro -f -s evaluate@finetune`` started in the background, once the evaluate process has
    written the first file into its output folder (in the staging folder); and the time that happened."""
    for stale in staging_folders(
        repo
    ):  # a kill's leftovers, which the stage clears itself: not the sign looked for
        shutil.rmtree(stale)
    dvc = subprocess.Popen(
        ["dvc", "repro", "-f", "-s", "evaluate@finetune"],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: writing(repo) or dvc.poll() is not None, "evaluate's first file")
    return dvc, time.monotonic()


def test_evaluate_killed_at_moments_spread_over_its_writes(finished):
    repo, reference = finished
    shutil.rmtree(repo / "metrics/test_finetune")
    dvc, writing_since = start_evaluate(repo)  # uninterrupted: from its output folder begun to it in place
    wait_for(lambda: (repo / "metrics/test_finetune").exists(), "evaluate's output folder in place")
    window = time.monotonic() - writing_since
    assert dvc.wait(timeout=300) == 0
    fractions, landed = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95), 0
    for fraction in fractions:
        dvc, _ = start_evaluate(repo)
        time.sleep(window * fraction)
        process = stage_process(dvc, "transferlab.stages.evaluate")
        if process is not None:
            process.send_signal(signal.SIGKILL)
        dvc.wait(timeout=300)
        landed += writing(repo)  # killed with an output folder half-written
        for run_ in EVALUATED:
            assert_whole_or_absent(repo / f"metrics/test_{run_}", reference[run_], EVALUATION_FILES)
    assert landed > len(fractions) // 2, (
        f"only {landed} of {len(fractions)} kills landed while an output folder was being written"
    )
    run_command(["dvc", "repro", "-f", "-s", "evaluate@finetune"], repo)
    assert_pipeline_matches(repo, reference)


def test_training_killed_while_writing_its_checkpoint(project_repo, monkeypatch):
    set_train(project_repo, epochs=3)
    run_command(["dvc", "repro", "prepare"], project_repo)
    # killed once the checkpoint's bytes are in their temporary file, before it is renamed into place
    die_after(project_repo, "transferlab.stages.train", "os.chmod", "data/models/finetune", "finetune")
    assert not (project_repo / "data/models/finetune/model.pt").exists(), "no half-written checkpoint"
    assert not (project_repo / "metrics/train_finetune").exists(), "no training log of an unfinished run"
    assert (project_repo / "data/resume/finetune.pt").exists(), "the run's state, saved after its last epoch"
    again = run_command([sys.executable, "-m", "transferlab.stages.train", "finetune"], project_repo)
    assert "resuming finetune from epoch 4" in again.stderr, (
        "every epoch was done: only the checkpoint is written again"
    )
    assert [p.name for p in (project_repo / "data/models/finetune").iterdir()] == ["model.pt"], (
        "the killed write's temporary file is gone"
    )
    assert_same_results(results(project_repo), uninterrupted(project_repo, monkeypatch))
