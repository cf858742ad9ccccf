"""``transferlab smoke``: the whole pipeline end to end in about two minutes on a laptop CPU, as a DVC
experiment, to check that everything runs (on Caltech-101 or on your own folder of images) before a real run.

The preset keeps every stage but shrinks the work: 6 training, 2 validation and 4 test images per class,
96-px images, one fine-tuning epoch and two scratch epochs. Its accuracies mean nothing. It runs in a
temporary copy of the workspace (``dvc exp run --temp``), so params.yaml and the results in the workspace
stay as they were; ``dvc exp show`` lists it, and ``dvc exp apply <name>`` brings it into the workspace.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .config import parse_params, read_yaml
from .errors import ConfigError

PRESET = {
    "data.train_per_class": 6,
    "data.val_per_class": 2,
    "data.test_per_class": 4,
    "data.cache_size": 96,
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


def settings(source: str | None) -> dict:
    """The preset, with ``data.source`` set to ``source`` (made absolute: the run happens in a copy)."""
    values = dict(PRESET)
    if source is not None:
        path = Path(source).expanduser()
        if not path.exists():
            raise ConfigError(f"--source {source}: no such folder or archive")
        values["data.source"] = str(path.resolve())
    return values


def applied(raw: dict, values: dict) -> dict:
    """``raw`` params with the dotted keys of ``values`` set."""
    merged = {section: dict(keys or {}) for section, keys in raw.items()}
    for key, value in values.items():
        section, name = key.split(".")
        merged[section][name] = value
    return merged


def command(values: dict, name: str) -> list[str]:
    """The ``dvc exp run`` that runs the pipeline with ``values``; ``-S`` takes YAML values."""
    args = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in values.items()
    ]
    return ["dvc", "exp", "run", "--temp", "--name", name, *(part for arg in args for part in ("-S", arg))]


def launch(source: str | None = None, params: Path = Path("params.yaml")) -> int:
    """Check the preset against params.yaml, then run it; returns dvc's exit status."""
    values = settings(source)
    parse_params(applied(read_yaml(params.read_text()), values))  # a bad combination fails here, not mid-run
    name = time.strftime("smoke-%Y%m%d-%H%M%S")
    print(" ".join(command(values, name)), flush=True)
    started = time.perf_counter()
    status = subprocess.run(command(values, name)).returncode
    if status == 0:
        minutes = (time.perf_counter() - started) / 60
        print(f"smoke run {name}: the whole pipeline ran in {minutes:.1f} min; see it with `dvc exp show`")
    return status
