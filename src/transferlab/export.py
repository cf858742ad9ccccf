"""Export a trained model to TorchScript or ONNX, and check that the export predicts what the model predicts.

The export takes normalised N x 3 x S x S float images (S = the checkpoint's evaluation size) and returns
logits; the class names and preprocessing travel inside it (TorchScript: an extra file
``transferlab.json``; ONNX: the metadata property ``transferlab``), so it is usable without the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_path
from .trained_model import TrainedModel

FORMATS = ("torchscript", "onnx")
METADATA_KEY = "transferlab"


class ExportError(RuntimeError):
    """The exported model does not give the trained model's predictions."""


@dataclass(frozen=True)
class ExportCheck:
    images: int
    same_top1: int
    max_abs_logit_diff: float


def metadata(trained: TrainedModel) -> str:
    return json.dumps(
        {
            "arch": trained.arch,
            "classes": trained.classes,
            "preprocessing": trained.prep.as_dict(),
            "image_size": trained.image_size,
            "input": "float32 N x 3 x image_size x image_size, RGB scaled to [0, 1] then normalised with mean/std",
            "output": "logits, one per class",
        }
    )


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: str):
    torch.jit.save(torch.jit.trace(model, example), str(path), _extra_files={f"{METADATA_KEY}.json": meta})
    loaded = torch.jit.load(str(path))
    return lambda x: loaded(x).numpy()


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, meta: str):
    import onnx
    import onnxruntime

    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), input_names=["images"], output_names=["logits"], dynamo=True)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: meta})
    onnx.save(proto, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x.numpy()})[0]


def export(trained: TrainedModel, fmt: str, path: Path, sample: np.ndarray, tolerance: float = 1e-3) -> ExportCheck:
    """Write the export to ``path`` if its logits match the model's on ``sample`` (uint8 N x H x W x 3 images).

    The export is written and checked under a temporary name: one that fails the check is never left at ``path``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    model = trained.model.cpu().eval()
    trained_inputs = trained.inputs(sample).cpu()
    writer = _export_torchscript if fmt == "torchscript" else _export_onnx
    with torch.no_grad(), atomic_path(path) as tmp:
        expected = model(trained_inputs).numpy()
        example = trained_inputs[:1].repeat(2, 1, 1, 1)  # batch size 2: a batch of 1 would be fixed into the ONNX graph
        got = writer(model, example, tmp, metadata(trained))(trained_inputs)
        diff = float(np.abs(got - expected).max())
        same = int((got.argmax(1) == expected.argmax(1)).sum())
        check = ExportCheck(len(sample), same, diff)
        if diff > tolerance * max(1.0, float(np.abs(expected).max())) or same != len(sample):
            raise ExportError(f"the {fmt} export of {trained.path} differs from the model: {check}")
    return check
