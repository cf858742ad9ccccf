"""``transferlab``: use any trained model (a ``model.pt`` a training stage wrote) outside the pipeline.

transferlab predict IMAGE_OR_FOLDER... --model data/models/finetune/model.pt --topk 5 [--csv F] [--json F]
transferlab gradcam IMAGE --model PATH [--class NAME] [--layer NAME] [--out gradcam.png]
transferlab feature-maps IMAGE --model PATH [--layer NAME] [--count 16] [--out feature-maps.png]
transferlab export --model PATH --format torchscript|onnx --out FILE [--check IMAGE_OR_FOLDER]
transferlab experiments [--json SHOWN] [--all-commits] [--out metrics/experiments] [--only NAME ...] [--table]
transferlab lr-find finetune|scratch [--steps 100] [--start 1e-5] [--end 1] [--seeds 3] [--out metrics/experiments/lr_find]
transferlab ensemble [--steps 11] [--tta flip] [--out metrics/experiments/ensemble]
transferlab smoke [--source FOLDER_OR_ARCHIVE]
transferlab backbones [--arch NAME ...] [--retime | --record-finetune] [--out metrics/backbones]
"""  # noqa: E501 (the usage lines are the --help description, printed as written)

from __future__ import annotations

import argparse
import difflib
import logging
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..config import TRAINED_MODELS, TTA
from ..entrypoint import run_stage
from ..errors import ConfigError, DatasetError, ModelError
from .predict import (
    every_image,
    find_images,
    format_predictions,
    predict,
    read_images,
    write_json_report,
    write_predictions_csv,
)

if TYPE_CHECKING:
    from ..trained_model import TrainedModel

DEFAULT_MODEL = "data/models/finetune/model.pt"
LAYER_HELP = "dotted module name (default: the last layer with a spatial output)"
BACKBONES = ("timm/tf_efficientnet_lite0", "timm/tf_efficientnet_lite1", "timm/tf_efficientnet_lite2")
log = logging.getLogger("transferlab")


def load_model(path: Path, **options) -> TrainedModel:
    """``TrainedModel.load``: torch and the model libraries load here, once a command runs."""
    from ..trained_model import TrainedModel

    return TrainedModel.load(path, **options)


def model_and_image(args) -> tuple[TrainedModel, np.ndarray]:
    """The ``--model`` and the IMAGE of a command that looks inside the model."""
    trained = load_model(args.model)
    _, images, failures = read_images([args.image], trained.card.cache_size)
    if failures:
        raise DatasetError(f"cannot read {failures[0][0]}: {failures[0][1]}")
    return trained, images


