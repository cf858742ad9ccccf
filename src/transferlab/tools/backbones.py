"""The backbone study: which pretrained network, resolution and feature layers a CPU user should take.

    transferlab backbones [--arch timm/tf_efficientnet_lite0 ...] [--out metrics/backbones]

On the images ``prepare`` cached (``data/prepared``; its cache must hold the largest resolution without
upsampling, and the error says how large), for each architecture with its ImageNet weights, at 224 px and
at its native resolution (its pretrained config's):

1. one pass over the train, validation and test images and their mirror images (the features stage's
   views, through ONNX Runtime where it matches eager PyTorch) that keeps, beside what the head receives,
   the pooled outputs of the last blocks (:func:`models.tap_candidates`);
2. the linear probe of the ``train_probe`` stage (mirror images as extra samples, flip-averaged
   validation, ``probe.C`` of params.yaml, standardised features) on the head's features alone and with
   the last 1, 2, 3 blocks' pooled outputs beside them: every point scored on validation (``probes.csv``);
3. per architecture and resolution, the layers and C that validation picks, refitted on train +
   validation and scored once on the test split (mean per-class accuracy, flip TTA);
4. what it costs here: milliseconds per image on the fastest path at batch 1 and batched, the pass's
   time and the probe fits'.

Results: ``backbones.md`` / ``backbones.json`` (the table, the command, the cache size) and
``backbones.png`` (test accuracy against milliseconds per image, ResNet-50's published figures as lines).
Timings mean something only on a quiet machine: ``--retime`` measures them again for the settings
``backbones.json`` holds (a minute or two) and rewrites the table and the picture, accuracies untouched.

Fine-tuning a backbone (LP-FT) is the pipeline's own run at that backbone's params (docs/results.md gives
the commands); ``--record-finetune`` keeps the workspace's finished run as a point of the study
(``lpft_<arch>_<px>/``: each stage's metrics and the params that made them), drawn beside the probes.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from .. import cores
from ..config import ProbeConfig, load_params, read_params_file
from ..errors import ConfigError
from ..fileio import read_json, write_csv, write_json, write_text
from ..inference import choose_runner, predict_views
from ..inputs import check_cache
from ..linear_probe import as_samples, choose_c, fit_head, scored
from ..model_card import EvalInput
from ..models import build_model, native_size, tap_candidates, with_layers
from ..paths import FEATURES_REPORT, evaluation_dir, holdout, train_dir
from ..splits import SPLITS, load_classes, load_split

log = logging.getLogger("transferlab.tools.backbones")
# ImageNet-1k top-1 as timm publishes it (its results tables; not measured here)
PUBLISHED_TOP1 = {
    "timm/tf_efficientnet_lite0": 74.8,
    "timm/tf_efficientnet_lite1": 76.6,
    "timm/tf_efficientnet_lite2": 77.5,
}
# ResNet-50 (25.6 M parameters) on this protocol (30 per class, mean per-class): Kornblith, Shlens & Le,
# "Do Better ImageNet Models Transfer Better?", CVPR 2019
RESNET50 = {"fine-tuned": 93.3, "linear probe": 94.5}
MAX_TAPS = 3
BATCH = 64
BATCH1_RUNS = 30
# An LP-FT point of the study: the pipeline's stages that make it, and the metrics kept of each
FINETUNE_STAGES = ("holdout_finetune", "evaluate@probe", "evaluate@finetune")
FINETUNE_METRICS = {
    "features": FEATURES_REPORT,
    "train_probe": train_dir("probe") / "metrics.json",
    "train_finetune": train_dir("finetune") / "metrics.json",
    "train_finetune_holdout": train_dir(holdout("finetune")) / "metrics.json",
    "test_probe": evaluation_dir("probe") / "metrics.json",
    "test_finetune": evaluation_dir("finetune") / "metrics.json",
}
# the params an LP-FT point records: what sets its network and its recipe
FINETUNE_PARAMS = (
    "data.cache_size",
    "model.arch",
    "features.image_size",
    "features.layers",
    "train.frozen_layers",
    "train.epochs",
    "train.lr",
    "train.image_size",
    "train.eval_image_size",
)


def mean_per_class(labels: np.ndarray, predictions: np.ndarray) -> float:
    """The evaluate stage's metric (scikit-learn's balanced accuracy: the mean of the per-class recalls)."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, predictions))


