"""Throughput and experiment overheads on this machine (a benchmark, not a test: it reports, never asserts).

    python -m transferlab.tools.benchmark --arch timm/tf_efficientnet_lite0 --image-size 160 \\
        --batch-size 32 \\
        --jpeg-folder ../shared/datasets/caltech-101/101_ObjectCategories
    python -m transferlab.tools.benchmark --grid --grid-epochs 1 --json grid.json

From the project root, on the images ``prepare`` cached, for one model, resolution and batch size it
measures, in images per second:
1. compute-only bound: training steps on one random batch already in memory (no data work at all);
2. this pipeline: a real epoch (or ``--max-steps``) of the cached uint8 images (augmented per image on
   the training device), through the same ``Trainer.step`` the training stages use;
3. the seeds' baseline: torchvision ``ImageFolder`` decoding the JPEGs every epoch, per-image transforms,
   ``DataLoader(num_workers=2)``, for as many batches as (2) (only with ``--jpeg-folder``);
4. eager against ``torch.compile`` training steps (as (2), ``--compile-steps``): the first steps, where the
   compilation happens, are timed apart from the steady rate, so that ``compile`` can be chosen per run;
and, at ``--eval-image-size``: evaluation of the test split (the evaluate stage's path), the features
stage's pass (every split and its mirror image through the backbone), inference of the same preprocessed
batches in eager NCHW, eager channels-last and ONNX Runtime (each one's largest logit difference from
eager NCHW, and the one-off export and session time), and the process's peak memory.

``--grid`` measures what DVC experiments cost beyond their training, with the real dvc commands, in a
throw-away clone of the project at HEAD that shares the project's DVC cache and data source (see
:func:`grid`). Results go to stdout as a Markdown table (and to ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from .. import cores
from ..config import RuntimeConfig, TrainConfig, load_params, read_yaml
from ..device import training_device
from ..fileio import write_json
from ..inference import onnx_runner, predict_logits, predict_views
from ..inputs import Preprocessing, batch_slices, epoch_order, eval_batches, eval_resize, normalize
from ..model_card import EvalInput
from ..models import build_model
from ..run import Run
from ..splits import SPLITS, load_classes, load_split
from ..training import Batches, ImageBatches, Trainer, single_process

log = logging.getLogger("transferlab.tools.benchmark")
WARMUP_STEPS = 2  # untimed first steps: one-off allocations and, with torch.compile, the compilation
MEASUREMENTS = ("compute", "pipeline", "jpeg", "compile", "eval", "features", "infer")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Setup:
    """What the measurements share: the run (the model, the training recipe, where it runs), the classes."""

    run: Run
    classes: list[str]

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

    @property
    def runtime(self) -> RuntimeConfig:
        return self.run.runtime

    def trainer(self, steps_per_epoch: int, run: Run | None = None) -> Trainer:
        """A trainer of the run (or of ``run``, a variant of it), as the training stages make theirs."""
        run = run or self.run
        return Trainer.create(run, self.classes, steps_per_epoch, single_process(run.runtime))

    def network(self, channels_last: bool) -> tuple[torch.nn.Module, torch.nn.Module, Preprocessing]:
        """(model in eval mode on the device, its classifier head, preprocessing)."""
        torch.manual_seed(self.cfg.seed)
        model, head, prep = build_model(self.run.arch, self.run.weights, len(self.classes))
        device, _ = training_device(self.runtime.device, self.runtime.precision)
        model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
        return model, model.get_submodule(head), prep


class StreamedBatches:
    """Training batches taken in turn from ``stream`` (pairs of inputs and labels on the training device),
    whatever indices a step asks for: to time steps on data that does not come from the cached arrays."""

    def __init__(self, network: torch.nn.Module, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]):
        self.network, self.stream = network, stream

    def fetch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, labels = next(self.stream)
        return inputs, labels, labels


def timed_steps(trainer: Trainer, batches: Batches, indices: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds of the first WARMUP_STEPS steps, images per second over the other ``batches``)."""
    trainer.enter_train_mode()
    started = time.perf_counter()
    for batch in indices[:WARMUP_STEPS]:
        trainer.step(batches, batch)
    synchronize(trainer.device)
    warm, images = time.perf_counter(), 0
    for batch in indices[WARMUP_STEPS:]:
        images += trainer.step(batches, batch)[2]
    synchronize(trainer.device)
    return warm - started, images / (time.perf_counter() - warm)


