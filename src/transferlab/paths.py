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
    return Path("metrics") / f"train_{run}"


def evaluation_dir(run: str) -> Path:
    """Test-split results of one model: metrics.json, per_class.csv, confusion matrix."""
    return Path("metrics") / f"test_{run}"
