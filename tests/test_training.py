"""Every training mode and option, on tiny generated data: what each one must change, and what it must not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
import yaml

from conftest import recipe, tiny_params
from transferlab import training
from transferlab.config import MODEL_NAMES, parse_params
from transferlab.device import cpu_supports_bf16
from transferlab.errors import ConfigError, ModelError
from transferlab.inference import predict_logits
from transferlab.inputs import BatchAugmenter, Preprocessing, epoch_order
from transferlab.model_card import EvalInput
from transferlab.optim import LrSchedule, build_optimizer
from transferlab.paths import FEATURES_DIR, checkpoint_path, resume_path, train_dir
from transferlab.run import Run
from transferlab.splits import load_features, load_split
from transferlab.stages import features
from transferlab.trained_model import TrainedModel

PREP = Preprocessing((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 0.875)


def trained_state(run: str = "finetune") -> dict:
    return torch.load(checkpoint_path(run), weights_only=True)["model"]


def logged(run: str, metric: str) -> list[float]:
    rows = (train_dir(run) / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()[1:]
    return [float(row.split("\t")[1]) for row in rows]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.float(), b.float())


def test_finetune_trains_every_layer_and_keeps_batch_norm_statistics(project):
    project(mode="finetune")
    training.fit("finetune")
    state, pretrained = trained_state(), project.weights
    assert not same(state["conv1.weight"], pretrained["conv1.weight"])
    assert not same(state["layer4.1.conv2.weight"], pretrained["layer4.1.conv2.weight"])
    assert same(
        state["layer2.0.bn1.running_mean"], pretrained["layer2.0.bn1.running_mean"]
    )  # freeze_bn_stats


def test_partial_unfreezing_trains_only_layer3_layer4_and_the_head(project):
    project(mode="finetune", frozen_layers=3, freeze_bn_stats=False)
    training.fit("finetune")
    state, pretrained = trained_state(), project.weights
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer2.1.bn2.running_var",
        "layer2.1.bn2.weight",
    ):
        assert same(state[key], pretrained[key]), f"{key} is in a frozen layer"
    for key in ("layer3.0.conv1.weight", "layer4.1.bn2.running_mean"):
        assert not same(state[key], pretrained[key]), f"{key} should train"


def test_feature_extract_without_augmentation_trains_the_head_on_cached_features(project):
    project(mode="feature_extract", augment=False, epochs=3)
    features.main()  # the head trains on the features stage's output: one way to compute frozen features
    best = training.fit("finetune")
    state, pretrained = trained_state(), project.weights
    assert all(same(state[k], v) for k, v in pretrained.items() if not k.startswith("fc."))
    val_features = torch.from_numpy(np.array(load_features("val")[0]))
    assert load_features("train").shape == (2, 3 * 4, 512) and val_features.shape == (3 * 2, 512)
    # the head trained on the frozen features gives the full model's logits
    trained = TrainedModel.load(checkpoint_path("finetune"), device="cpu")
    images, labels = load_split("val")
    logits = predict_logits(trained.model, images, EvalInput(trained.card.preprocessing, 32, True), 8)
    with torch.no_grad():
        torch.testing.assert_close(trained.model.fc(val_features), logits, rtol=1e-4, atol=1e-5)
    assert (logits.argmax(1).numpy() == labels).mean() == pytest.approx(best["val_acc"])


def test_feature_extract_cache_needs_a_final_linear_head(project, tiny_folder):
    project(mode="feature_extract", augment=False)
    with open("params.yaml") as file:
        params = yaml.safe_load(file)
    params["model"] = {"arch": "squeezenet1_1", "weights": project.weights_path}
    squeezenet = torchvision.models.squeezenet1_1().state_dict()
    torch.save(squeezenet, project.weights_path)
    with open("params.yaml", "w") as f:
        yaml.safe_dump(params, f)
    with pytest.raises(ModelError, match="frozen features are what the final Linear layer receives"):
        features.main()


def test_feature_extract_with_augmentation_keeps_the_whole_backbone_fixed(project):
    project(mode="feature_extract", augment=True)
    training.fit("finetune")
    state, pretrained = trained_state(), project.weights
    assert all(same(state[k], v) for k, v in pretrained.items() if not k.startswith("fc."))
    assert not same(state["fc.weight"], train_head_init())
    assert not FEATURES_DIR.exists(), "with augmentation every step runs the backbone"


def train_head_init() -> torch.Tensor:
    torch.manual_seed(0)
    from transferlab.models import build_model

    return build_model("resnet18", "none", 3)[0].fc.weight


def test_scratch_ignores_the_fine_tuning_mode_and_pretrained_weights(project):
    project(mode="feature_extract", frozen_layers=0)
    training.fit("scratch")
    checkpoint = torch.load(checkpoint_path("scratch"), weights_only=True)
    assert checkpoint["mode"] == "scratch" and checkpoint["weights"] == "none"


def test_same_params_give_the_same_metrics_and_weights(project):
    project(epochs=2, auto_augment="trivialaugment", mixup_alpha=0.2)
    training.fit("finetune")
    first, first_state = logged("finetune", "train/loss") + logged("finetune", "val/loss"), trained_state()
    training.fit("finetune")
    assert logged("finetune", "train/loss") + logged("finetune", "val/loss") == first
    assert all(torch.equal(first_state[k], v) for k, v in trained_state().items())


def test_every_augmentation_and_option_together(project):
    project(
        epochs=2,
        batch_size=4,
        rotation_degrees=15,
        color_jitter=0.3,
        auto_augment="randaugment",
        random_erasing=0.5,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        balanced_sampling=True,
        grad_clip_norm=1.0,
        optimizer="adamw",
        lr=0.001,
        schedule="linear",
        warmup_steps=2,
    )
    training.fit("finetune")
    assert len(logged("finetune", "train/loss")) == 2 and all(np.isfinite(logged("finetune", "train/loss")))
    assert logged("finetune", "lr/head")[0] == pytest.approx(0.001 * 0.01)  # warm-up starts at 1 %


@pytest.mark.parametrize("mode", ["finetune", "feature_extract"])
def test_torch_compile(project, mode):
    project(mode=mode, compile=True, epochs=2)
    training.fit("finetune")
    assert len(logged("finetune", "val/acc")) == 2


def test_early_stopping_ends_the_run_when_validation_stops_improving(project):
    project(epochs=6, lr=1e-12, early_stopping_patience=2)
    best = training.fit("finetune")
    summary = json.loads((train_dir("finetune") / "metrics.json").read_text())
    assert summary["epochs_run"] == 3 and best["epoch"] == 1
    assert not resume_path("finetune").exists()


def test_a_run_is_named_and_keyed_once_for_the_model_and_its_holdout_twin():
    params = parse_params(tiny_params())
    run, twin = Run.of(params, "finetune"), Run.of(params, "finetune", holdout=True)
    assert (run.name, run.probe, run.key("lr")) == ("finetune", "probe", "train.lr")
    assert (twin.name, twin.probe, twin.key("lr")) == ("finetune_holdout", "probe_holdout", "train.lr")
    scratch = Run.of(params, "scratch")
    assert (scratch.key("batch_size"), scratch.weights, scratch.cfg.mode) == (
        "scratch.batch_size",
        "none",
        "scratch",
    )
    assert run.with_recipe(lr=0.5).cfg.lr == 0.5 and run.cfg.lr != 0.5
    assert training.logged_metric({"val/acc": 0.5, "val/loss": 1.0}, "val_loss") == 1.0
    assert training.logged_metric({"train/loss": 1.0}, "val_acc") is None


def test_chance_is_a_margin_over_a_uniform_guess_judged_on_enough_images():
    assert training.chance_bar(2) == pytest.approx(0.55) and training.chance_bar(3) == pytest.approx(0.4)
    assert training.chance_bar(101) == pytest.approx(1.5 / 101)
    assert training.at_chance(7, 505, 101) and not training.at_chance(8, 505, 101)
    assert not training.at_chance(0, training.MIN_CHECKED - 1, 3), "too few images to tell"
    labels = np.array([0, 1, 0, 2, 1, 0, 0, 2])
    np.testing.assert_array_equal(training.sample_per_class(labels, 2), [0, 1, 2, 3, 4, 7])


def test_a_run_that_unlearned_fails_writes_no_model_and_can_be_kept_on_purpose(project, monkeypatch):
    """One step at lr 1e9 from the probe: the loss of that step is finite (it is computed before the update)
    and the accuracy logged during the epoch looks fine, but the model as saved is at chance or worse."""
    from transferlab.errors import UnlearnedError
    from transferlab.stages import probe

    monkeypatch.setattr(training, "MIN_CHECKED", 10)  # the tiny project's 15 sampled images
    project(init_head="probe", train_on_val=True, epochs=1, lr=1e9, batch_size=32, probe={"C": [1.0]})
    features.main()
    probe.main()
    with pytest.raises(UnlearnedError, match="finetune did not learn: .*TRANSFERLAB_KEEP_UNLEARNED=1"):
        training.fit("finetune")
    assert not checkpoint_path("finetune").exists()

    monkeypatch.setenv(training.KEEP_UNLEARNED_ENV, "1")
    training.fit("finetune")
    assert torch.load(checkpoint_path("finetune"), weights_only=False)["at_chance"] is True


def test_a_model_recorded_at_chance_is_flagged_by_evaluate_predict_and_the_comparison(project, caplog):
    from transferlab.stages import compare, evaluate
    from transferlab.tools import cli

    project(epochs=1)
    training.fit("finetune")
    path = checkpoint_path("finetune")
    assert torch.load(path, weights_only=False)["at_chance"] is False, "15 images cannot tell: not flagged"
    checkpoint = torch.load(path, weights_only=False)
    torch.save({**checkpoint, "at_chance": True}, path)
    assert evaluate.evaluate("finetune")["at_chance"] is True
    with pytest.raises(SystemExit):
        cli.main(["predict", "images/class_0", "--model", str(path)])
    assert "ended at chance in training (kept on purpose)" in caplog.text
    results = {
        "finetune": {"mean_per_class_acc": 0.3, "top1": 0.3, "at_chance": True},
        "scratch": {"mean_per_class_acc": 0.3, "top1": 0.3},
    }
    table = compare.metrics_table(results, MODEL_NAMES)
    assert "ended at chance in training" in table.rows[0][0] and "chance" not in table.rows[1][0]


def test_unavailable_precision_and_device_fail_before_any_work(project):
    project(runtime={"precision": "fp16"})
    with pytest.raises(ConfigError, match="runtime.precision: fp16 needs a CUDA device"):
        training.fit("finetune")
    if not torch.cuda.is_available():
        project(runtime={"precision": "fp32", "device": "cuda"})
        with pytest.raises(
            ConfigError, match="runtime.device: cuda is not available on this machine; available: auto, cpu"
        ):
            training.fit("finetune")
    if not cpu_supports_bf16():
        project(runtime={"precision": "bf16", "device": "cpu"})
        with pytest.raises(ConfigError, match="runtime.precision: this cpu has no native bf16 support"):
            training.fit("finetune")
    assert not train_dir("finetune").exists()


def test_bf16_autocast_path_where_the_cpu_has_native_bf16(project, monkeypatch):
    """The bf16 code path, run on this CPU even without native support (emulated: slow but correct)."""
    monkeypatch.setattr("transferlab.device.cpu_supports_bf16", lambda: True)
    project(runtime={"precision": "bf16", "device": "cpu"}, epochs=1)
    training.fit("finetune")
    assert np.isfinite(logged("finetune", "train/loss")).all()
    assert (
        torch.load(checkpoint_path("finetune"), weights_only=True)["model"]["fc.weight"].dtype
        == torch.float32
    )


def test_augmentation_draws_per_image_on_whole_batches():
    cfg = recipe(image_size=24, crop_scale_min=0.2, auto_augment="trivialaugment", mixup_alpha=0.4)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    batch, labels = image.expand(4, 3, 40, 40).clone(), torch.tensor([0, 1, 2, 0])
    inputs, targets = BatchAugmenter(cfg, PREP, num_classes=3, cache_size=40, channels_last=False)(
        batch, labels
    )
    assert inputs.shape == (4, 3, 24, 24) and inputs.dtype == torch.float32
    assert len({tuple(x.flatten()[:50].tolist()) for x in inputs}) == 4, "each image gets its own crop"
    assert targets.shape == (4, 3) and torch.allclose(
        targets.sum(1), torch.ones(4)
    )  # MixUp: class probabilities
    plain = BatchAugmenter(recipe(image_size=24, augment=False), PREP, 3, 40, channels_last=False)
    fixed, same_labels = plain(batch, labels)
    assert torch.equal(fixed[0], fixed[3]) and torch.equal(same_labels, labels)


@pytest.mark.parametrize("auto_augment", ["trivialaugment", "randaugment"])
def test_every_per_image_augmentation_runs_with_bicubic_weights(auto_augment):
    """timm's EfficientNet weights ask for bicubic, which tensor rotation and auto-augment ops refuse."""
    bicubic = Preprocessing(PREP.mean, PREP.std, "bicubic", PREP.crop_pct)
    cfg = recipe(image_size=24, rotation_degrees=15, auto_augment=auto_augment)
    augment = BatchAugmenter(cfg, bicubic, num_classes=3, cache_size=40, channels_last=False)
    torch.manual_seed(0)
    for _ in range(10):  # an auto-augment op is drawn per image: draw many
        batch = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)
        inputs, _ = augment(batch, torch.zeros(8, dtype=torch.long))
        assert inputs.shape == (8, 3, 24, 24) and torch.isfinite(inputs).all()


