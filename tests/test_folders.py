"""A user's own folder of photos: upright images, one folder walk for prepare and predict,
classes and duplicates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_prepare import prepare_in, read_split
from transferlab.errors import DatasetError
from transferlab.sources import load_image, scan, walk_files
from transferlab.tools.predict import every_image, find_images, read_images

ORIENTATION = 0x0112


def two_tone(height: int = 48, width: int = 32) -> np.ndarray:
    """Red on top, blue below: which way is up shows at a glance."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (230, 20, 20)
    image[height // 2 :] = (20, 20, 230)
    return image


def test_a_photo_stored_sideways_is_read_upright_everywhere(tmp_path):
    """EXIF Orientation 6: the camera stored the pixels
    rotated and says "rotate 90 degrees clockwise to view"."""
    upright = two_tone()
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    stored = np.rot90(upright, k=1)  # what a phone held upright writes, turned 90 degrees anticlockwise
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    expected = load_image(tmp_path / "upright.jpg", 32)
    seen = load_image(tmp_path / "phone.jpg", 32)
    assert np.abs(seen.astype(int) - expected.astype(int)).mean() < 6, "read upright"
    unrotated = np.asarray(Image.open(tmp_path / "phone.jpg").convert("RGB").resize((32, 48)))
    assert np.abs(unrotated[:32].astype(int) - expected.astype(int)).mean() > 40, (
        "the test image must need the rotation"
    )
    # transferlab predict decodes with the same loader
    _, images, failures = read_images([tmp_path / "phone.jpg"], 32)
    assert not failures and np.array_equal(images[0], seen)


def odd_folder(tiny_folder: Path, tmp_path: Path) -> Path:
    """The tiny folder with the shapes users' folders have: a symlinked class, a class whose images sit in a
    sub-folder, hidden folders and files, and a link loop."""
    moved = tmp_path / "elsewhere" / "class_2"
    moved.parent.mkdir()
    shutil.move(tiny_folder / "class_2", moved)
    (tiny_folder / "class_2").symlink_to(moved, target_is_directory=True)
    nested = tiny_folder / "class_1" / "2024 trip"
    nested.mkdir()
    for image in sorted((tiny_folder / "class_1").glob("*.jpg"))[6:]:
        image.rename(nested / image.name)
    hidden = tiny_folder / "class_0" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(next((tiny_folder / "class_0").glob("*.jpg")), hidden / "image_0000-checkpoint.jpg")
    (tiny_folder / "class_0" / ".DS_Store").write_bytes(b"\0\0")
    (tiny_folder / "class_0" / "loop").symlink_to(tiny_folder / "class_0", target_is_directory=True)
    return tiny_folder


def test_prepare_and_predict_walk_a_folder_by_the_same_rules(tmp_path, tiny_folder, monkeypatch):
    folder = odd_folder(tiny_folder, tmp_path)
    classes, files = scan(folder, [])
    assert classes == ["class_0", "class_1", "class_2"]
    per_class = {name: sorted(f.path for f in files if f.class_name == name) for name in classes}
    assert [len(per_class[name]) for name in classes] == [12, 12, 12], (
        "symlinked class and sub-folder counted, hidden skipped"
    )
    assert sum("2024 trip/" in path for path in per_class["class_1"]) == 6
    assert not any(
        ".ipynb_checkpoints" in f.path or ".DS_Store" in f.path or "/loop/" in f.path for f in files
    )
    # predict walks each class folder to the same files
    for name in classes:
        walked = [
            f"{name}/{p.relative_to(folder / name).as_posix()}" for p in find_images([folder / name])[0]
        ]
        assert walked == per_class[name]
    report = prepare_in(tmp_path, monkeypatch, folder)
    assert report["classes"] == 3 and report["skipped_files"] == 0
    assert any(
        "2024 trip" in row["path"] for name in ("train", "val", "test") for row in read_split(tmp_path, name)
    )


def test_predict_takes_several_files_and_folders_each_once(tmp_path, tiny_folder):
    first = sorted((tiny_folder / "class_0").glob("*.jpg"))[0]
    found, skipped = find_images([first, tiny_folder / "class_1", first])
    assert found[0] == first and len(found) == 1 + 12 and not skipped
    (tmp_path / "empty").mkdir()
    found, skipped = find_images([tmp_path / "nowhere.jpg", first, tmp_path / "empty"])
    assert found == [first]  # a wrong path does not stop the others
    assert skipped[0] == (
        str(tmp_path / "nowhere.jpg"),
        "does not exist (give image files or folders of images)",
    )
    assert skipped[1][0] == str(tmp_path / "empty") and skipped[1][1].startswith("holds no image files")
    with pytest.raises(DatasetError, match="nowhere.jpg does not exist"):
        every_image([first, tmp_path / "nowhere.jpg"])


def test_fewer_than_two_classes_is_refused_before_any_work(tmp_path, tiny_folder, monkeypatch):
    for name in ("class_1", "class_2"):
        shutil.rmtree(tiny_folder / name)
    with pytest.raises(
        DatasetError,
        match=(
            r"1 class subfolder\(s\) left after excluding \[.*\] \(only 'class_0'\): "
            r"a classifier needs at least 2"
        ),
    ):
        prepare_in(tmp_path, monkeypatch, tiny_folder)
    assert not (tmp_path / "data").exists()


def test_duplicates_are_listed_and_can_be_dropped(tmp_path, tiny_folder, monkeypatch):
    """The same file in two classes (an ambiguous label), a copy within a class,
    and a look-alike re-encoded elsewhere."""
    source = sorted((tiny_folder / "class_0").glob("*.jpg"))[0]
    rng = np.random.default_rng(0)
    for extra in range(3):  # keep every class large enough once duplicates are dropped
        for name in ("class_0", "class_1", "class_2"):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tiny_folder / name / f"extra_{extra}.png"
            )
    shutil.copy(source, tiny_folder / "class_1" / "same_bytes.jpg")
    shutil.copy(source, tiny_folder / "class_0" / "copy.jpg")
    Image.open(source).save(tiny_folder / "class_2" / "re_encoded.png")  # other bytes, the same picture
    report = prepare_in(tmp_path, monkeypatch, tiny_folder)
    saved = json.loads((tmp_path / "metrics/prepare.json").read_text())
    first = f"class_0/{source.name}"
    assert saved["duplicates"]["across_classes"] == [["class_0/copy.jpg", first, "class_1/same_bytes.jpg"]]
    assert saved["duplicates"]["within_class"] == []
    # the re-encoded picture decodes to the same pixels:
    # its perceptual hash finds it with the byte-identical ones
    assert saved["duplicates"]["alike_across_classes"] == [
        ["class_0/copy.jpg", first, "class_1/same_bytes.jpg", "class_2/re_encoded.png"]
    ]
    assert report["duplicates_across_classes"] == 1 and report["dropped_duplicates"] == 0
    kept = {row["path"] for name in ("train", "val", "test") for row in read_split(tmp_path, name)}
    assert "class_1/same_bytes.jpg" in kept, "keep (the default) only reports"

    report = prepare_in(tmp_path, monkeypatch, tiny_folder, duplicates="drop")
    kept = {row["path"] for name in ("train", "val", "test") for row in read_split(tmp_path, name)}
    assert not {first, "class_0/copy.jpg", "class_1/same_bytes.jpg"} & kept, (
        "a file in two classes is left out, every copy"
    )
    assert report["dropped_duplicates"] == 3 and "class_2/re_encoded.png" in kept


def test_a_copy_within_one_class_keeps_one(tmp_path, tiny_folder, monkeypatch):
    source = sorted((tiny_folder / "class_2").glob("*.jpg"))[3]
    shutil.copy(source, tiny_folder / "class_2" / "zz_copy.jpg")
    report = prepare_in(tmp_path, monkeypatch, tiny_folder, duplicates="drop")
    saved = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert saved["duplicates"]["within_class"] == [[f"class_2/{source.name}", "class_2/zz_copy.jpg"]]
    assert saved["dropped"] == ["class_2/zz_copy.jpg"] and report["dropped_duplicates"] == 1
    assert walk_files(tiny_folder / "class_2")[-1].name == "zz_copy.jpg"
