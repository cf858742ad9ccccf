"""Stage ``prepare``: get the images, split them per class, decode each one once into uint8 arrays.

Outputs (``data/prepared/``, written whole to ``data/prepared.partial/`` and renamed): ``classes.json``;
``{train,val,test}.csv`` (the split, readable); ``{train,val,test}.npy`` (N x S x S x 3 uint8, rows in
CSV order). ``metrics/prepare.json`` counts images per split, lists every skipped file with the reason, and
lists duplicates: byte-identical files in several classes (an ambiguous label, and a test image that is also a
training image) or repeated within a class, and, from a perceptual hash of the decoded images (a difference
hash: 64 bits from a 9 x 8 thumbnail), images that look identical in different classes. ``data.duplicates:
drop`` leaves out the byte-identical files found in several classes and keeps one copy of the others.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..config import DATA_SOURCE_ENV, DataConfig, load_params
from ..entrypoint import run_stage
from ..errors import DatasetError
from ..fileio import atomic_dir, write_csv, write_json
from ..paths import PREPARE_REPORT, PREPARED_DIR, RAW_DIR
from ..sources import ImageFile, acquire, load_image, md5sum, scan
from ..splits import SPLITS

log = logging.getLogger("transferlab.stages.prepare")


def decode_all(
    root: Path, files: list[ImageFile], size: int
) -> tuple[dict[int, np.ndarray], list[dict], list[str]]:
    """Decode every file; return the images by index, the files that could not be read and every file's
    md5."""

    def decode(item: ImageFile):
        path = root / item.path
        try:
            return load_image(path, size), None, md5sum(path)
        except Exception as err:  # PIL raises many types for bad files; each is reported, none is fatal
            return None, f"{type(err).__name__}: {err}", ""

    images, skipped, digests = {}, [], []
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = pool.map(decode, files)
        for index, (item, (image, error, digest)) in enumerate(
            tqdm(zip(files, results, strict=True), total=len(files), desc="decode")
        ):
            digests.append(digest)
            if error is None:
                images[index] = image
            else:
                skipped.append({"path": item.path, "reason": error})
    for entry in skipped:
        log.warning("skipped unreadable file %s (%s)", entry["path"], entry["reason"])
    return images, skipped, digests


def difference_hash(image: np.ndarray) -> int:
    """A perceptual hash (dHash): which of two neighbouring pixels is brighter, on a 9 x 8 greyscale
    thumbnail."""
    small = np.asarray(Image.fromarray(image).convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def same_keys(keys: dict[int, object]) -> list[list[int]]:
    """Groups of indices (in order) that share a key, each group of two or more."""
    groups: dict[object, list[int]] = {}
    for index, key in keys.items():
        groups.setdefault(key, []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def find_duplicates(files: list[ImageFile], images: dict[int, np.ndarray], exact: list[list[int]]) -> dict:
    """Byte-identical files (``exact``: groups of indices) across classes and within one, and images alike
    by their difference hash across classes."""

    def across(group: list[int]) -> bool:
        return len({files[i].label for i in group}) > 1

    exact_files = {i for group in exact for i in group}
    alike = [
        g
        for g in same_keys({i: difference_hash(image) for i, image in images.items()})
        if across(g) and not set(g) <= exact_files
    ]

    def paths(groups) -> list[list[str]]:
        return [[files[i].path for i in group] for group in groups]

    return {
        "across_classes": paths(g for g in exact if across(g)),
        "within_class": paths(g for g in exact if not across(g)),
        "alike_across_classes": paths(alike),
    }


def drop_duplicates(
    files: list[ImageFile], images: dict[int, np.ndarray], exact: list[list[int]]
) -> list[str]:
    """``data.duplicates: drop``: remove every copy of a file found in several classes, and all but the first
    copy of a file repeated within a class, from ``images``; return the removed paths."""
    dropped = []
    for group in exact:
        ambiguous = len({files[i].label for i in group}) > 1
        for index in group if ambiguous else group[1:]:
            del images[index]
            dropped.append(files[index].path)
    return sorted(dropped)


def split_indices(
    files: list[ImageFile], readable: set[int], classes: list[str], cfg: DataConfig
) -> dict[str, list[int]]:
    """Per class, shuffle the readable files with a seed of their own and cut train / val / test.

    The first ``train_per_class`` files train; fold ``val_fold`` of them (``val_per_class`` files) validates.
    """
    by_class: dict[int, list[int]] = {label: [] for label in range(len(classes))}
    for index, item in enumerate(files):
        if index in readable:
            by_class[item.label].append(index)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for label, indices in by_class.items():
        name = classes[label]
        if len(indices) <= cfg.train_per_class:
            raise DatasetError(
                f"class {name!r} has {len(indices)} readable images; "
                f"data.train_per_class={cfg.train_per_class} "
                f"needs at least {cfg.train_per_class + 1} (the training images plus one for test)"
            )
        rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
        order = [indices[i] for i in rng.permutation(len(indices))]
        train, test = order[: cfg.train_per_class], order[cfg.train_per_class :]
        fold = slice(cfg.val_fold * cfg.val_per_class, (cfg.val_fold + 1) * cfg.val_per_class)
        splits["val"] += train[fold]
        splits["train"] += train[: fold.start] + train[fold.stop :]
        splits["test"] += test[: cfg.test_per_class]
    return splits


def write_split(
    folder: Path,
    name: str,
    indices: list[int],
    files: list[ImageFile],
    images: dict[int, np.ndarray],
    size: int,
) -> None:
    array = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    for row, index in enumerate(indices):
        array[row] = images[index]
    np.save(folder / f"{name}.npy", array)
    write_csv(
        folder / f"{name}.csv",
        ["path", "label", "class"],
        ((files[i].path, files[i].label, files[i].class_name) for i in indices),
    )


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    if params.runtime.device not in (
        "auto",
        "cpu",
    ):  # prepare runs first: a device that is not here fails now
        from ..device import resolve_device  # imports torch, which prepare needs for nothing else

        resolve_device(params.runtime.device)
    cfg = params.data
    official = os.environ.get(DATA_SOURCE_ENV)
    if official and cfg.source != "download":
        log.warning("%s is set but ignored: data.source names the images (%s)", DATA_SOURCE_ENV, cfg.source)
    root = acquire(cfg.source, RAW_DIR, official)
    classes, files = scan(root, cfg.exclude_classes)
    log.info("found %d classes and %d files in %s", len(classes), len(files), root)
    images, skipped, digests = decode_all(root, files, cfg.cache_size)
    exact = same_keys({index: digests[index] for index in images})  # byte-identical files, by their md5
    duplicates = find_duplicates(files, images, exact)
    for kind, groups in duplicates.items():
        if groups:
            log.warning(
                "%d group(s) of duplicates %s, such as %s",
                len(groups),
                kind.replace("_", " "),
                ", ".join(groups[0]),
            )
    dropped = drop_duplicates(files, images, exact) if cfg.duplicates == "drop" else []
    splits = split_indices(files, set(images), classes, cfg)
    with atomic_dir(PREPARED_DIR) as folder:  # the seven files appear together or not at all
        for name in SPLITS:
            write_split(folder, name, splits[name], files, images, cfg.cache_size)
        write_json(folder / "classes.json", classes)
    counts = {f"{name}_images": len(splits[name]) for name in SPLITS}
    report = {
        "classes": len(classes),
        **counts,
        "skipped_files": len(skipped),
        **{f"duplicates_{kind}": len(groups) for kind, groups in duplicates.items()},
        "dropped_duplicates": len(dropped),
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    # the folder actually read (with data.source: download, a checked local copy of the official data,
    # or the download)
    write_json(
        PREPARE_REPORT,
        {**report, "source": str(root), "skipped": skipped, "duplicates": duplicates, "dropped": dropped},
    )
    log.info("split: %s; skipped %d unreadable file(s)", counts, len(skipped))


if __name__ == "__main__":
    run_stage("prepare", main)
