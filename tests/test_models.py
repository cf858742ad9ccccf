"""Model building: head replacement, weights sources, preprocessing metadata, learning-rate groups."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import HF_HOME
from transferlab.errors import ModelError
from transferlab.models import backbone_layers, build_model, freeze_layers, parameter_groups, set_train_mode

RESNET18_FILE = (
    "resnet18-f37072fd.pth"  # the file name torchvision's ResNet18_Weights.IMAGENET1K_V1 downloads to
)


def fake_imagenet_state(arch: str, seed: int = 1) -> dict:
    """A stand-in for ImageNet weights: a seeded random init of the 1000-class model."""
    torch.manual_seed(seed)
    if arch.startswith("timm/"):
        return timm.create_model(arch[5:]).state_dict()
    import torchvision

    return torchvision.models.get_model(arch).state_dict()


def assert_backbone_equals(model: nn.Module, head: str, state: dict) -> None:
    own = model.state_dict()
    compared = 0
    for key, value in state.items():
        if key.startswith(head + "."):
            continue
        torch.testing.assert_close(own[key], value, msg=f"{key} did not come from the weights")
        compared += 1
    assert compared > 10


def test_torchvision_imagenet_weights_via_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = fake_imagenet_state("resnet18")
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub/checkpoints" / RESNET18_FILE)
    model, head, prep = build_model("resnet18", "imagenet", 101)
    assert head == "fc" and model.fc.out_features == 101
    assert_backbone_equals(model, head, state)
    assert (
        prep.mean == (0.485, 0.456, 0.406) and prep.interpolation == "bilinear" and prep.crop_pct == 224 / 256
    )
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 101)


@pytest.mark.parametrize(
    ("arch", "head"),
    [
        ("alexnet", "classifier.6"),
        ("squeezenet1_0", "classifier.1"),
        ("googlenet", "fc"),
        ("timm/resnet18", "fc"),
    ],
)
def test_head_is_replaced_by_a_fresh_101_way_layer(arch, head):
    model, found, _ = build_model(arch, "none", 101)
    assert found == head
    model.train()  # googlenet would return a tuple with its auxiliary heads here
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 101)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file(tmp_path, suffix):
    state = fake_imagenet_state("timm/tf_efficientnet_lite0")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    model, head, prep = build_model("timm/tf_efficientnet_lite0", str(path), 101)
    assert head == "classifier" and model.classifier.out_features == 101
    assert_backbone_equals(model, head, state)
    assert prep.mean == (0.5, 0.5, 0.5) and prep.interpolation == "bicubic"
    # the fresh head is not the file's head
    assert model.classifier.weight.shape != state["classifier.weight"].shape


def test_real_timm_weights_file_from_shared():
    files = list(HF_HOME.glob("hub/models--timm--tf_efficientnet_lite0.in1k/snapshots/*/model.safetensors"))
    if not files:
        pytest.skip("../shared/hf is absent")
    from safetensors.torch import load_file

    model, head, _ = build_model("timm/tf_efficientnet_lite0", str(files[0]), 101)
    assert_backbone_equals(model, head, load_file(files[0]))


def test_weights_for_another_architecture_or_class_count_are_refused(tmp_path):
    other = tmp_path / "resnet.pth"
    torch.save(fake_imagenet_state("resnet18"), other)
    with pytest.raises(
        ModelError, match=r"weights file .*resnet.pth does not fit timm/tf_efficientnet_lite0"
    ):
        build_model("timm/tf_efficientnet_lite0", str(other), 101)
    ten_classes = tmp_path / "ten.pth"
    state = fake_imagenet_state("resnet18")
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    torch.save(state, ten_classes)
    with pytest.raises(ModelError, match="size mismatch for fc.weight"):
        build_model("resnet18", str(ten_classes), 101)
    with pytest.raises(ModelError, match="model.weights: no such file"):
        build_model("resnet18", str(tmp_path / "missing.pth"), 101)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="refusing to load"):
        build_model("resnet18", str(tmp_path / "evil.pth"), 101)
    assert not (tmp_path / "pwned.txt").exists()


def test_unknown_architectures():
    with pytest.raises(ModelError, match="model.arch: 'resnet19' is neither a torchvision"):
        build_model("resnet19", "none", 101)
    with pytest.raises(ModelError, match="timm/nonsense_net is not a timm model"):
        build_model("timm/nonsense_net", "none", 101)


def test_learning_rate_and_weight_decay_groups():
    model, head, _ = build_model("resnet18", "none", 101)
    finetune = parameter_groups(
        model, head, lr=0.01, backbone_lr_scale=0.1, weight_decay=1e-4, decay_norm_and_bias=False
    )
    summary = [(g["name"], g["lr"], g["weight_decay"]) for g in finetune]
    assert summary == [
        ("backbone", pytest.approx(0.001), 1e-4),
        ("backbone", pytest.approx(0.001), 0.0),
        ("head", 0.01, 1e-4),
        ("head", 0.01, 0.0),
    ]
    assert list(finetune[2]["params"]) == [model.fc.weight] and list(finetune[3]["params"]) == [model.fc.bias]
    undecayed = {id(p) for p in finetune[1]["params"]}
    assert (
        id(model.bn1.weight) in undecayed
        and id(model.bn1.bias) in undecayed
        and id(model.conv1.weight) not in undecayed
    )
    grouped = [id(p) for g in finetune for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    scratch = parameter_groups(
        model, head, lr=0.05, backbone_lr_scale=None, weight_decay=1e-4, decay_norm_and_bias=True
    )
    assert len(scratch) == 1 and len(scratch[0]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("arch", "layers", "first", "last"),
    [
        ("resnet18", 5, ["conv1", "bn1"], ["layer4"]),
        ("timm/resnet18", 5, ["conv1", "bn1"], ["layer4"]),
        ("alexnet", 7, ["features.0"], ["classifier.4"]),
        ("efficientnet_b0", 9, ["features.0"], ["features.8"]),
        ("timm/tf_efficientnet_lite0", 8, ["conv_stem", "bn1"], ["blocks.6", "conv_head", "bn2"]),
    ],
)
def test_backbone_layers_of_torchvision_and_timm_models(arch, layers, first, last):
    model, head, _ = build_model(arch, "none", 101)
    found = backbone_layers(model, head)
    assert len(found) == layers and found[0] == first
    assert found[-1] == last
    assert all(not name.startswith(head) for layer in found for name in layer)


@pytest.mark.parametrize("arch", ["resnet18", "timm/resnet18"])
def test_freezing_the_first_layers_trains_only_layer3_layer4_and_the_head(arch):
    model, head, _ = build_model(arch, "none", 101)
    frozen = freeze_layers(model, head, 3)  # stem, layer1, layer2
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4", "fc"}
    set_train_mode(model, frozen, freeze_bn=False)
    assert not model.layer1.training and not model.bn1.training and model.layer3.training
    with pytest.raises(ModelError, match="train.frozen_layers: 6 is more than the 5 layers"):
        freeze_layers(model, head, 6)


def test_frozen_bn_statistics_do_not_move():
    model, _, _ = build_model("resnet18", "none", 101)
    before = model.bn1.running_mean.clone()
    set_train_mode(model, [], freeze_bn=True)
    model(torch.randn(4, 3, 64, 64) * 5 + 3)
    torch.testing.assert_close(model.bn1.running_mean, before)
    set_train_mode(model, [], freeze_bn=False)
    model(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert not torch.equal(model.bn1.running_mean, before)


def test_the_offline_weights_message_ends_on_a_whole_word():
    from transferlab.models import _unreachable_weights

    reason = (
        "We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
        "cached files. Check your internet connection or see how to run the library in offline mode at "
        "'https://huggingface.co/docs/huggingface_hub/package_reference/environment_variables'; try again"
    )
    message = str(_unreachable_weights("timm/x", "the cache", OSError(reason)))
    shown = message.split("(OSError: ", 1)[1].split("). Looked for", 1)[0]
    kept = shown.removesuffix(" …")
    assert shown.endswith(" …") and reason.startswith(kept), shown
    assert reason[len(kept)] == " ", "cut between words"