def step_indices(labels: np.ndarray, batch_size: int, count: int) -> list[torch.Tensor]:
    """``count`` batches of training indices, epoch after epoch, as training draws them."""
    slices = batch_slices(len(labels), batch_size)
    generator, batches = torch.Generator().manual_seed(0), []
    while len(batches) < count:
        order = epoch_order(labels, generator, balanced=False)
        batches += [order[s] for s in slices]
    return batches[:count]


def compute_bound(setup: Setup, steps: int) -> dict:
    cfg = setup.cfg
    trainer = setup.trainer(steps)
    batch = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=trainer.device)
    if setup.runtime.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, len(setup.classes), (cfg.batch_size,), device=trainer.device)
    same_batch = StreamedBatches(trainer.model, itertools.repeat((batch, labels)))
    _, img_s = timed_steps(trainer, same_batch, [torch.arange(cfg.batch_size)] * (steps + WARMUP_STEPS))
    return {"compute_only_img_s": round(img_s, 2)}


def cached_pipeline(setup: Setup, data, steps: int, run: Run | None = None) -> tuple[float, float]:
    """(seconds of the first steps, images per second after them): ``steps`` timed steps, as in training
    (of the setup's run, or of ``run``)."""
    cfg = (run or setup.run).cfg
    (_, labels), _ = data
    trainer = setup.trainer(len(batch_slices(len(labels), cfg.batch_size)), run)
    batches = ImageBatches(trainer, data, len(setup.classes))
    return timed_steps(trainer, batches, step_indices(labels, cfg.batch_size, steps + WARMUP_STEPS))


def compile_speed(setup: Setup, data, steps: int) -> dict:
    """Eager and compiled training steps, and how many images a run must train on for a compilation to pay."""
    runs = (setup.run.with_recipe(compile=compiled) for compiled in (False, True))
    (eager_first, eager), (compiled_first, compiled) = [cached_pipeline(setup, data, steps, r) for r in runs]
    saved_per_image = 1 / eager - 1 / compiled
    extra = max(compiled_first - eager_first, 0)
    break_even = round(extra / saved_per_image) if saved_per_image > 0 else None
    return {
        "train_eager_first_steps_s": round(eager_first, 2),
        "train_eager_img_s": round(eager, 2),
        "train_compiled_first_steps_s": round(compiled_first, 2),  # the compilation
        "train_compiled_img_s": round(compiled, 2),
        "compile_speedup": round(compiled / eager, 3),
        "compile_break_even_images": break_even,  # None: compiled steps are no faster here
    }


class ImageFolderWithout(datasets.ImageFolder):
    """torchvision's ImageFolder, leaving out the classes the pipeline excludes (``BACKGROUND_Google``)."""

    def __init__(self, root: Path, exclude: list[str], **kwargs):
        self.exclude = set(exclude)
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        kept = [name for name in classes if name not in self.exclude]
        return kept, {name: index for index, name in enumerate(kept)}