def milliseconds_per_image(model: torch.nn.Module, size: int, channels_last: bool) -> dict:
    """The fastest path's time per image (ONNX Runtime on a CPU where it matches eager), batch 1 and
    batched: the median of repeated runs on random inputs."""
    model.eval()
    batch = torch.randn(BATCH, 3, size, size)
    with torch.inference_mode():
        run, path = choose_runner(model, batch, 10**6, channels_last)
        figures = {"inference_path": path}
        for label, inputs, repeats in (("batch1", batch[:1], BATCH1_RUNS), (f"batch{BATCH}", batch, 3)):
            run(inputs)  # warm-up
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                run(inputs)
                times.append(time.perf_counter() - started)
            figures[f"ms_per_image_{label}"] = round(1000 * float(np.median(times)) / len(inputs), 2)
    return figures


def pooled_features(arch: str, size: int, channels_last: bool, classes: int) -> tuple[dict, list, dict]:
    """The split features (views x N x D: centre crop, mirror image) of the taps and the head's input,
    the (name, dims) of each part in column order, and the network's facts and timings."""
    torch.manual_seed(0)
    model, head, prep = build_model(arch, "imagenet", classes)
    parameters = sum(p.numel() for p in model.parameters())  # with the fresh 101-way head
    timing = milliseconds_per_image(model, size, channels_last)
    taps = tap_candidates(model, head)[-MAX_TAPS:]
    net = with_layers(model, head, taps, classes, arch)
    started, features = time.perf_counter(), {}
    for split in SPLITS:
        images, _ = load_split(split)
        check_cache(size, prep, images.shape[1])
        eval_input = EvalInput(prep, size, channels_last)
        description = f"{arch} {size} px {split}"
        features[split] = predict_views(
            net, images, eval_input, BATCH, description, inputs_of=net.head, flip=True
        ).numpy()
    facts = {"parameters": parameters, "features_s": round(time.perf_counter() - started, 1), **timing}
    return features, [*zip(taps, net.dims[:-1], strict=True), ("head", net.dims[-1])], facts


def columns(parts: list[tuple[str, int]], kept: list[str]) -> np.ndarray:
    """The feature columns of the ``kept`` parts."""
    ends = np.cumsum([dims for _, dims in parts])
    return np.concatenate(
        [np.arange(end - dims, end) for (name, dims), end in zip(parts, ends, strict=True) if name in kept]
    )


def layer_choices(parts: list[tuple[str, int]]) -> list[list[str]]:
    """The head's features alone, then with the last 1, 2, ... blocks' pooled outputs beside them."""
    taps = [name for name, _ in parts[:-1]]
    return [[*taps[len(taps) - k :], "head"] if k else ["head"] for k in range(len(taps) + 1)]


def study_point(features: dict, labels: dict, parts: list, cfg: ProbeConfig, classes: int) -> list[dict]:
    """Every layer choice's probe, C chosen on validation; then the best choice refitted on train +
    validation and scored once on test."""
    rows = []
    for kept in layer_choices(parts):
        keep = columns(parts, kept)
        train = as_samples(features["train"][..., keep], labels["train"], cfg.flip)
        val = (scored(features["val"][..., keep], cfg.flip), labels["val"])
        started = time.perf_counter()
        _, chosen, _ = choose_c(train, val, classes, cfg)
        rows.append(
            {
                "layers": "+".join(kept),
                "dims": len(keep),
                "C": chosen["C"],
                "val_acc": chosen["val_acc"],
                "val_loss": chosen["val_loss"],
                "fit_s": round(time.perf_counter() - started, 1),
            }
        )
    best = max(rows, key=lambda r: (r["val_acc"], -r["val_loss"]))  # ties: the lower validation loss
    keep = columns(parts, best["layers"].split("+"))
    train_val = np.concatenate([features["train"][..., keep], features["val"][..., keep]], axis=1)
    head = fit_head(
        *as_samples(train_val, np.concatenate([labels["train"], labels["val"]]), cfg.flip),
        classes,
        best["C"],
        cfg.max_iter,
    )
    predictions = head.logits(scored(features["test"][..., keep], True)).argmax(1)  # flip TTA
    best["test_mean_per_class"] = mean_per_class(labels["test"], predictions)
    best["test_top1"] = float((predictions == labels["test"]).mean())
    return rows


def study(archs: list[str], out: Path, command: str) -> dict:
    params = load_params()
    cfg, channels_last = params.probe, params.runtime.channels_last
    threads = cores.use(params.runtime.threads)
    if not cfg.flip:
        raise ConfigError("probe.flip: the study scores flip-averaged views; set it to true")
    classes = load_classes()
    labels = {split: load_split(split)[1] for split in SPLITS}
    cache = load_split("train")[0].shape[1]
    points, every = [], []
    for arch in archs:
        for size in sorted({224, native_size(arch)}):
            log.info("%s at %d px", arch, size)
            features, parts, facts = pooled_features(arch, size, channels_last, len(classes))
            rows = study_point(features, labels, parts, cfg, len(classes))
            chosen = next(r for r in rows if "test_mean_per_class" in r)
            every += [{"arch": arch, "image_size": size, **r} for r in rows]
            points.append(
                {
                    "arch": arch,
                    "image_size": size,
                    "imagenet_top1": PUBLISHED_TOP1.get(arch),
                    **facts,
                    **chosen,
                    "head_only_val_acc": rows[0]["val_acc"],
                }
            )
            log.info("%s", points[-1])
    results = {
        "command": command,
        "cache_size": cache,
        "threads": threads,
        "probe": vars(cfg),
        "points": points,
    }
    out.mkdir(parents=True, exist_ok=True)
    keys = ["arch", "image_size", "layers", "dims", "C", "val_acc", "val_loss", "fit_s"]
    write_csv(out / "probes.csv", keys, ([row[k] for k in keys] for row in every))
    return results


