"""Opt-in checks on the real Caltech-101 and the real ImageNet weights in ../shared.

Enabled with TRANSFERLAB_REAL_DATA=1 (``.ci/run`` sets it when ../shared is present); they
catch weights that silently fail to load, which no generated-data test can.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import CALTECH, HF_HOME, tiny_params
from transferlab import sources, training
from transferlab.inference import onnx_runner as ONNX_RUNNER
from transferlab.model_card import EvalInput
from transferlab.paths import train_dir
from transferlab.sources import scan
from transferlab.splits import load_split
from transferlab.stages import features, prepare, probe

pytestmark = [
    pytest.mark.real_data,
    pytest.mark.skipif(
        os.environ.get("TRANSFERLAB_REAL_DATA") != "1", reason="opt-in: set TRANSFERLAB_REAL_DATA=1"
    ),
    pytest.mark.skipif(
        not CALTECH.is_dir() or not HF_HOME.is_dir(), reason="../shared (Caltech-101, HF cache) is absent"
    ),
]

SUBSET = [
    "airplanes",
    "bonsai",
    "chair",
    "dolphin",
    "elephant",
    "ferry",
    "grand_piano",
    "hedgehog",
    "lamp",
    "sunflower",
]


def test_real_archive_layout_and_stray_file():
    classes, files = scan(CALTECH, exclude=[])
    assert len(classes) == 102 and len(files) == 9145
    root_images, skipped, _ = prepare.decode_all(
        CALTECH, [f for f in files if f.path == "BACKGROUND_Google/tmp"], 64
    )
    assert not root_images and skipped[0]["path"] == "BACKGROUND_Google/tmp"
    assert skipped[0]["reason"].startswith("DatasetError: not an image file name")
    classes, _ = scan(CALTECH, exclude=["BACKGROUND_Google"])
    assert len(classes) == 101


def test_the_official_data_is_recognised_as_a_local_copy(tmp_path):
    """TRANSFERLAB_DATA with data.source: download: the real folder passes the check of every file's md5."""
    assert sources.manifest_md5(CALTECH) == sources.CALTECH101_MANIFEST_MD5
    assert sources.acquire("download", tmp_path / "raw", str(CALTECH.parent)) == CALTECH


@pytest.mark.slow
def test_pretrained_weights_beat_random_init_by_a_wide_margin(tmp_path, monkeypatch):
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in SUBSET:
        (subset / name).symlink_to(CALTECH / name)
    params = tiny_params()
    params["data"].update(
        source=str(subset), train_per_class=12, val_per_class=4, test_per_class=5, cache_size=147
    )
    params["model"] = {"arch": "timm/tf_efficientnet_lite0", "weights": "imagenet"}
    shared = {
        "epochs": 3,
        "batch_size": 16,
        "image_size": 112,
        "eval_image_size": 128,
        "lr": 0.02,
        "backbone_lr_scale": 0.1,
    }
    params["train"].update(shared)
    params["scratch"].update({key: value for key, value in shared.items() if key != "backbone_lr_scale"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    prepare.main()
    finetuned = training.fit("finetune")["val_acc"]
    scratch = training.fit("scratch")["val_acc"]
    assert finetuned >= 0.8, (
        f"fine-tuned ImageNet weights reach only {finetuned:.2f} on 10 easy classes: were they loaded?"
    )
    assert finetuned - scratch >= 0.4, (finetuned, scratch)

    # the features stage (ONNX Runtime on a CPU), then a head trained on those frozen real features
    params["features"]["image_size"] = 128
    params["train"].update(
        mode="feature_extract", augment=False, epochs=10, lr=0.1, image_size=128, eval_image_size=128
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    features.main()
    head_only = training.fit("finetune")["val_acc"]
    assert head_only >= 0.8, f"a head on frozen ImageNet features reaches only {head_only:.2f}"

    # the linear probe stage (logistic regression on the real features), and LP-FT starting from exactly it
    params["probe"].update(C=[0.1, 1.0], train_on_val=False)
    params["train"].update(
        mode="finetune",
        augment=True,
        init_head="probe",
        epochs=1,
        lr=0.002,
        backbone_lr_scale=1.0,
        image_size=112,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    probe.main()
    fitted = json.loads((train_dir("probe") / "metrics.json").read_text())["best/val_acc"]
    assert fitted >= 0.8, f"the linear probe on real ImageNet features reaches only {fitted:.2f}"
    assert training.fit("finetune")["val_acc"] >= 0.8


@pytest.mark.slow
def test_onnx_runtime_gives_eager_pytorchs_logits_on_the_real_network(tmp_path, monkeypatch):
    """The fast CPU path is used only because it gives the same outputs:
    checked here on real weights and images."""
    import numpy as np
    import torch

    from transferlab import inference
    from transferlab.models import build_model

    subset = tmp_path / "subset"
    subset.mkdir()
    for name in SUBSET[:4]:
        (subset / name).symlink_to(CALTECH / name)
    params = tiny_params()
    params["data"].update(source=str(subset), train_per_class=2, val_per_class=1, cache_size=147)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    prepare.main()
    images = np.asarray(load_split("test")[0])[: inference.ORT_MIN_IMAGES]
    model, head, prep = build_model("timm/tf_efficientnet_lite0", "imagenet", 4)
    model.to(memory_format=torch.channels_last)
    calls = []
    monkeypatch.setattr(inference, "onnx_runner", lambda *args: calls.append(1) or ONNX_RUNNER(*args))
    fast = inference.predict_views(model, images, EvalInput(prep, 128, True), 64, flip=True)
    eager = inference.predict_views(model, images, EvalInput(prep, 128, True), 64, flip=True, fast=False)
    assert calls == [1], "ONNX Runtime ran the fast pass"
    scale = float(eager.abs().max())
    assert float((fast - eager).abs().max()) <= inference.ORT_TOLERANCE * max(1.0, scale)