def test_balanced_sampling_draws_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([epoch_order(labels, generator, balanced=True) for _ in range(20)])
    assert 0.45 < (labels[drawn.numpy()] == 1).mean() < 0.55
    shuffled = epoch_order(labels, generator, balanced=False)
    assert sorted(shuffled.tolist()) == list(range(100))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("sgd", {"nesterov": True}),
        ("adam", {}),
        ("adamw", {}),
        ("rmsprop", {"momentum": 0.9}),
        ("adagrad", {}),
        ("adadelta", {}),
    ],
)
def test_optimizers(name, options):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = build_optimizer(
        [{"params": [weight], "lr": 0.1, "weight_decay": 0.01}], recipe(optimizer=name, lr=0.1)
    )
    assert type(optimizer).__name__.lower() == name
    for key, value in options.items():
        assert optimizer.defaults[key] == value
    (weight**2).sum().backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), torch.ones(3))


def lr_per_epoch(steps_per_epoch: int = 4, monitored: list[float] | None = None, **cfg) -> list[float]:
    """The learning rate at the start of each epoch under the schedule of ``cfg``."""
    cfg = recipe(lr=1.0, **cfg)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = LrSchedule(optimizer, cfg, steps_per_epoch)
    rates = []
    for epoch in range(cfg.epochs):
        rates.append(round(optimizer.param_groups[0]["lr"], 6))
        for _ in range(steps_per_epoch):
            optimizer.step()
            schedule.step()
        schedule.end_epoch(monitored[epoch] if monitored else None)
    return rates


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"schedule": "constant"}, [1, 1, 1, 1]),
        ({"schedule": "step", "step_epochs": 2, "gamma": 0.5}, [1, 1, 0.5, 0.5]),
        ({"schedule": "multistep", "milestones": [1, 3], "gamma": 0.1}, [1, 0.1, 0.1, 0.01]),
        ({"schedule": "exponential", "gamma": 0.5}, [1, 0.5, 0.25, 0.125]),
        ({"schedule": "linear"}, [1, 0.75, 0.5, 0.25]),
        ({"schedule": "cosine"}, [1, 0.853553, 0.5, 0.146447]),
        ({"schedule": "cosine", "warmup_epochs": 1.0}, [0.01, 1, 0.75, 0.25]),
        ({"schedule": "constant", "warmup_steps": 2}, [0.01, 1, 1, 1]),
        ({"schedule": "step", "step_epochs": 2, "gamma": 0.5, "warmup_epochs": 1.0}, [0.01, 1, 0.5, 0.5]),
        ({"schedule": "exponential", "gamma": 0.5, "warmup_steps": 2}, [0.01, 0.5, 0.25, 0.125]),
        (
            {"schedule": "multistep", "milestones": [2], "gamma": 0.1, "warmup_epochs": 1.0},
            [0.01, 1, 0.1, 0.1],
        ),
        (
            {"schedule": "plateau", "gamma": 0.5, "plateau_patience": 0, "monitored": [0.5, 0.6, 0.6, 0.6]},
            [1, 1, 1, 0.5],
        ),
    ],
)
def test_schedules(cfg, expected):
    monitored = cfg.pop("monitored", None)
    assert lr_per_epoch(epochs=4, monitored=monitored, **cfg) == pytest.approx(expected, abs=1e-6)


def test_tensorboard_logs_what_dvclive_logs_and_changes_nothing_else(project, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project(epochs=2)
    training.fit("finetune")
    without = trained_state()
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["logging"] = {"tensorboard": True}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    training.fit("finetune")
    assert all(torch.equal(without[k], v) for k, v in trained_state().items())

    events = EventAccumulator(str(train_dir("finetune") / "tensorboard")).Reload()
    for metric in ("train/loss", "val/acc", "lr/head", "lr/backbone"):
        scalars = events.Scalars(metric)
        assert [s.step for s in scalars] == [0, 1]
        assert [s.value for s in scalars] == pytest.approx(logged("finetune", metric))
    assert events.Tags()["images"] and events.Tags()["tensors"], "training images and the params as text"