def report(results: dict, out: Path) -> None:
    """``backbones.json`` from ``results``; the table and the picture from it and the LP-FT points kept in
    ``out``."""
    write_json(out / "backbones.json", results)
    finetuned = finetuned_points(out, results["points"])
    write_text(out / "backbones.md", markdown(results, finetuned))
    plot(results["points"], finetuned, out / "backbones.png")


def record_finetune(out: Path) -> Path:
    """Keep the workspace's LP-FT run as a point of the study: refused unless DVC finds the run's stages
    up to date with params.yaml, so that the params recorded are the ones that made the metrics."""
    if not (out / "backbones.json").is_file():
        raise ConfigError(f"--record-finetune: no study at {out}: run `transferlab backbones` first")
    status = subprocess.run(
        ["dvc", "status", "--json", "--with-deps", *FINETUNE_STAGES], capture_output=True, text=True
    )
    if status.returncode or json.loads(status.stdout or "{}"):
        raise ConfigError(
            "--record-finetune: the workspace's LP-FT results are not those of params.yaml "
            f"(dvc status: {(status.stdout or status.stderr).strip()[:300]}): run "
            f"`dvc repro {' '.join(FINETUNE_STAGES)}` first"
        )
    raw = read_params_file()
    params = {key: _dotted(raw, key) for key in FINETUNE_PARAMS}
    name = f"lpft_{params['model.arch'].split('/')[-1]}_{params['features.image_size']}"
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for stage, path in FINETUNE_METRICS.items():
        shutil.copyfile(path, folder / f"{stage}.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    write_json(folder / "run.json", {"commit": commit.stdout.strip(), "params": params})
    report(read_json(out / "backbones.json"), out)
    return folder


def _dotted(raw: dict, key: str):
    section, name = key.split(".")
    return raw[section][name]


def finetuned_points(out: Path, probes: list[dict]) -> list[dict]:
    """The LP-FT points kept in ``out`` (``lpft_*/``), with the CPU time of their probe's setting."""
    points = []
    for folder in sorted(out.glob("lpft_*/")):
        run = read_json(folder / "run.json")
        params = run["params"]
        m = {stage: read_json(folder / f"{stage}.json") for stage in FINETUNE_METRICS}
        arch, size = params["model.arch"], params["features.image_size"]
        timing = next((p for p in probes if p["arch"] == arch and p["image_size"] == size), {})
        points.append(
            {
                "arch": arch,
                "image_size": size,
                "layers": "+".join([*params["features.layers"], "head"]),
                "recipe": f"{params['train.epochs']} ep, lr {params['train.lr']:g}, "
                f"{params['train.frozen_layers']} frozen, {params['train.image_size']} px",
                "probe_val_acc": m["train_probe"]["best/val_acc"],
                "val_acc": m["train_finetune_holdout"]["best/val_acc"],
                "probe_test": m["test_probe"]["mean_per_class_acc"],
                "test_mean_per_class": m["test_finetune"]["mean_per_class_acc"],
                "test_top1": m["test_finetune"]["top1"],
                "train_s": m["train_finetune"]["wall_time_s"],
                "holdout_s": m["train_finetune_holdout"]["wall_time_s"],
                f"ms_per_image_batch{BATCH}": timing.get(f"ms_per_image_batch{BATCH}"),
                "commit": run["commit"],
            }
        )
    return points


def markdown(results: dict, finetuned: list[dict]) -> str:
    timed = results.get("timing_command", results["command"])
    lines = [
        f"Made by `{results['command']}` on the images prepared at {results['cache_size']} px; CPU times by "
        f"`{timed}` ({results.get('threads', '?')} threads). Linear probes: layers and C chosen on "
        "validation, test scored once (mean per-class, flip TTA).",
        "",
        "| backbone | px | parameters | ImageNet top-1 | layers | C | validation (head only) | test mean "
        "per-class | test top-1 | ms/image batch 1 | ms/image batched | features pass (study run) | path |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in results["points"]:
        top1 = f"{p['imagenet_top1']} %" if p["imagenet_top1"] else "—"
        lines.append(
            f"| {p['arch']} | {p['image_size']} | {p['parameters'] / 1e6:.2f} M | {top1} | {p['layers']} | "
            f"{p['C']:g} | {100 * p['val_acc']:.2f} % ({100 * p['head_only_val_acc']:.2f} %) | "
            f"{100 * p['test_mean_per_class']:.2f} % | {100 * p['test_top1']:.2f} % | "
            f"{p['ms_per_image_batch1']} | {p[f'ms_per_image_batch{BATCH}']} | {p['features_s']} s | "
            f"{p['inference_path']} |"
        )
    if finetuned:
        lines += [
            "",
            "LP-FT: the pipeline's fine-tune from the probe on the same layers (`transferlab backbones "
            "--record-finetune` after its run; `lpft_*/run.json` holds the params and the commit). "
            "Validation: the holdout twins' best epoch and the probe's chosen C.",
            "",
            "| backbone | px | layers | recipe | validation: probe / LP-FT | test mean per-class: probe / "
            "LP-FT | LP-FT test top-1 | fine-tune training s (final fit + holdout twin) | commit |",
            "|---|---:|---|---|---:|---:|---:|---:|---|",
        ]
        for p in finetuned:
            lines.append(
                f"| {p['arch']} | {p['image_size']} | {p['layers']} | {p['recipe']} | "
                f"{100 * p['probe_val_acc']:.2f} % / {100 * p['val_acc']:.2f} % | "
                f"{100 * p['probe_test']:.2f} % / {100 * p['test_mean_per_class']:.2f} % | "
                f"{100 * p['test_top1']:.2f} % | {p['train_s']} + {p['holdout_s']} | {p['commit']} |"
            )
    return "\n".join(lines) + "\n"


def plot(points: list[dict], finetuned: list[dict], path: Path) -> None:
    from ..figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ms = f"ms_per_image_batch{BATCH}"
    for arch in dict.fromkeys(p["arch"] for p in points):
        mine = [p for p in points if p["arch"] == arch]
        xs = [p[ms] for p in mine]
        (line,) = ax.plot(
            xs, [100 * p["test_mean_per_class"] for p in mine], "o-", label=arch.removeprefix("timm/")
        )
        for x, p in zip(xs, mine, strict=True):
            ax.annotate(f"{p['image_size']} px", (x, 100 * p["test_mean_per_class"]), fontsize=8)
        tuned = [p for p in finetuned if p["arch"] == arch and p[ms] is not None]
        ax.plot(
            [p[ms] for p in tuned],
            [100 * p["test_mean_per_class"] for p in tuned],
            "s",
            color=line.get_color(),
        )
    if finetuned:
        ax.plot([], [], "s", color="black", label="LP-FT (squares; circles: the probes)")
    for (name, value), style in zip(RESNET50.items(), ("--", ":"), strict=True):
        ax.axhline(value, color="grey", linestyle=style, label=f"ResNet-50 {name} (published)")
    ax.set_xlabel(f"CPU milliseconds per image (batch {BATCH}, this machine)")
    ax.set_ylabel("test mean per-class accuracy (%)")
    ax.set_title("Linear probes (layers and C chosen on validation) and LP-FT")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def retime(out: Path) -> dict:
    """The CPU time per image of every setting in ``out/backbones.json``, measured again; the table and the
    picture rewritten with them."""
    path = out / "backbones.json"
    if not path.is_file():
        raise ConfigError(f"--retime: no study at {path}: run `transferlab backbones` first")
    results = read_json(path)
    params = load_params()
    results["threads"] = cores.use(params.runtime.threads)
    for point in results["points"]:
        torch.manual_seed(0)
        model, _, _ = build_model(point["arch"], "imagenet", 101)
        point.update(milliseconds_per_image(model, point["image_size"], params.runtime.channels_last))
        log.info("%s at %d px: %s", point["arch"], point["image_size"], point)
    results["timing_command"] = f"transferlab backbones --retime --out {out}"
    report(results, out)
    return results


def run(archs: list[str], out: Path) -> dict:
    command = shlex.join(["transferlab", "backbones", "--arch", *archs, "--out", str(out)])
    started = time.perf_counter()
    results = study(archs, out, command)
    minutes = (time.perf_counter() - started) / 60
    best = max(results["points"], key=lambda p: p["val_acc"])
    print(
        f"{out / 'backbones.md'}: {len(results['points'])} settings in {minutes:.1f} min; validation picks "
        f"{best['arch']} at {best['image_size']} px ({best['layers']}): "
        f"{100 * best['test_mean_per_class']:.2f} % test mean per-class"
    )
    results["wall_time_min"] = round(minutes, 1)
    report(results, out)
    return results