def jpeg_baseline(setup: Setup, folder: Path, steps: int, workers: int) -> dict:
    """The way the seeds train: decode and transform each JPEG in DataLoader workers, every epoch."""
    cfg, channels_last = setup.cfg, setup.runtime.channels_last
    trainer = setup.trainer(1)
    prep = trainer.prep
    interpolation = InterpolationMode(prep.interpolation)
    transform = v2.Compose(
        [
            v2.RGB(),
            v2.RandomResizedCrop(cfg.image_size, (cfg.crop_scale_min, 1.0), interpolation=interpolation),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(prep.mean), list(prep.std)),
        ]
    )
    dataset = ImageFolderWithout(folder, exclude=["BACKGROUND_Google"], transform=transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    on_device = (
        (images.to(trainer.device).contiguous(memory_format=memory_format), labels.to(trainer.device))
        for images, labels in loader
    )
    count = min(len(loader), steps + WARMUP_STEPS)
    batch = torch.arange(cfg.batch_size)  # the batch size is all the steps need to know
    _, img_s = timed_steps(trainer, StreamedBatches(trainer.model, on_device), [batch] * count)
    return {"jpeg_dataloader_img_s": round(img_s, 2)}


def evaluation(setup: Setup, images: np.ndarray, image_size: int, batch_size: int) -> dict:
    """The evaluate stage's path (on a CPU, ONNX Runtime from 256 images on, its export included)."""
    model, _, prep = setup.network(setup.runtime.channels_last)
    started = time.perf_counter()
    predict_logits(
        model, images, EvalInput(prep, image_size, setup.runtime.channels_last), batch_size, "eval"
    )
    synchronize(next(model.parameters()).device)
    return {"eval_img_s": round(len(images) / (time.perf_counter() - started), 2)}


def features_pass(setup: Setup, splits: list[np.ndarray], image_size: int, batch_size: int) -> dict:
    """The features stage's work: every split and its mirror image through the backbone."""
    channels_last = setup.runtime.channels_last
    model, head, prep = setup.network(channels_last)
    started = time.perf_counter()
    for images in splits:
        eval_input = EvalInput(prep, image_size, channels_last)
        predict_views(model, images, eval_input, batch_size, "features", inputs_of=head, flip=True)
    synchronize(next(model.parameters()).device)
    seconds = time.perf_counter() - started
    return {"features_wall_s": round(seconds, 2), "features_img_s": round(sum(map(len, splits)) / seconds, 2)}


@torch.inference_mode()
def timed_inference(run, batches: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """(images per second, logits) of ``run`` over ``batches``, after one untimed batch."""
    run(batches[0])
    synchronize(batches[0].device)
    started = time.perf_counter()
    logits = torch.cat([run(batch).float().cpu() for batch in batches])
    return len(logits) / (time.perf_counter() - started), logits


def inference_paths(setup: Setup, images: np.ndarray, image_size: int, batch_size: int) -> dict:
    """Eager NCHW, eager channels-last and (on a CPU) ONNX Runtime over the same batches, preprocessed
    beforehand: the networks' own rates, and each path's largest logit difference from eager NCHW."""
    model, _, prep = setup.network(channels_last=False)
    device = next(model.parameters()).device
    transform = eval_resize(image_size, prep, images.shape[1])
    batches = [normalize(batch.to(device), prep) for batch in eval_batches(images, transform, batch_size)]
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    runs = {
        "eager_nchw": model,
        "eager_channels_last": lambda x: channels_last(x.contiguous(memory_format=torch.channels_last)),
    }
    figures = {}
    if device.type == "cpu":
        started = time.perf_counter()
        runs["onnxruntime"] = onnx_runner(model, batches[0][:2])
        figures["onnx_export_and_session_s"] = round(time.perf_counter() - started, 2)
    else:
        log.info("inference: ONNX Runtime is compared on a CPU device only (it runs on the CPU here)")
    reference = None
    for name, run in runs.items():
        img_s, logits = timed_inference(run, batches)
        figures[f"infer_{name}_img_s"] = round(img_s, 2)
        if reference is None:
            reference = logits
        else:
            figures[f"infer_{name}_max_abs_diff"] = float(f"{(logits - reference).abs().max():.3g}")
    return figures


def benchmark_setup(args: argparse.Namespace) -> Setup:
    """params.yaml's fine-tuning recipe at the benchmark's sizes, from a fresh head, every layer trained,
    eager: the speed of a training step as such."""
    params = load_params()
    cfg = dataclasses.replace(
        params.train,
        image_size=args.image_size,
        eval_image_size=args.eval_image_size,
        batch_size=args.batch_size,
        init_head="random",
        frozen_layers=0,
        compile=False,
        ema_decay=0.0,
    )
    runtime = dataclasses.replace(params.runtime, device=args.device)
    run = Run("finetune", "benchmark", cfg, args.arch, args.weights, runtime)
    return Setup(run, load_classes())


def throughput(args: argparse.Namespace) -> dict:
    setup = benchmark_setup(args)
    data = (load_split("train"), load_split("val"))
    device, _ = training_device(setup.runtime.device, setup.runtime.precision)
    steps = args.max_steps or len(batch_slices(len(data[0][1]), setup.cfg.batch_size))  # default: an epoch
    eval_size, eval_batch = args.eval_image_size, args.eval_batch_size
    images = {split: load_split(split)[0] for split in SPLITS}
    results = {
        "arch": args.arch,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        # set once for the whole benchmark (main): a change would recompile
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "eval_image_size": eval_size,
        "batch_size": args.batch_size,
        "eval_batch_size": eval_batch,
    }
    measurements = {
        "compute": lambda: compute_bound(setup, args.compute_steps),
        "pipeline": lambda: {"cached_pipeline_img_s": round(cached_pipeline(setup, data, steps)[1], 2)},
        "jpeg": lambda: jpeg_baseline(setup, args.jpeg_folder, steps, args.workers),
        "compile": lambda: compile_speed(setup, data, args.compile_steps),
        "eval": lambda: evaluation(setup, images["test"], eval_size, eval_batch),
        "features": lambda: features_pass(setup, list(images.values()), eval_size, eval_batch),
        "infer": lambda: inference_paths(setup, images["test"][: args.infer_images], eval_size, eval_batch),
    }
    for name, measure in measurements.items():
        if name in args.skip or (name == "jpeg" and args.jpeg_folder is None):
            continue
        figures = measure()
        results.update(figures)
        results[f"peak_rss_gib_after_{name}"] = round(peak_rss_gib(), 2)
        log.info("%s: %s", name, figures)
    pipeline = results.get("cached_pipeline_img_s")
    if pipeline and "compute_only_img_s" in results:
        results["pipeline_vs_compute"] = round(pipeline / results["compute_only_img_s"], 3)
    if pipeline and "jpeg_dataloader_img_s" in results:
        results["pipeline_vs_jpeg"] = round(pipeline / results["jpeg_dataloader_img_s"], 2)
    if device.type == "cuda":
        results["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return results


class GridError(RuntimeError):
    """A git or dvc command of ``--grid`` failed, or an experiment came from the run cache, not from a run."""


NO_WORKER = "Worker status: 0 active, 0 idle"
QUEUE_LRS = "0.001,0.002,0.005,0.01"  # the queued grid's four points (train.lr)
LP_FT = ["train_finetune", "-S", "probe.train_on_val=false"]  # a validation grid point of LP-FT


@dataclass
class Workspace:
    """A git + DVC workspace whose commands run with ``env``."""

    path: Path
    env: dict
    workers: bool = False  # queue workers may be running

    def run(self, *command: str) -> str:
        result = subprocess.run(command, cwd=self.path, env=self.env, capture_output=True, text=True)
        if result.returncode:
            output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            failed = f"{' '.join(command)} failed (exit code {result.returncode}) in {self.path}"
            raise GridError(f"{failed}:\n{output}")
        return result.stdout

    def dvc(self, *args: str) -> str:
        return self.run("dvc", *args)

    def timed(self, *args: str) -> tuple[float, str]:
        """(seconds from start to exit, stdout) of a dvc command."""
        started = time.perf_counter()
        out = self.dvc(*args)
        return time.perf_counter() - started, out

    def restore_baseline(self) -> None:
        """The baseline's params, lock and outputs again (``dvc exp run`` leaves its own in the workspace)."""
        self.run("git", "reset", "-q", "--hard")
        self.run("git", "clean", "-qfd")
        self.dvc("checkout", "-q", "--force", "--allow-missing")  # missing: outputs of stages never run here

    def run_queue(self, workers: int) -> float:
        """Seconds from ``dvc queue start -j workers`` until no task is queued or running; then stop them."""
        started = time.perf_counter()
        self.workers = True
        self.dvc("queue", "start", "-j", str(workers))
        alone_since = None  # tasks are left but no worker runs: it died, or never started
        while re.search(r"\b(Queued|Running)\b", status := self.dvc("queue", "status")):  # a poll: ~2 s late
            alone_since = (alone_since or time.monotonic()) if NO_WORKER in status else None
            if alone_since and time.monotonic() - alone_since > 60:
                raise GridError(f"tasks are left in the queue but no worker runs them:\n{status}")
            time.sleep(1)
        wall = time.perf_counter() - started
        self.stop_workers()
        failed = re.findall(r"^(\w+)\s.*\bFailed\b", status, re.MULTILINE)
        if failed:
            log_tail = self.dvc("queue", "logs", failed[0])[-3000:]
            raise GridError(f"{len(failed)} queued run(s) failed:\n{status}\nlog of {failed[0]}:\n{log_tail}")
        return wall

    def stop_workers(self) -> None:
        """Stop the queue workers (they would idle a while before exiting) and wait until they have."""
        self.dvc("queue", "stop")
        deadline = time.monotonic() + 60
        while NO_WORKER not in self.dvc("queue", "status"):
            if time.monotonic() > deadline:
                raise GridError("the queue workers did not stop within a minute")
            time.sleep(1)
        self.workers = False


def clone_project(project: Path, path: Path) -> Workspace:
    """``project`` at HEAD cloned to ``path``: stages run the clone's code on the project's cache and data."""
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),  # our dvc
        "PYTHONPATH": os.pathsep.join(filter(None, [str(path / "src"), os.environ.get("PYTHONPATH")])),
        "DVC_NO_ANALYTICS": "1",
    }
    origin = Workspace(project, env)
    origin.run("git", "clone", "-q", str(project), str(path))
    clone = Workspace(path, env)
    params = read_yaml((path / "params.yaml").read_text())
    source = (params.get("data") or {}).get("source")
    # the same data at the same relative path
    if source and source != "download" and not Path(source).is_absolute():
        (path / source).parent.mkdir(parents=True, exist_ok=True)
        (path / source).symlink_to((project / source).resolve())
    clone.dvc("cache", "dir", "--local", origin.dvc("cache", "dir").strip())
    clone.run("git", "config", "user.name", "transferlab benchmark")
    clone.run("git", "config", "user.email", "benchmark@localhost")
    return clone


def stages_run(out: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out)


def training_seconds(experiment: dict, stage: str) -> float:
    return experiment["data"]["metrics"][f"metrics/{stage}/metrics.json"]["data"]["wall_time_s"]


def summary(experiment: dict | None) -> dict:
    """The fine-tuning run's summary metrics less its wall time: what a twin must equal."""
    if experiment is None:
        return {}
    metrics = experiment["data"]["metrics"]["metrics/train_finetune/metrics.json"]["data"]
    return {key: value for key, value in metrics.items() if key != "wall_time_s"}


def grid_points(experiments: list[dict], seed: int, tensorboard: bool) -> dict[float, dict]:
    """The queued grid's experiments of one ``-j`` (told apart by ``logging.tensorboard``), by train.lr."""
    points = {}
    for experiment in experiments:
        params = experiment["data"]["params"]["params.yaml"]["data"]
        if params["train"]["seed"] == seed and params["logging"]["tensorboard"] == tensorboard:
            points[params["train"]["lr"]] = experiment
    return points


def grid(args: argparse.Namespace) -> dict:
    """What experiments cost beyond their training, in a throw-away clone of the project at HEAD.

    After ``dvc repro train_probe`` (the baseline, from the shared cache when it holds it), each command is
    timed from start to exit: (a) ``dvc exp run train_probe -S probe.C=[C]``; (b) one LP-FT validation grid
    point, ``dvc exp run train_finetune`` with ``train.train_on_val`` and ``probe.train_on_val`` false (its
    train_probe runs too, unless DVC's run cache holds that probe); (c) the same for ``train_scratch``; each
    with its overhead, the wall time less the stage's own ``wall_time_s``. Then (d) four queued LP-FT points
    run by ``dvc queue start -j 1``, and their twins with ``-j 2``: the same params but
    ``logging.tensorboard``, which changes no number but keeps DVC's run cache from answering for them;
    each twin's thread count and whether its numbers equal its ``-j 1`` twin's are reported. (a) to (c)
    and the grid get a fresh seed, so that the run cache, shared with the project, never answers for a run.
    ``--grid-threads N`` sets ``runtime.threads`` for the grid (default: params.yaml's).
    """
    project = project_root()
    nonce = int(time.time())  # the runs' seeds and names: nonce, nonce + 1, nonce + 2
    results = {"project": str(project), "cores": cores.available_cores(), "grid_epochs": args.grid_epochs}
    results["grid_image_size"] = args.grid_image_size or "params.yaml's"
    with tempfile.TemporaryDirectory(prefix="transferlab-grid-", ignore_cleanup_errors=True) as tmp:
        started = time.perf_counter()
        clone = clone_project(project, Path(tmp) / "project")
        try:
            clone.dvc("repro", "train_probe")
            if clone.run("git", "status", "--porcelain"):
                clone.run("git", "add", "-A")
                clone.run("git", "commit", "-qm", "benchmark baseline")
            results["setup_s"] = round(time.perf_counter() - started, 1)
            results.update(single_experiments(clone, args, nonce))
            results.update(queued_grid(clone, args, nonce + 3))
            shown = json.loads(clone.dvc("exp", "show", "--json"))
        finally:
            if clone.workers:  # none may outlive the clone
                with contextlib.suppress(GridError):
                    clone.stop_workers()
    results.update(training_figures(shown, nonce, results))
    return results


def project_root() -> Path:
    toplevel = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if toplevel.returncode:
        raise GridError("--grid clones the project: run it inside the project's git repository")
    return Path(toplevel.stdout.strip())


def recipe(args: argparse.Namespace, section: str, seed: int) -> list[str]:
    """The ``-S`` options of a grid run's recipe: on the train split, ``--grid-epochs``, ``seed``."""
    size = args.grid_image_size
    values = {"train_on_val": "false", "epochs": args.grid_epochs, "seed": seed}
    values.update({"image_size": size, "eval_image_size": size} if size else {})
    return [arg for key, value in values.items() for arg in ("-S", f"{section}.{key}={value}")]


def single_experiments(clone: Workspace, args: argparse.Namespace, seed: int) -> dict:
    """(a) to (c) of :func:`grid`: their wall times (each from the baseline, with ``seed``)."""
    probe_c = ["-S", f"probe.C=[{args.probe_c}]"]
    wall, out = clone.timed("exp", "run", "train_probe", "-n", f"bench-probe-{seed}", *probe_c)
    if "train_probe" not in stages_run(out):
        ran_before = f"train_probe came from the run cache ({probe_c[1]} ran before)"
        raise GridError(f"{ran_before}: use another --probe-c")
    results = {"probe_exp_wall_s": round(wall, 1)}
    clone.restore_baseline()
    finetune = [*LP_FT, "-n", f"bench-finetune-{seed}", *recipe(args, "train", seed)]
    wall, out = clone.timed("exp", "run", *finetune)
    results["finetune_exp_wall_s"] = round(wall, 1)
    results["finetune_exp_stages"] = " + ".join(stages_run(out))
    clone.restore_baseline()
    scratch = ["train_scratch", "-n", f"bench-scratch-{seed}", *recipe(args, "scratch", seed)]
    results["scratch_exp_wall_s"] = round(clone.timed("exp", "run", *scratch)[0], 1)
    clone.restore_baseline()
    return results


def queued_grid(clone: Workspace, args: argparse.Namespace, seed: int) -> dict:
    """(d) of :func:`grid`: the time to queue the four points and to run them, with ``-j 1`` then ``-j 2``."""
    threads = ["-S", f"runtime.threads={args.grid_threads}"] if args.grid_threads is not None else []
    results = {}
    for workers in (1, 2):
        twin = ["-S", f"logging.tensorboard={'true' if workers == 2 else 'false'}"]
        points = [*LP_FT, "-S", f"train.lr={QUEUE_LRS}", *recipe(args, "train", seed), *threads, *twin]
        enqueue_s, _ = clone.timed("exp", "run", "--queue", *points)
        results[f"queue_j{workers}_enqueue_s"] = round(enqueue_s, 1)
        results[f"queue_j{workers}_wall_s"] = round(clone.run_queue(workers), 1)
    return results


def training_figures(shown: list, nonce: int, walls: dict) -> dict:
    """From ``dvc exp show --json``: each experiment's training time and overhead (its wall time in
    ``walls`` less its training), and the queued grid's points, training times, threads and twins."""
    experiments = [e["revs"][0] for commit in shown for e in commit.get("experiments") or []]
    named = {e["name"]: e for e in experiments}
    results = {}
    for run in ("probe", "finetune", "scratch"):
        seconds = training_seconds(named[f"bench-{run}-{nonce}"], f"train_{run}")
        results[f"{run}_exp_training_s"] = seconds
        results[f"{run}_exp_overhead_s"] = round(walls[f"{run}_exp_wall_s"] - seconds, 1)
    grid_runs = {workers: grid_points(experiments, nonce + 3, workers == 2) for workers in (1, 2)}
    for workers, ran in grid_runs.items():
        results[f"queue_j{workers}_points"] = len(ran)
        mean = sum(training_seconds(e, "train_finetune") for e in ran.values()) / len(ran)
        results[f"queue_j{workers}_mean_training_s"] = round(mean, 1)
        results[f"queue_j{workers}_threads"] = sorted({summary(e)["threads"] for e in ran.values()})
    results["queue_j2_equal_to_j1_twin"] = sum(
        summary(twin) == summary(grid_runs[1].get(lr)) for lr, twin in grid_runs[2].items()
    )
    results["queue_j2_over_j1_wall"] = round(walls["queue_j2_wall_s"] / walls["queue_j1_wall_s"], 3)
    return results


def print_table(results: dict) -> None:
    print("| figure | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="timm/tf_efficientnet_lite0")
    parser.add_argument("--weights", default="none", help="model.weights (values do not change speeds)")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--eval-image-size", type=int, default=224, help="evaluation, features, inference")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--compute-steps", type=int, default=20, help="timed steps of the compute-only bound")
    parser.add_argument("--max-steps", type=int, help="timed steps of (2) and (3); default: an epoch")
    parser.add_argument("--compile-steps", type=int, default=20, help="timed steps of eager and compiled (4)")
    parser.add_argument("--infer-images", type=int, default=256, help="test images of the inference paths")
    parser.add_argument("--jpeg-folder", type=Path, help="the raw ImageFolder of (3); without it, no (3)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip", nargs="*", default=[], choices=MEASUREMENTS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    experiments = parser.add_argument_group("experiment overheads, with the real dvc commands")
    experiments.add_argument("--grid", action="store_true", help="measure these instead of the throughput")
    experiments.add_argument("--grid-epochs", type=int, default=1, help="epochs of each training experiment")
    experiments.add_argument(
        "--grid-image-size", type=int, help="their train and eval size (default: params)"
    )
    experiments.add_argument("--probe-c", type=float, default=0.1, help="the C of the probe experiment (a)")
    experiments.add_argument(
        "--grid-threads", type=int, help="runtime.threads of the queued grid (default: params.yaml's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.grid:
        results = grid(args)
    else:
        cores.use(load_params().runtime.threads)  # set once: the figures are for that many threads
        results = throughput(args)
    print_table(results)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
