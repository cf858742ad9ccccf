"""Getting an image-folder dataset onto disk: download, checksum, safe extraction, scanning, decoding."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from .config import DATA_SOURCE_ENV
from .errors import DatasetError
from .fileio import atomic_dir, atomic_path

CALTECH101_URL = "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip?download=1"
CALTECH101_ZIP_MD5 = "3138e1922a9193bfa496528edbbc45d0"
CALTECH101_TAR_MEMBER = "caltech-101/101_ObjectCategories.tar.gz"
CALTECH101_TAR_MD5 = "b224c7392d521a49829488ab0f1120d9"
CALTECH101_FOLDER = "101_ObjectCategories"
# the unpacked official folder, every file: the md5 of its "relative path <tab> md5 of the file" lines
# (manifest_md5)
CALTECH101_MANIFEST_MD5 = "50324aa1e7d9c9f30ad2f952352f0b19"
# as torchvision's ImageFolder: other files (the real archive's stray BACKGROUND_Google/tmp) are skipped
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Decompression-bomb guard: a larger image (Pillow's own warning threshold, about 0.27 GB as RGB) is skipped
# before it is decoded (Caltech-101: at most 0.34 MP in its 101 classes, 11 MP in BACKGROUND_Google)
MAX_IMAGE_PIXELS = 89_478_485
# 16-bit and 32-bit integer greyscale (PNG, TIFF): Pillow's convert("RGB") would clip these at 255,
# not scale them
WIDE_GREYSCALE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    actual = md5sum(path)
    if actual != expected:
        raise DatasetError(f"checksum mismatch for {path}: md5 {actual}, expected {expected}")


def download(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; keep the file only if its md5 matches."""
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            with (
                tmp.open("wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar,
            ):
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and tmp.stat().st_size != total:
                raise DatasetError(f"download of {url} was cut short: {tmp.stat().st_size} of {total} bytes")
            verify_md5(tmp, md5)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        raise DatasetError(
            f"could not download {url} ({err}). Without network, point the pipeline at a local copy: set the "
            f"{DATA_SOURCE_ENV} environment variable (or data.source in params.yaml) to an unpacked "
            f"{CALTECH101_FOLDER} folder or to caltech-101.zip / 101_ObjectCategories.tar.gz"
        ) from err
    return dest


def _extract_zip(archive: Path, target: Path) -> None:
    root = target.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            destination = (root / member.filename).resolve()
            if not destination.is_relative_to(root) or member.filename.startswith("/"):
                raise DatasetError(
                    f"refusing to extract {member.filename!r} from {archive}: it points outside the target"
                )
        zf.extractall(root)


def _refuse_absolute_paths(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (no "../" escapes, no links outside the target, no devices), and no absolute
    names: that filter would quietly strip the leading "/", but an archive holding one was not made for
    this."""
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, destination)


def _extract_tar(archive: Path, target: Path) -> None:
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(target, filter=_refuse_absolute_paths)
            # to the end: a gzip stream's checksum and length are checked there
            while tf.fileobj.read(1 << 20):
                pass
    except tarfile.FilterError as err:
        raise DatasetError(f"refusing to extract {archive}: {err}") from err


def extract(archive: Path, target: Path) -> Path:
    """Extract a .zip or .tar(.gz) archive into ``target`` atomically: a refused or failed archive
    leaves nothing."""
    with atomic_dir(target) as staging:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, staging)
            elif tarfile.is_tarfile(archive):
                _extract_tar(archive, staging)
            else:
                raise DatasetError(
                    f"{archive} is neither a zip nor a tar archive "
                    "(a web page saved under that name, or a zip cut short?)"
                )
        except (
            tarfile.TarError,
            zipfile.BadZipFile,
            EOFError,
            zlib.error,
            gzip.BadGzipFile,
            lzma.LZMAError,
        ) as err:
            raise DatasetError(
                f"{archive} is damaged or cut short ({type(err).__name__}: {err}): get it again"
            ) from err
    return target


def find_image_root(folder: Path) -> Path:
    """The folder whose subfolders are the classes: ``folder`` itself or the Caltech-101 folder inside it."""
    for candidate in (folder / CALTECH101_FOLDER, folder / "caltech-101" / CALTECH101_FOLDER, folder):
        if candidate.is_dir() and any(p.is_dir() for p in candidate.iterdir()):
            return candidate
    raise DatasetError(
        f"{folder} holds no class subfolders: "
        "expected an ImageFolder layout (one subfolder of images per class), "
        f"such as the {CALTECH101_FOLDER} folder of Caltech-101"
    )


def manifest_md5(root: Path) -> str:
    """One checksum of a folder's contents: every file (:func:`walk_files`) with its path relative
    to ``root``."""
    digest = hashlib.md5()
    for path in walk_files(root):
        digest.update(f"{path.relative_to(root).as_posix()}\t{md5sum(path)}\n".encode())
    return digest.hexdigest()


def official_copy(copy: Path, raw_dir: Path) -> Path:
    """The folder of class subfolders of ``TRANSFERLAB_DATA``: a local copy of the official Caltech-101,
    checked to be it.

    ``data.source: download`` names the data; the environment variable only says where its bytes already are.
    DVC does not see environment variables, so other images given that way would leave ``dvc repro`` up to
    date on the old ones: they are refused.
    """
    own_images = (
        "DVC does not see environment variables, "
        "so a run on other images would look up to date on the old ones. "
        f"To use your own images, set data.source: {copy} in params.yaml "
        f"(or dvc exp run -S data.source={copy}) "
        f"and unset {DATA_SOURCE_ENV}"
    )
    if copy.is_dir():
        root = find_image_root(copy)
        if manifest_md5(root) != CALTECH101_MANIFEST_MD5:
            raise DatasetError(
                f"{DATA_SOURCE_ENV}={copy} is not the official Caltech-101 (its files differ). {own_images}"
            )
        return root
    if copy.is_file():
        if md5sum(copy) not in (CALTECH101_ZIP_MD5, CALTECH101_TAR_MD5):
            raise DatasetError(
                f"{DATA_SOURCE_ENV}={copy} is not the official caltech-101.zip or its tar.gz "
                f"(md5 differs). {own_images}"
            )
        return acquire_archive(copy, raw_dir)
    raise DatasetError(
        f"{DATA_SOURCE_ENV}={copy} does not exist: give a local copy of the official Caltech-101, or unset it"
    )


def acquire(source: str, raw_dir: Path, official: str | None = None) -> Path:
    """Return the folder of class subfolders named by ``source`` (``download`` or a local path).

    ``official``: with ``download``, where a local copy of the official Caltech-101 already is
    (``TRANSFERLAB_DATA``).
    """
    if source == "download":
        if official:
            return official_copy(Path(official).expanduser(), raw_dir)
        archive = download(CALTECH101_URL, raw_dir / "caltech-101.zip", CALTECH101_ZIP_MD5)
        return acquire_archive(archive, raw_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        return find_image_root(path)
    if path.is_file():
        return acquire_archive(path, raw_dir)
    raise DatasetError(
        f"data source {source!r} does not exist: set data.source to 'download' "
        f"or to an existing folder of class subfolders or archive"
    )


def acquire_archive(archive: Path, raw_dir: Path) -> Path:
    """Unpack a local or downloaded archive (the official zip holds a tar.gz holding the image folder)."""
    unpacked = extract(archive, raw_dir / f"{archive.name}.d")
    inner = unpacked / CALTECH101_TAR_MEMBER
    if inner.is_file():
        verify_md5(inner, CALTECH101_TAR_MD5)
        unpacked = extract(inner, raw_dir / "101_ObjectCategories.d")
    return find_image_root(unpacked)


@dataclass(frozen=True)
class ImageFile:
    path: str  # relative to the dataset root, with forward slashes
    label: int
    class_name: str


def walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, by the rules ``prepare`` and ``transferlab predict`` share.

    As torchvision's ``ImageFolder``: files in sub-folders count, and symbolic links to files and folders are
    followed (a link back up the tree is followed once). Hidden files and folders (a leading dot, such as
    ``.ipynb_checkpoints/`` or ``.DS_Store``) are skipped.
    """
    found, seen = [], set()
    for parent, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a link loop
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [
            Path(parent) / name
            for name in files
            if not name.startswith(".") and os.path.isfile(os.path.join(parent, name))
        ]
    return sorted(found)


def scan(root: Path, exclude: list[str]) -> tuple[list[str], list[ImageFile]]:
    """List classes (sorted subfolder names, minus ``exclude``) and their files (see :func:`walk_files`),
    in a deterministic order."""
    classes = sorted(
        p.name for p in root.iterdir() if p.is_dir() and p.name not in exclude and not p.name.startswith(".")
    )
    files = [
        ImageFile(f"{name}/{path.relative_to(root / name).as_posix()}", label, name)
        for label, name in enumerate(classes)
        for path in walk_files(root / name)
    ]
    entries = [p for name in classes for p in (root / name).iterdir() if not p.name.startswith(".")]
    if files and all(p.is_dir() for p in entries):
        raise DatasetError(
            f"the class folders of {root} hold only folders (such as {entries[0]}), "
            "so the data source points one level too high: "
            "point data.source at the folder whose subfolders hold the images"
        )
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(
            f"{root} has {len(classes)} class subfolder(s) left after excluding {exclude} ({found}): "
            "a classifier needs at least 2 classes, one subfolder of images each"
        )
    if not files:
        raise DatasetError(f"the class folders of {root} hold no files")
    return classes, files


def to_8_bits(values: np.ndarray) -> np.ndarray:
    """16-bit greyscale to 8 bits, scaled and rounded; 32-bit integer values beyond 0..65535 over their
    own range."""
    lo, hi = (
        (0, 65535) if values.min() >= 0 and values.max() <= 65535 else (int(values.min()), int(values.max()))
    )
    span = max(hi - lo, 1)
    return (((values.astype(np.int64) - lo) * 255 + span // 2) // span).astype(np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode any PIL-readable image upright (its EXIF orientation applied) as RGB, resize its shorter side to
    ``size`` and centre-crop a square.

    Grayscale, CMYK, palette and RGBA images are converted to RGB, 16-bit greyscale scaled to 8 bits.
    An image over ``MAX_IMAGE_PIXELS`` is refused from its header, before any decoding.
    """
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise DatasetError(f"not an image file name (extensions read: {' '.join(IMAGE_EXTENSIONS)})")
    with Image.open(path) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise DatasetError(
                f"{image.width} x {image.height} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                "(decompression-bomb guard)"
            )
        image.draft("RGB", (size, size))  # lets JPEG decode at a reduced scale when the image is large
        image = ImageOps.exif_transpose(
            image
        )  # upright: a phone photo stored sideways carries its rotation in EXIF
        if image.mode in WIDE_GREYSCALE_MODES:
            image = Image.fromarray(to_8_bits(np.asarray(image)))
        image = image.convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        resized = image.resize(
            (max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC
        )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
