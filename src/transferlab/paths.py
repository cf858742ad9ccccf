"""Where the stages read and write, in one place (relative to the project root, where dvc.yaml is)."""

from __future__ import annotations

from pathlib import Path

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("data/models")
PREPARE_REPORT = Path("metrics/prepare.json")
COMPARISON_MD = Path("metrics/comparison.md")
COMPARISON_JSON = Path("metrics/comparison.json")
CURVES_PNG = Path("plots/learning_curves.png")
GAIN_PNG = Path("plots/per_class_gain.png")


def checkpoint_path(mode: str) -> Path:
    return MODELS_DIR / f"{mode}.pt"


def train_dir(mode: str) -> Path:
    """dvclive folder of a training stage: per-epoch curves, settings, summary."""
    return Path("metrics") / f"train_{mode}"


def evaluation_dir(mode: str) -> Path:
    """Test-split results of one model: metrics.json, per_class.csv, confusion matrix."""
    return Path("metrics") / f"test_{mode}"
