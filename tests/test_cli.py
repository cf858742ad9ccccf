"""The ``transferlab`` command on a model trained on tiny data: predict, gradcam, feature-maps, export."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_params
from transferlab import training
from transferlab.paths import GRADCAM_IMAGE, PREPARED_DIR, checkpoint_path
from transferlab.splits import load_split
from transferlab.stages import gradcam, prepare
from transferlab.tools import cli, export
from transferlab.trained_model import TrainedModel


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny dataset, prepared, with a fine-tuned model
    (random resnet18 weights standing in for ImageNet's)."""
    from imagegen import make_image_folder

    root = tmp_path_factory.mktemp("cli")
    folder = make_image_folder(root / "images", classes=3, per_class=12)
    torch.manual_seed(0)
    weights = root / "resnet18.pth"
    torch.save(__import__("torchvision").models.resnet18().state_dict(), weights)
    params = tiny_params()
    params["data"]["source"] = str(folder)
    params["model"]["weights"] = str(weights)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        prepare.main()
        training.fit("finetune")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def transferlab(project, capsys, monkeypatch):
    """``transferlab ARGS...`` run in this process, in the project (the installed command, in a new
    process, is tested once: test_the_installed_command_predicts_a_single_grayscale_image)."""

    def command(*args: str) -> subprocess.CompletedProcess:
        monkeypatch.chdir(project)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            cli.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, exit_.value.code, out.out, out.err)

    return command


