"""Reading and writing torch files: trained model files, and ``torch.load`` that refuses code.

A trained model file holds the model's weights and its card (``model_card.ModelCard``: architecture,
classes, preprocessing, how it was made), so that evaluate, predict, Grad-CAM and export need nothing else.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from .errors import ModelError, is_out_of_memory
from .fileio import atomic_path
from .model_card import CARD_KEYS, ModelCard


def _written_by_torch(path: str | Path) -> bool:
    """A zip archive (torch.save's format; a cut one keeps its leading signature) or a pickle with a protocol
    header (its legacy format); text is neither."""
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            return True
        f.seek(0)
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def load_torch_file(path: str | Path) -> object:
    """``torch.load`` of tensors and plain containers only (weights_only): a pickle that would run code is
    refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # the file may be fine: not a reason to distrust it
        if isinstance(err, OSError) or is_out_of_memory(err):
            raise
        # torch's message for a refused pickle: a paragraph on the weights_only default, then the refused
        # GLOBAL. Only a file torch wrote (a zip archive, or the legacy format's pickle header) is reported as
        # refused: the unpickler reads a text file's leading "c" as a GLOBAL too. Anything else fails with
        # what the unpickler tripped on (truncated, empty, a text or web page).
        refused = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), None)
        if refused and _written_by_torch(path):
            raise ModelError(
                f"refusing to load {path}: it holds more than tensors and plain containers ({refused})"
            ) from err
        reason = next(
            (line.strip() for line in str(err).splitlines() if line.strip() and "weights_only" not in line),
            "",
        )
        if len(reason) > 160:
            reason = reason[:160].rsplit(" ", 1)[0] + " ..."
        if Path(path).stat().st_size == 0:
            what = "is empty: this is not a model file"
        elif _written_by_torch(path):
            what = "is damaged or cut short"
        else:  # text, a web page saved under that name, ...
            what = "is not a model file (torch.save writes a zip archive)"
        raise ModelError(
            f"{path} {what} ({type(err).__name__}: {reason}). "
            "If a pipeline stage wrote it, re-run that stage (dvc repro --force <stage>); "
            "if it was downloaded or copied, get it again"
        ) from err


def read_checkpoint(path: str | Path) -> dict:
    """A training stage's checkpoint dict (arch, classes, model weights, ...), or a ``ModelError`` saying
    why not."""
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or not {"arch", "classes", "model"} <= set(checkpoint):
        raise ModelError(
            f"{path} is not a checkpoint written by a training stage (no arch, classes and model)"
        )
    return checkpoint


def read_model(path: str | Path) -> tuple[ModelCard, dict]:
    """A trained model file's card and weights, or a ``ModelError`` saying why not."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in CARD_KEYS if key not in checkpoint]
    if missing:
        raise ModelError(
            f"{path} lacks {', '.join(missing)}: "
            "it was written by an older version; re-run its training stage"
        )
    return ModelCard.from_dict(checkpoint), checkpoint["model"]


def save_torch_file(path: Path, data: dict) -> None:
    """``torch.save`` that leaves the old file, or none, if it is interrupted, and writes the same bytes for
    the same data: saved to a file, torch names the archive's inner folder after the (temporary) file."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def write_model(path: Path, card: ModelCard, state: dict) -> None:
    """A trained model file: the weights ``state`` and everything needed to use them (``card``)."""
    save_torch_file(path, card.as_dict(state))
