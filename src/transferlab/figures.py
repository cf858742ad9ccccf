"""Figures: matplotlib without a display, written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .fileio import atomic_path  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: plt.Figure, path: Path, dpi: int = 110) -> None:
    """Write a figure atomically, in the format its suffix names, and free it
    (JPEG for photo panels: 5x smaller)."""
    # leave room for a figure title above the panels' own titles
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()) if fig.get_suptitle() else None)
    fmt = path.suffix.lstrip(".").lower()
    with atomic_path(path) as tmp:
        fig.savefig(
            tmp, format=fmt, dpi=dpi, **({"pil_kwargs": {"quality": 85}} if fmt in ("jpg", "jpeg") else {})
        )
    plt.close(fig)
