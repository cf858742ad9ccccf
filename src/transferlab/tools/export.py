"""Export a trained model to TorchScript or ONNX, and check that the export predicts what the model predicts.

The export takes normalised N x 3 x S x S float images (S = the checkpoint's evaluation size) and returns
logits; the class names and every step from an image file to ``transferlab predict``'s probabilities travel
inside it (TorchScript: an extra file ``transferlab.json``; ONNX: the metadata property ``transferlab``), so
it is usable without the checkpoint, or this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_path
from ..trained_model import TrainedModel

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
    """What travels with the export: the classes, and every step from an image file to the probabilities
    that ``transferlab predict`` prints, so that another runtime reproduces them (docs/using-models.md shows
    it for ONNX Runtime)."""
    card = trained.card
    prep, cache, size = card.preprocessing, card.cache_size, card.eval_image_size
    crop = round(cache * prep.crop_pct)
    return json.dumps(
        {
            "arch": card.arch,
            "classes": card.classes,
            "preprocessing": prep.as_dict(),
            "cache_size": cache,
            "crop_size": crop,
            "image_size": size,
            "tta": "flip",
            "steps": [
                f"decode with Pillow: Image.open, then image.draft('RGB', ({cache}, {cache})) "
                "(JPEG decodes at a reduced scale), ImageOps.exif_transpose (upright), convert('RGB')",
                f"resize the shorter side to {cache} px "
                f"(the longer to round(side * {cache} / shorter side), at least {cache}), "
                f"Image.BICUBIC; crop the centre {cache} x {cache} square "
                f"(offsets (width - {cache}) // 2, (height - {cache}) // 2)",
                f"crop its centre {crop} x {crop} square "
                f"(crop_pct {prep.crop_pct}; offsets round(({cache} - {crop}) / 2)) and "
                f"resize it to {size} x {size}, {prep.interpolation}, antialiased",
                "scale to [0, 1], subtract preprocessing.mean and divide by preprocessing.std "
                "per RGB channel; float32 N x 3 x H x W",
                "tta flip: the logits of the image and of its left-right mirror image, averaged; "
                "then softmax",
            ],
            "input": f"float32 N x 3 x {size} x {size}: the output of the steps before the model",
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
    program = torch.onnx.export(
        model,
        (example,),
        dynamic_shapes=({0: batch},),
        input_names=["images"],
        output_names=["logits"],
        dynamo=True,
    )
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: meta})
    onnx.save(proto, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x.numpy()})[0]


def export(
    trained: TrainedModel, fmt: str, path: Path, sample: np.ndarray, tolerance: float = 1e-3
) -> ExportCheck:
    """Write the export to ``path`` if its logits match the model's on ``sample``
    (uint8 N x H x W x 3 images).

    The export is written and checked under a temporary name: one that fails the check is never left at
    ``path``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    model = trained.model.cpu().eval()
    trained_inputs = trained.inputs(sample).cpu()
    writer = _export_torchscript if fmt == "torchscript" else _export_onnx
    with torch.no_grad(), atomic_path(path) as tmp:
        expected = model(trained_inputs).numpy()
        example = trained_inputs[:1].repeat(
            2, 1, 1, 1
        )  # batch size 2: a batch of 1 would be fixed into the ONNX graph
        got = writer(model, example, tmp, metadata(trained))(trained_inputs)
        diff = float(np.abs(got - expected).max())
        same = int((got.argmax(1) == expected.argmax(1)).sum())
        check = ExportCheck(len(sample), same, diff)
        if diff > tolerance * max(1.0, float(np.abs(expected).max())) or same != len(sample):
            raise ExportError(f"the {fmt} export of {trained.path} differs from the model: {check}")
    return check
