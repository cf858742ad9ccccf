"""The benchmark's smoke runs on tiny data: every figure
is measured and reported (values are never judged)."""

from __future__ import annotations

import json
import os

import pytest

from transferlab.tools import benchmark

GRID_ENV = "TRANSFERLAB_GRID_TEST"


def not_positive(results: dict, keys: list[str]) -> list[str]:
    """The keys whose value is missing or not a number > 0."""
    return [key for key in keys if not isinstance(results.get(key), (int, float)) or not results[key] > 0]


@pytest.mark.slow
def test_throughput_smoke_run_reports_every_figure(project, tiny_folder, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    sizes = ["--image-size", "32", "--eval-image-size", "32", "--batch-size", "4", "--eval-batch-size", "8"]
    steps = ["--max-steps", "2", "--compute-steps", "2", "--compile-steps", "2", "--infer-images", "16"]
    jpeg = ["--jpeg-folder", str(tiny_folder), "--workers", "1"]
    benchmark.main(["--arch", "resnet18", *sizes, *steps, *jpeg, "--device", "cpu", "--json", str(out)])

    results = json.loads(out.read_text())
    rates = ["compute_only", "cached_pipeline", "jpeg_dataloader", "train_eager", "train_compiled"]
    rates += ["eval", "features"]
    rates += [f"infer_{path}" for path in ("eager_nchw", "eager_channels_last", "onnxruntime")]
    seconds = ["features_wall", "onnx_export_and_session"]
    seconds += [f"train_{run}_first_steps" for run in ("eager", "compiled")]
    others = ["pipeline_vs_compute", "pipeline_vs_jpeg", "compile_speedup", "threads"]
    others += [f"peak_rss_gib_after_{name}" for name in benchmark.MEASUREMENTS]
    assert not_positive(results, [f"{r}_img_s" for r in rates] + [f"{s}_s" for s in seconds] + others) == []
    for path in ("eager_channels_last", "onnxruntime"):  # they may agree exactly
        assert results[f"infer_{path}_max_abs_diff"] >= 0
    assert results["compile_break_even_images"] is None or results["compile_break_even_images"] >= 0
    table = capsys.readouterr().out
    assert all(f"| {key} |" in table for key in results)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get(GRID_ENV), reason=f"5 minutes of dvc runs on 2 cores: set {GRID_ENV}=1"
)
def test_grid_smoke_run_reports_every_figure(project_repo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project_repo)
    out = tmp_path / "grid.json"
    benchmark.main(["--grid", "--grid-epochs", "1", "--json", str(out)])

    results = json.loads(out.read_text())
    models = ("probe", "finetune", "scratch")
    runs = [f"{run}_exp_{figure}" for run in models for figure in ("wall_s", "training_s")]
    queue = [f"queue_j{j}_{figure}" for j in (1, 2) for figure in ("enqueue_s", "wall_s", "mean_training_s")]
    assert not_positive(results, ["setup_s", *runs, *queue, "queue_j2_over_j1_wall"]) == []
    for run in models:  # dvc's own time: reported, not judged
        assert isinstance(results[f"{run}_exp_overhead_s"], float)
    assert results["queue_j1_points"] == results["queue_j2_points"] == 4
    cores = benchmark.cores.available_cores()  # runtime.threads 0: the cores, split when the workers start
    assert results["queue_j1_threads"] == [cores] and results["queue_j2_threads"] == [max(1, cores // 2)]
    assert results["finetune_exp_stages"].endswith("train_finetune")
    table = capsys.readouterr().out
    assert all(f"| {key} |" in table for key in results)
