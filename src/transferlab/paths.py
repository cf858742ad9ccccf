"""Where the stages read and write, in one place (relative to the project root, where dvc.yaml is)."""

from __future__ import annotations

from pathlib import Path

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
FEATURES_DIR = Path("data/features")  # the features stage: frozen features of every split, and the network
MODELS_DIR = Path("data/models")
RESUME_DIR = Path("data/resume")  # not a DVC output: DVC deletes outputs before it re-runs a stage
PREPARE_REPORT = Path("metrics/prepare.json")
FEATURES_REPORT = Path("metrics/features.json")
COMPARISON_MD = Path("metrics/comparison.md")
COMPARISON_JSON = Path("metrics/comparison.json")
CURVES_PNG = Path("plots/learning_curves.png")
GAIN_PNG = Path("plots/per_class_gain.png")
GRADCAM_IMAGE = Path("plots/gradcam.jpg")
REPORT_HTML = Path("metrics/report.html")
EFFICIENCY = "efficiency"  # the data-efficiency curve's folder in data/models/ and metrics/
EFFICIENCY_MD = Path("metrics/efficiency.md")
EFFICIENCY_JSON = Path("metrics/efficiency.json")
EFFICIENCY_HTML = Path("metrics/efficiency.html")
EFFICIENCY_PNG = Path("plots/efficiency.png")


def holdout(run: str) -> str:
    """The name of the run's holdout twin: the same recipe trained on the train split only, validated every
    epoch.

    The training stages make the final fit (on train + val); the holdout stages show how the same settings do
    on images they never trained on: the held-out learning curves, and the validation score settings are
    chosen on.
    """
    return f"{run}_holdout"


def checkpoint_path(run: str) -> Path:
    """The trained model (best epoch) with everything needed to use it."""
    return MODELS_DIR / run / "model.pt"


def resume_path(run: str) -> Path:
    """The latest training state of an unfinished run; removed when the run completes."""
    return RESUME_DIR / f"{run}.pt"


def train_dir(run: str) -> Path:
    """dvclive folder of a training stage: per-epoch curves, settings, summary."""
    return _results_dir("train", run)


def evaluation_dir(run: str) -> Path:
    """Test-split results of one model: metrics.json, per_class.csv, confusion matrix."""
    return _results_dir("test", run)


def _results_dir(kind: str, run: str) -> Path:
    """``metrics/<kind>_<run>``; a run named in a folder (``efficiency/probe_n5_d0``) has its results there
    (``metrics/efficiency/test_probe_n5_d0``)."""
    folder, _, name = run.rpartition("/")
    return Path("metrics") / folder / f"{kind}_{name}"