def class_index(classes: list[str], name: str) -> int:
    if name in classes:
        return classes.index(name)
    close = difflib.get_close_matches(name, classes, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; the model knows {len(classes)} classes"
    raise ModelError(f"--class {name!r} is not one of the model's classes{hint}")


def cmd_predict(args) -> int:
    paths, skipped = find_images(args.images)
    if not paths:  # nothing to predict: said before torch is imported
        raise DatasetError("; ".join(f"{path} {reason}" for path, reason in skipped))
    trained = load_model(args.model)
    if trained.card.at_chance:
        log.warning(
            "%s ended at chance in training (kept on purpose): its predictions mean nothing", args.model
        )
    result = predict(trained, paths, args.topk, args.batch_size, args.tta)
    result.failures[:0] = skipped
    if result.paths:
        print(format_predictions(result))
    for path, reason in result.failures:
        print(f"cannot read {path}: {reason}", file=sys.stderr)
    if args.csv:
        write_predictions_csv(args.csv, result)
    if args.json:
        write_json_report(args.json, result)
    log.info(
        "predicted %d image(s); %d path(s) skipped, each named above", len(result.paths), len(result.failures)
    )
    return 1 if result.failures else 0


def cmd_gradcam(args) -> int:
    from ..gradcam import plot_image_gradcam

    trained, image = model_and_image(args)
    probs = trained.probabilities(image)[0]
    target = class_index(trained.card.classes, args.target) if args.target else int(probs.argmax())
    plot_image_gradcam(args.out, trained, image, args.image.name, target, probs[target], args.layer)
    classes = trained.card.classes
    predicted = classes[int(probs.argmax())]
    print(f"{args.out}: Grad-CAM of {classes[target]} (p={probs[target]:.3f}); predicted {predicted}")
    return 0


def cmd_feature_maps(args) -> int:
    from ..gradcam import display_images, feature_maps, plot_feature_maps

    trained, image = model_and_image(args)
    layer, maps = feature_maps(trained, image, args.layer)
    plot_feature_maps(
        args.out, display_images(trained, image, trained.card.eval_image_size)[0], maps[0], layer, args.count
    )
    print(f"{args.out}: feature maps of {layer}, shape {tuple(maps.shape[1:])}")
    return 0


def cmd_export(args) -> int:
    from .export import ExportError, export

    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # the ONNX optimiser logs every pass at INFO
    trained = load_model(args.model, device="cpu")
    if args.check:
        _, sample, _ = read_images(every_image([args.check])[:16], trained.card.cache_size)
        if not len(sample):
            raise DatasetError(f"--check {args.check}: no readable image to compare on")
    else:  # random images: the check then compares logits, not meaningful predictions
        sample = np.random.default_rng(0).integers(
            0, 256, (4, trained.card.cache_size, trained.card.cache_size, 3), dtype=np.uint8
        )
    try:
        check = export(trained, args.format, args.out, sample)
    except ExportError as err:
        print(f"transferlab export: {err}", file=sys.stderr)
        return 1
    print(
        f"{args.out}: {args.format} export; on {check.images} image(s) the same top-1 for {check.same_top1}, "
        f"largest logit difference {check.max_abs_logit_diff:.2e}"
    )
    return 0


def cmd_experiments(args) -> int:
    from .experiments import ExperimentsError, summarize, table

    try:
        if args.table:
            print(table(args.shown_json, args.all_commits, args.only))
        else:
            summarize(args.shown_json, args.out, args.all_commits, args.only)
    except ExperimentsError as err:
        print(f"transferlab experiments: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_ensemble(args) -> int:
    from .ensemble import ensemble

    if args.steps < 2:
        raise ConfigError(f"--steps {args.steps}: need at least 2 (the probe alone and the fine-tuned alone)")
    command = shlex.join(["transferlab", "ensemble", "--steps", str(args.steps), "--tta", args.tta])
    found = ensemble(args.out, args.steps, args.batch_size, args.tta, command)
    weight, alone = found["best_probe_weight"], {1: "the probe alone", 0: "the fine-tuned model alone"}
    verdict = (
        f"no mix beats {alone[weight]}"
        if weight in alone
        else f"the best mix (probe weight {weight:g}) scores {100 * found['best_acc']:.2f} %"
    )
    print(
        f"{args.out / 'ensemble.png'}: on {found['val_images']} validation images (holdout twins, tta "
        f"{found['tta']}) the probe scores {100 * found['probe_acc']:.2f} %, the fine-tuned model "
        f"{100 * found['finetune_acc']:.2f} %; {verdict} (chosen on the same images). Both together: "
        f"{found['parameters'] / 1e6:.2f} M parameters ({found['shared_parameters'] / 1e6:.2f} M shared), "
        "two networks to run"
    )
    return 0


def cmd_smoke(args) -> int:
    from .smoke import launch

    return launch(args.source)


def cmd_backbones(args) -> int:
    from .backbones import record_finetune, retime, run

    if args.retime:
        retime(args.out)
    elif args.record_finetune:
        print(f"{record_finetune(args.out)}: kept; {args.out / 'backbones.md'} and the picture redrawn")
    else:
        run(args.arch, args.out)
    return 0


def cmd_lr_find(args) -> int:
    from .lrfind import find

    if not 0 < args.start < args.end:
        raise ConfigError(f"--start ({args.start:g}) and --end ({args.end:g}): need 0 < start < end")
    options = [
        "--steps",
        str(args.steps),
        "--start",
        f"{args.start:g}",
        "--end",
        f"{args.end:g}",
        "--seeds",
        str(args.seeds),
    ]
    command = shlex.join(["transferlab", "lr-find", args.model, *options])
    result = find(args.model, args.steps, args.start, args.end, args.seeds, args.out, command)
    summary = result["summary"]
    if summary["lr"] is None:
        print(f"{args.out / args.model}.png: no suggestion for {result['key']}: {summary['reason']}")
        return 0
    low, high = summary["spread"]
    print(
        f"{args.out / args.model}.png: suggested {result['key']} = {summary['lr']:.2g} "
        f"(median of {args.seeds} seeds, from {low:.2g} to {high:.2g}); "
        f"params.yaml has {result['params_lr']:g}"
    )
    return 0


def add_model(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--model",
        type=Path,
        default=Path(DEFAULT_MODEL),
        help=f"a trained model.pt (default: {DEFAULT_MODEL})",
    )


def add_tta(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--tta",
        choices=typing.get_args(TTA),
        default="flip",
        help="test-time augmentation, as evaluate's evaluate.tta (default: flip)",
    )


def add_out(sub: argparse.ArgumentParser, default: str) -> None:
    sub.add_argument("--out", type=Path, default=Path(default), help=f"output folder (default: {default})")


def predict_arguments(sub: argparse.ArgumentParser) -> None:
    add_model(sub)
    sub.add_argument(
        "images",
        type=Path,
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help="image files and folders (walked as prepare walks a class folder)",
    )
    sub.add_argument("--topk", type=int, default=5)
    sub.add_argument("--batch-size", type=int, default=32)
    add_tta(sub)
    sub.add_argument("--csv", type=Path, help="also write the predictions (and unreadable files) as CSV")
    sub.add_argument("--json", type=Path, help="also write them as JSON")


def gradcam_arguments(sub: argparse.ArgumentParser) -> None:
    add_model(sub)
    sub.add_argument("image", type=Path)
    sub.add_argument("--class", dest="target", help="class to explain (default: the predicted one)")
    sub.add_argument("--layer", help=LAYER_HELP)
    sub.add_argument("--out", type=Path, default=Path("gradcam.png"))


def feature_maps_arguments(sub: argparse.ArgumentParser) -> None:
    add_model(sub)
    sub.add_argument("image", type=Path)
    sub.add_argument("--layer", help=LAYER_HELP)
    sub.add_argument(
        "--count", type=int, default=16, help="channels shown (those with the highest mean activation)"
    )
    sub.add_argument("--out", type=Path, default=Path("feature-maps.png"))


def export_arguments(sub: argparse.ArgumentParser) -> None:
    add_model(sub)
    sub.add_argument("--format", choices=("torchscript", "onnx"), required=True)
    sub.add_argument("--out", type=Path, required=True)
    sub.add_argument(
        "--check",
        type=Path,
        metavar="IMAGE_OR_FOLDER",
        help="images to compare on (default: 4 random images)",
    )


def experiments_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--json", type=Path, dest="shown_json", help="a saved `dvc exp show --json` (default: run it here)"
    )
    sub.add_argument(
        "--all-commits", action="store_true", help="experiments of every commit, not only the current one"
    )
    add_out(sub, "metrics/experiments")
    sub.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="only these experiments (one grid of several queued together)",
    )
    sub.add_argument(
        "--table",
        action="store_true",
        help="print the experiments side by side (each model's validation accuracy, the params that vary), "
        "narrow enough for a terminal; writes nothing",
    )


