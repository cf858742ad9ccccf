"""``transferlab smoke``: the whole pipeline end to end in about two minutes on a laptop CPU, as a DVC
experiment, to check that everything runs (on Caltech-101 or on your own folder of images) before a real run.

The preset keeps every stage but shrinks the work: 6 images per class drawn for training (4 to train on,
2 held out for validation; the final fits train on all 6), 4 test images per class, 96-px images, one
fine-tuning epoch and two scratch epochs. Its accuracies mean nothing. It runs in a temporary copy of the
workspace (``dvc exp run --temp``), so params.yaml and the results and models in the workspace stay as they
were; ``dvc exp show`` lists it, and ``dvc exp apply <name>`` brings its params, metrics and models into the
workspace (then ``transferlab predict`` finds them).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ..config import parse_params, read_params_file
from ..errors import ConfigError
from ..paths import RAW_DIR
from .experiments import hydra_value

PRESET = {
    "data.train_per_class": 6,
    "data.val_per_class": 2,
    "data.test_per_class": 4,
    "data.cache_size": 110,  # a 96 px evaluation crop is the centre 0.875 of 110 px: no upsampling
    "features.image_size": 96,
    "train.epochs": 1,
    "train.image_size": 96,
    "train.eval_image_size": 96,
    "train.compile": False,
    "scratch.epochs": 2,
    "scratch.image_size": 64,
    "scratch.eval_image_size": 64,
    "evaluate.gallery_size": 8,
    "evaluate.gradcam_images": 2,
}


def settings(source: str | None, raw: dict) -> dict:
    """The preset on ``raw`` params, with ``data.source`` set to ``source``. The run happens in a copy of the
    workspace, so a relative data.source or model.weights path that exists here is made absolute."""
    values = dict(PRESET)
    if source is not None and not Path(source).expanduser().exists():
        raise ConfigError(f"--source {source}: no such folder or archive")
    paths = {"data.source": source or raw["data"]["source"], "model.weights": raw["model"]["weights"]}
    for key, value in paths.items():
        path = Path(value).expanduser()
        if path.exists():
            values[key] = str(path.resolve())
    return values


def applied(raw: dict, values: dict) -> dict:
    """``raw`` params with the dotted keys of ``values`` set."""
    merged = {section: dict(keys or {}) for section, keys in raw.items()}
    for key, value in values.items():
        section, name = key.split(".")
        merged.setdefault(section, {})[name] = value
    return merged


def command(values: dict, name: str) -> list[str]:
    """The ``dvc exp run`` that runs the pipeline with ``values``; the downloaded archive (``data/raw``,
    ignored by git, so not in the temporary copy otherwise) is copied along when there is one."""
    copied = ["--copy-paths", str(RAW_DIR)] if RAW_DIR.is_dir() else []
    overrides = [part for key, value in values.items() for part in ("-S", f"{key}={hydra_value(value)}")]
    return ["dvc", "exp", "run", "--temp", "--name", name, *copied, *overrides]


def read_params(path: Path) -> dict:
    raw = read_params_file(path)
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("data"), dict)
        or not isinstance(raw.get("model"), dict)
    ):
        raise ConfigError(f"{path} must be a mapping of sections, with data: and model: among them")
    return raw


def launch(source: str | None = None, params: Path = Path("params.yaml")) -> int:
    """Check the preset against params.yaml, then run it; returns dvc's exit status."""
    raw = read_params(params)
    values = settings(source, raw)
    parse_params(applied(raw, values))  # a bad combination fails here, not mid-run
    name = time.strftime("smoke-%Y%m%d-%H%M%S")
    dvc = command(values, name)
    print(describe(values), flush=True)
    print(" ".join(dvc), flush=True)
    started = time.perf_counter()
    status = subprocess.run(dvc).returncode
    if status == 0:
        minutes = (time.perf_counter() - started) / 60
        print(
            f"smoke run {name}: the whole pipeline ran in {minutes:.1f} min, in a temporary copy: the "
            f"workspace's params, results and models are as they were. `dvc exp show` lists it; "
            f"`dvc exp apply {name}` "
            "brings its models into the workspace (data/models/<run>/model.pt), for `transferlab predict`"
        )
    return status


def describe(values: dict) -> str:
    """What the preset uses, in the words the pipeline's params mean."""
    drawn, held_out = values["data.train_per_class"], values["data.val_per_class"]
    return (
        f"smoke preset on {values.get('data.source', 'params.yaml data.source')}: per class {drawn} training "
        f"images ({drawn - held_out} to train on, {held_out} held out for validation; the final fits use all "
        f"{drawn}) and at most {values['data.test_per_class']} test images; "
        f"{values['features.image_size']} px, {values['train.epochs']} fine-tuning and "
        f"{values['scratch.epochs']} scratch epoch(s)"
    )
