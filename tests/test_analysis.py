"""Misclassification analysis, calibration and Grad-CAM with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from sklearn.calibration import calibration_curve
from torch import nn

from transferlab.analysis import (
    calibration_bins,
    confused_pairs,
    expected_calibration_error,
    gallery_indices,
    most_confused_classes,
    plot_calibration,
    plot_confusion_matrix,
    plot_misclassified,
    topk_accuracies,
)
from transferlab.errors import ModelError
from transferlab.gradcam import feature_maps, find_layer, gradcam, last_spatial_layer
from transferlab.inputs import Preprocessing
from transferlab.model_card import ModelCard
from transferlab.trained_model import TrainedModel


def test_expected_calibration_error_with_known_answers():
    confidence = np.array([0.95, 0.95, 0.65, 0.65])
    correct = np.array([True, False, True, True])
    # bin [0.9, 1): confidence 0.95, accuracy 0.5; bin [0.6, 0.7): confidence 0.65, accuracy 1
    assert expected_calibration_error(confidence, correct, 10) == pytest.approx((2 * 0.45 + 2 * 0.35) / 4)
    assert expected_calibration_error(
        np.array([0.75] * 4), np.array([True, True, True, False]), 10
    ) == pytest.approx(0)


def test_calibration_bins_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    confidence = np.concatenate(
        [rng.uniform(0.01, 0.99, 496), [0.2, 0.4, 0.6, 0.8]]
    )  # and values on bin edges
    correct = rng.uniform(size=500) < confidence**2
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=5)
    bins = calibration_bins(confidence, correct, 5)
    assert [b[1] for b in bins] == pytest.approx(accuracy) and [b[0] for b in bins] == pytest.approx(
        mean_confidence
    )
    assert sum(b[2] for b in bins) == 500


def test_topk_with_two_classes_and_k_beyond_the_classes():
    labels = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert topk_accuracies(labels, probs, [1, 2, 5]) == {"top1": 0.5, "top2": 1.0, "top5": 1.0}


def test_confused_pairs_and_most_confused_classes():
    classes = ["cat", "dog", "emu", "fox"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
    predictions = np.array([1, 1, 1, 0, 0, 1, 2, 3, 3, 3])
    pairs = confused_pairs(labels, predictions, classes)
    assert [(p.true_class, p.predicted_class, p.count) for p in pairs] == [
        ("cat", "dog", 3),
        ("dog", "cat", 1),
        ("emu", "fox", 1),
    ]
    assert pairs[0].share == pytest.approx(0.75)
    assert most_confused_classes(labels, predictions, 4, 2).tolist() == [0, 1]  # cat and dog: 4 mistakes each


def test_the_gallery_takes_the_most_confident_mistakes_at_most_two_per_pair():
    labels = np.array([0, 0, 0, 1, 2, 2])
    probs = np.array([[0.1, 0.9, 0], [0.2, 0.8, 0], [0.3, 0.7, 0], [0.05, 0, 0.95], [0.6, 0, 0.4], [0, 0, 1]])
    # mistakes: 0->1 at 0.9, 0.8, 0.7; 1->2 at 0.95; 2->0 at 0.6; image 5 is right
    assert gallery_indices(labels, probs, 10) == [3, 0, 1, 4]
    assert gallery_indices(labels, probs, 2) == [3, 0]


def test_pictures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    classes = [f"class_{i}" for i in range(40)]
    labels = np.repeat(np.arange(40), 3)
    probs = rng.dirichlet(np.ones(40) * 0.3, size=len(labels))
    predictions = probs.argmax(1)
    plot_confusion_matrix(tmp_path / "cm.png", labels, predictions, classes, 10, "test")
    plot_calibration(tmp_path / "calibration.png", probs.max(1), predictions == labels, 10, 0.1, "test")
    images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    shown = plot_misclassified(tmp_path / "wrong.jpg", images, labels, probs, classes, 8, "test")
    assert shown == 8
    for name in ("cm.png", "calibration.png", "wrong.jpg"):
        with Image.open(tmp_path / name) as image:
            assert image.format == ("JPEG" if name.endswith("jpg") else "PNG") and min(image.size) > 200


def trained(model: nn.Module, classes: list[str], size: int = 64) -> TrainedModel:
    prep = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0)
    card = ModelCard("test", "scratch", "test", "none", classes, "fc", prep, size, size, False, {})
    return TrainedModel(model.eval(), Path("model.pt"), card)


def colour_detector() -> nn.Module:
    """Class 0 is evidence of red, class 1 of blue: a 1x1 convolution, ReLU, average pooling, linear."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = conv.weight[1, 2] = 1.0
        conv.bias.fill_(-1.0)  # after normalisation a black pixel is -2, a full channel +2
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def test_gradcam_lights_up_the_evidence_for_the_chosen_class():
    image = np.zeros((1, 64, 64, 3), dtype=np.uint8)
    image[0, 4:24, 4:24, 0] = 255  # red square, top left
    image[0, 40:60, 40:60, 2] = 255  # blue square, bottom right
    model = trained(colour_detector(), ["red", "blue"])
    assert last_spatial_layer(model.model, 64) == "1"
    red, blue = gradcam(model, np.concatenate([image, image]), targets=[0, 1], size=64)
    assert red[4:24, 4:24].mean() > 0.9 and red[40:60, 40:60].max() < 0.1
    assert blue[40:60, 40:60].mean() > 0.9 and blue[4:24, 4:24].max() < 0.1
    name, maps = feature_maps(model, image)
    assert name == "1" and maps.shape == (1, 2, 64, 64)


@pytest.mark.parametrize(
    ("model", "layer"),
    [
        (torchvision.models.resnet18(num_classes=3), "layer4"),
        (torchvision.models.efficientnet_b0(num_classes=3), "features"),
        (timm.create_model("tf_efficientnet_lite0", num_classes=3), "bn2"),
    ],
    ids=["resnet18", "torchvision-efficientnet", "timm-efficientnet"],
)
def test_default_layer_is_the_last_spatial_one_in_torchvision_and_timm(model, layer):
    model_at = trained(model, ["a", "b", "c"], size=96)
    assert find_layer(model_at, None)[0] == layer
    cams = gradcam(
        model_at, np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8), size=96
    )
    assert cams.shape == (2, 96, 96) and cams.min() >= 0 and cams.max() <= 1


def test_an_unknown_layer_is_named():
    with pytest.raises(ModelError, match="layer 'layer9' is not a module of test"):
        find_layer(trained(torchvision.models.resnet18(num_classes=2), ["a", "b"]), "layer9")