def lr_find_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "model", choices=TRAINED_MODELS, help="finetune (the train: section, any mode) or scratch"
    )
    sub.add_argument("--steps", type=int, default=100, help="optimizer steps per test (default: 100)")
    sub.add_argument("--start", type=float, default=1e-5, help="first learning rate (default: 1e-5)")
    sub.add_argument("--end", type=float, default=1.0, help="last learning rate (default: 1)")
    sub.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="tests, each with its own seed; the median suggestion wins (default: 3)",
    )
    add_out(sub, "metrics/experiments/lr_find")


def ensemble_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--steps", type=int, default=11, help="probe weights tried, evenly from 0 to 1 (default: 11)"
    )
    sub.add_argument("--batch-size", type=int, default=64)
    add_tta(sub)
    add_out(sub, "metrics/experiments/ensemble")


def smoke_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--source", help="your own images (default: params.yaml's data.source)")


def backbones_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--arch",
        nargs="+",
        default=list(BACKBONES),
        help=f"model.arch names with ImageNet weights (default: {' '.join(BACKBONES)})",
    )
    sub.add_argument(
        "--retime",
        action="store_true",
        help="only measure the CPU time per image of the study in --out again (on a quiet machine)",
    )
    sub.add_argument(
        "--record-finetune",
        action="store_true",
        help="keep the workspace's LP-FT run (after `dvc repro holdout_finetune evaluate@probe "
        "evaluate@finetune` at a backbone's params) as a point of the study in --out",
    )
    add_out(sub, "metrics/backbones")