def test_predict_a_folder_with_bad_files_csv_json_and_the_pipelines_numbers(
    project, monkeypatch, transferlab
):
    images = project / "to_predict"
    images.mkdir()
    test_rows = list(csv.DictReader((project / PREPARED_DIR / "test.csv").open()))[:4]
    for row in test_rows:
        (images / Path(row["path"]).name.replace("image", row["class"])).write_bytes(
            (project / "images" / row["path"]).read_bytes()
        )
    (images / "notes.jpg").write_text("not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "readme.txt").write_text("not an image file name: ignored")

    result = transferlab(
        "predict", "missing.jpg", "to_predict", "--topk", "2", "--csv", "out.csv", "--json", "out.json"
    )
    assert result.returncode == 1, "some paths could not be read"
    assert (
        "cannot read missing.jpg: does not exist" in result.stderr
        and "cannot read to_predict/notes.jpg" in result.stderr
        and "cannot read to_predict/empty.png" in result.stderr
    )
    assert "readme.txt" not in result.stderr + result.stdout
    report = json.loads((project / "out.json").read_text())
    assert len(report["predictions"]) == 4 and {f["path"] for f in report["failures"]} == {
        "missing.jpg",
        "to_predict/notes.jpg",
        "to_predict/empty.png",
    }
    assert all(len(p["top"]) == 2 for p in report["predictions"])
    rows = list(csv.DictReader((project / "out.csv").open()))
    assert len(rows) == 4 * 2 + 3 and rows[0]["rank"] == "1"

    # the same probabilities as the pipeline's own path (prepared cache -> evaluation crop -> model)
    monkeypatch.chdir(project)
    trained = TrainedModel.load(checkpoint_path("finetune"), device="cpu")
    cached, _ = load_split("test")
    expected = trained.probabilities(cached[:4], tta="flip")  # predict and evaluate default to flip TTA
    assert not np.allclose(expected, trained.probabilities(cached[:4], tta="none"), atol=1e-4), (
        "TTA must make a difference here"
    )
    by_name = {Path(p["path"]).name: p["top"][0] for p in report["predictions"]}
    for row, probs in zip(test_rows, expected, strict=True):
        top = by_name[Path(row["path"]).name.replace("image", row["class"])]
        assert top["class"] == trained.card.classes[probs.argmax()] and top["probability"] == pytest.approx(
            probs.max(), abs=1e-5
        )
    assert str(report["predictions"][0]["path"]) in result.stdout


@pytest.mark.slow
def test_the_installed_command_predicts_a_single_grayscale_image(project):
    Image.open(project / "images/class_2/image_0001.jpg").convert("L").save(project / "gray.png")
    command = Path(sys.executable).parent / "transferlab"  # the console script of pyproject.toml
    result = subprocess.run(
        [str(command), "predict", "gray.png", "--topk", "10"], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "gray.png" and len(result.stdout.splitlines()) == 1 + 3, (
        "top-k stops at the 3 classes"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "images", "--model", "nowhere/model.pt"], "no trained model at nowhere/model.pt"),
        (["predict", "no_such_folder"], "no_such_folder does not exist"),
        (["predict", "data"], "data holds no image files"),
        (
            ["gradcam", "images/class_0/image_0000.jpg", "--layer", "fc"],
            "layer 'fc' does not output a grid of feature maps",
        ),
        (
            ["feature-maps", "images/class_0/image_0000.jpg", "--layer", "avgpool"],
            "layer 'avgpool' does not output a grid of feature maps",
        ),
        (
            ["feature-maps", "images/class_0/image_0000.jpg", "--layer", "layer9"],
            "layer 'layer9' is not a module of resnet18",
        ),
        (["ensemble"], "no model at data/models/probe_holdout/model.pt: run its stage first"),
        (["ensemble", "--steps", "1"], "--steps 1: need at least 2"),
    ],
)
def test_bad_arguments_are_one_clear_line(project, args, message, transferlab):
    (project / "data" / "empty").mkdir(exist_ok=True)
    result = transferlab(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_gradcam_and_feature_maps_write_pictures(project, transferlab):
    image = "images/class_1/image_0000.jpg"
    model = str(checkpoint_path("finetune"))
    result = transferlab("gradcam", image, "--model", model, "--class", "class_2", "--out", "cam.png")
    assert result.returncode == 0, result.stderr
    assert "Grad-CAM of class_2" in result.stdout
    result = transferlab(
        "feature-maps", image, "--model", model, "--layer", "layer3", "--count", "8", "--out", "maps.png"
    )
    assert result.returncode == 0, result.stderr
    assert "feature maps of layer3" in result.stdout
    for name in ("cam.png", "maps.png"):
        with Image.open(project / name) as picture:
            assert picture.format == "PNG"
    wrong_class = transferlab("gradcam", image, "--model", model, "--class", "class_7")
    assert (
        wrong_class.returncode == 2
        and "--class 'class_7' is not one of the model's classes; did you mean" in wrong_class.stderr
    )


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_predicts_what_the_model_predicts(project, fmt, transferlab):
    out = f"model.{fmt}"
    result = transferlab(
        "export",
        "--model",
        str(checkpoint_path("finetune")),
        "--format",
        fmt,
        "--out",
        out,
        "--check",
        "images",
    )
    assert result.returncode == 0, result.stderr
    assert "the same top-1 for 16" in result.stdout
    if fmt == "onnx":
        props = {p.key: p.value for p in onnx.load(str(project / out)).metadata_props}
        assert json.loads(props["transferlab"])["classes"] == ["class_0", "class_1", "class_2"]
    else:
        extra = {"transferlab.json": ""}
        torch.jit.load(str(project / out), _extra_files=extra)
        assert json.loads(extra["transferlab.json"])["image_size"] == 32


def test_export_check_fails_when_the_export_differs(project, monkeypatch, tmp_path):
    monkeypatch.chdir(project)
    trained = TrainedModel.load(checkpoint_path("finetune"), device="cpu")
    real = export._export_torchscript

    def shifted_export(*args):
        run = real(*args)
        return lambda x: run(x) + np.eye(3)[[2]] * 5

    monkeypatch.setattr(export, "_export_torchscript", shifted_export)
    sample = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    with pytest.raises(export.ExportError, match="differs from the model"):
        export.export(trained, "torchscript", tmp_path / "bad.pt", sample)
    assert list(tmp_path.iterdir()) == [], "an export that fails its check is not left behind"


def readme_onnx_snippet() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "using-models.md").read_text()
    block = text.split("<!-- onnx-snippet -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_onnx_snippet_reproduces_predict(project, tmp_path, transferlab):
    """The export's metadata is enough: the docs' ONNX Runtime snippet (Pillow
    and numpy, no torch, no transferlab) on a sideways phone photo of another
    size, and on a 16-bit greyscale PNG, gives the class and probability `transferlab predict` gives."""
    source = Image.open(project / "images/class_1/image_0003.jpg").resize((150, 110), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    source.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.jpg", quality=92, exif=exif)
    wide = Image.fromarray(np.asarray(source.convert("L"), np.uint16) * 257)
    assert wide.mode == "I;16"
    wide.save(tmp_path / "photo.png")
    result = transferlab(
        "export",
        "--model",
        str(checkpoint_path("finetune")),
        "--format",
        "onnx",
        "--out",
        str(tmp_path / "model.onnx"),
    )
    assert result.returncode == 0, result.stderr
    snippet = readme_onnx_snippet()
    assert len(snippet.strip().splitlines()) <= 17
    for photo in ("photo.jpg", "photo.png"):
        predicted = transferlab(
            "predict", str(tmp_path / photo), "--topk", "1", "--json", str(tmp_path / "p.json")
        )
        assert predicted.returncode == 0, predicted.stderr
        top = json.loads((tmp_path / "p.json").read_text())["predictions"][0]["top"][0]
        code = snippet.replace('"photo.jpg"', f'"{photo}"')
        ran = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
        name, probability = ran.stdout.split()
        assert name == top["class"] and float(probability) == pytest.approx(top["probability"], abs=1e-3), (
            photo
        )


def test_predict_takes_several_files_and_folders(project, transferlab):
    result = transferlab(
        "predict",
        "images/class_0/image_0000.jpg",
        "images/class_1",
        "images/class_1/image_0002.jpg",
        "--topk",
        "1",
        "--json",
        "several.json",
    )
    assert result.returncode == 0, result.stderr
    paths = [p["path"] for p in json.loads((project / "several.json").read_text())["predictions"]]
    assert paths[0] == "images/class_0/image_0000.jpg" and len(paths) == 1 + 12, (
        "each image once, in the order given"
    )


def test_the_gradcam_stage_draws_every_model_on_the_same_test_images(project, monkeypatch):
    """The gradcam stage in this process (in the pipeline it runs as its own stage): one row per sampled
    test image. The probe's and scratch's checkpoints are stand-ins, copies of the fine-tuned model's."""
    monkeypatch.chdir(project)
    stand_ins = [checkpoint_path(model) for model in ("probe", "scratch")]
    for path in stand_ins:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(checkpoint_path("finetune"), path)
    try:
        gradcam.main()
    finally:
        for path in stand_ins:
            shutil.rmtree(path.parent)
    with Image.open(project / GRADCAM_IMAGE) as picture:
        assert picture.format == "JPEG" and picture.width > picture.height / 6
    _, labels = load_split("test")
    assert len(gradcam.gradcam_sample(labels, 6)) == 6 and gradcam.gradcam_sample(labels, 0).size == 0


@pytest.mark.slow
def test_ensemble_scores_the_holdout_twins_mixes_on_validation(
    reproduced_once, tmp_path, monkeypatch, capsys
):
    """Each end equals what the twin's own stage measured on validation (the probe with flip TTA, the
    fine-tune without), and the middle the mix of the two models' probabilities."""
    from sklearn.metrics import balanced_accuracy_score

    monkeypatch.chdir(reproduced_once)
    found = {}
    for tta in ("flip", "none"):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["ensemble", "--steps", "3", "--tta", tta, "--out", str(tmp_path / tta)])
        assert exit_.value.code == 0, capsys.readouterr().err
        assert f"on 6 validation images (holdout twins, tta {tta})" in capsys.readouterr().out
        with (tmp_path / tta / "ensemble.csv").open() as f:
            found[tta] = [
                (float(row["probe_weight"]), float(row["mean_per_class_acc"])) for row in csv.DictReader(f)
            ]
    probe_stage = json.loads(Path("metrics/train_probe/metrics.json").read_text())
    finetune_stage = json.loads(Path("metrics/train_finetune_holdout/metrics.json").read_text())
    assert found["flip"][-1][1] == pytest.approx(probe_stage["best/val_acc"])
    assert found["none"][0][1] == pytest.approx(finetune_stage["best/val_acc"])
    images, labels = load_split("val")
    finetuned, probe = (
        TrainedModel.load(checkpoint_path(run)).probabilities(images)
        for run in ("finetune_holdout", "probe_holdout")
    )
    expected = [
        balanced_accuracy_score(labels, p.argmax(1)) for p in (finetuned, (finetuned + probe) / 2, probe)
    ]
    assert [weight for weight, _ in found["none"]] == [0.0, 0.5, 1.0]
    assert [acc for _, acc in found["none"]] == pytest.approx(expected)
    summary = json.loads((tmp_path / "none" / "ensemble.json").read_text())
    assert (summary["probe_acc"], summary["finetune_acc"]) == pytest.approx((expected[2], expected[0]))
    assert summary["chosen_on_validation"]["finetune"]["epochs"] == 2
    assert "C" in summary["chosen_on_validation"]["probe"]
    assert (tmp_path / "none" / "ensemble.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("accuracies", "best"),
    [
        ([0.5, 0.7, 0.9, 0.7], 2),  # a mix beats both
        ([0.5, 0.7, 0.7, 0.7], 3),  # a tie with the probe: the probe
        ([0.8, 0.8, 0.6, 0.7], 0),  # a tie with the fine-tuned model: the fine-tuned model
        ([0.5, 0.8, 0.8, 0.7], 1),  # a tie between mixes: the lower weight
        ([0.8, 0.7, 0.7, 0.8], 3),  # the two networks tie: the probe
    ],
)
def test_a_mix_must_beat_both_networks_alone(accuracies, best):
    from transferlab.tools.ensemble import best_mix

    assert best_mix(np.array(accuracies)) == best


def test_mix_accuracies_mixes_probabilities_with_the_probe_weight():
    from transferlab.tools.ensemble import mix_accuracies

    labels = np.array([0, 1, 2, 2])
    # the probe gets images 0, 2 and 3 right, the fine-tuned model 1 and 3; an equal mix follows the surer one
    p_probe = np.array([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6]])
    p_finetuned = np.array([[0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4], [0.1, 0.2, 0.7]])
    accuracies = mix_accuracies(labels, p_probe, p_finetuned, np.array([0.0, 0.5, 1.0]))
    # per class: w = 0: 0, 1, 1/2; w = 0.5: every image right; w = 1: 1, 0, 1
    assert accuracies == pytest.approx([0.5, 1.0, 2 / 3])


def test_distinct_parameters_counts_what_two_networks_share_once():
    from transferlab.tools.ensemble import distinct_parameters

    first, second = (
        SimpleNamespace(model=torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))) for _ in "ab"
    )
    second.model[1].load_state_dict(first.model[1].state_dict())  # the second layer alike, the first not
    assert distinct_parameters(first, second) == (2 * (3 * 4 + 4) + (4 * 2 + 2), 4 * 2 + 2)