class Command(NamedTuple):
    """A ``transferlab`` command: what it runs, its one-line help and its arguments."""

    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS = (
    Command(
        "predict",
        cmd_predict,
        "top-k classes and probabilities of an image or of every image in a folder",
        predict_arguments,
    ),
    Command(
        "gradcam",
        cmd_gradcam,
        "Grad-CAM heatmap of an image for the predicted (or a chosen) class",
        gradcam_arguments,
    ),
    Command("feature-maps", cmd_feature_maps, "feature maps of a layer for an image", feature_maps_arguments),
    Command(
        "export",
        cmd_export,
        "export to TorchScript or ONNX and check it predicts what the model predicts",
        export_arguments,
    ),
    Command(
        "experiments",
        cmd_experiments,
        "summarise DVC experiments: plots against each varied param, each model's best setting chosen on "
        "validation",
        experiments_arguments,
    ),
    Command(
        "lr-find",
        cmd_lr_find,
        "learning-rate range test of a training run: loss against an exponentially rising lr, and a "
        "suggested lr",
        lr_find_arguments,
    ),
    Command(
        "ensemble",
        cmd_ensemble,
        "validation accuracy of the linear probe and fine-tuned model's averaged predictions, for probe "
        "weights from 0 to 1 (the holdout twins)",
        ensemble_arguments,
    ),
    Command(
        "smoke",
        cmd_smoke,
        "the whole pipeline in about 2 minutes (tiny splits, 96 px, 1 epoch): a DVC experiment",
        smoke_arguments,
    ),
    Command(
        "backbones",
        cmd_backbones,
        "the backbone study: linear probes of each ImageNet network at 224 px and its native resolution, "
        "on its head's features and with its last blocks' beside them, chosen on validation, scored on "
        "test, with CPU milliseconds per image",
        backbones_arguments,
    ),
)


def parser() -> argparse.ArgumentParser:
    main_parser = argparse.ArgumentParser(
        prog="transferlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = main_parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.arguments(sub)
        sub.set_defaults(handler=command.run)
    return main_parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    for option in ("topk", "batch_size", "count", "steps", "seeds"):
        if getattr(args, option, 1) < 1:
            raise SystemExit(f"transferlab {args.command}: --{option.replace('_', '-')} must be at least 1")
    status = 0

    def run_command() -> None:
        nonlocal status
        status = args.handler(args)

    batch_setting = (lambda: ("--batch-size", args.batch_size)) if hasattr(args, "batch_size") else None
    run_stage(f"transferlab {args.command}", run_command, batch_setting)
    sys.exit(status)


if __name__ == "__main__":
    main()
