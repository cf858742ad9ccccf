"""prepare: acquiring the data (local folder, archives, download), bad files, the split, the cache."""

from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import tiny_params
from transferlab import sources
from transferlab.errors import ConfigError, DatasetError
from transferlab.sources import acquire, load_image
from transferlab.stages import prepare


def prepare_in(workdir: Path, monkeypatch, source: Path | str, **data_overrides) -> dict:
    """Run the prepare stage in ``workdir`` with tiny params; return its report."""
    params = tiny_params()
    params["data"].update(source=str(source), **data_overrides)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(workdir)
    prepare.main()
    return json.loads((workdir / "metrics/prepare.json").read_text())


def read_split(workdir: Path, name: str) -> list[dict]:
    with (workdir / f"data/prepared/{name}.csv").open() as f:
        return list(csv.DictReader(f))


def test_split_counts_no_overlap_and_cache(tmp_path, tiny_folder, monkeypatch):
    report = prepare_in(tmp_path, monkeypatch, tiny_folder)
    assert report["classes"] == 3 and report["skipped_files"] == 0
    splits = {name: read_split(tmp_path, name) for name in prepare.SPLITS}
    paths = {name: {row["path"] for row in rows} for name, rows in splits.items()}
    assert (
        not (paths["train"] & paths["val"])
        and not (paths["train"] & paths["test"])
        and not (paths["val"] & paths["test"])
    )
    for label in range(3):
        counts = {name: sum(int(r["label"]) == label for r in rows) for name, rows in splits.items()}
        assert counts == {"train": 4, "val": 2, "test": 6}
    train = np.load(tmp_path / "data/prepared/train.npy")
    assert train.shape == (12, 40, 40, 3) and train.dtype == np.uint8
    # rows of the array are the images of the CSV rows, in order
    first = tiny_folder / splits["train"][0]["path"]
    np.testing.assert_array_equal(train[0], load_image(first, 40))
    assert json.loads((tmp_path / "data/prepared/classes.json").read_text()) == [
        "class_0",
        "class_1",
        "class_2",
    ]


def test_split_is_deterministic_and_depends_on_seed(tmp_path, tiny_folder, monkeypatch):
    first = tmp_path / "a"
    second = tmp_path / "b"
    other_seed = tmp_path / "c"
    for folder in (first, second, other_seed):
        folder.mkdir()
    prepare_in(first, monkeypatch, tiny_folder)
    prepare_in(second, monkeypatch, tiny_folder)
    prepare_in(other_seed, monkeypatch, tiny_folder, seed=1)
    assert read_split(first, "train") == read_split(second, "train")
    assert read_split(first, "train") != read_split(other_seed, "train")


def test_validation_folds_partition_the_training_images_and_keep_the_test_split(
    tmp_path, tiny_folder, monkeypatch
):
    """data.val_fold: train_per_class 6 with val_per_class 2 holds three disjoint folds;
    train + val and test never change."""
    folds = []
    for fold in range(3):
        workdir = tmp_path / f"fold{fold}"
        workdir.mkdir()
        prepare_in(workdir, monkeypatch, tiny_folder, val_fold=fold)
        folds.append({name: {row["path"] for row in read_split(workdir, name)} for name in prepare.SPLITS})
    assert all(len(f["val"]) == 3 * 2 and len(f["train"]) == 3 * 4 for f in folds)
    assert len(set.union(*(f["val"] for f in folds))) == 3 * 6, "the folds' validation images are disjoint"
    assert all(
        f["train"] | f["val"] == folds[0]["train"] | folds[0]["val"] and f["test"] == folds[0]["test"]
        for f in folds
    )
    with pytest.raises(ConfigError, match="data.val_fold must be < 3"):
        prepare_in(tmp_path / "fold0", monkeypatch, tiny_folder, val_fold=3)


def test_test_cap_and_excluded_class(tmp_path, tiny_folder, monkeypatch):
    (tiny_folder / "BACKGROUND_Google").mkdir()
    Image.new("RGB", (50, 50)).save(tiny_folder / "BACKGROUND_Google" / "x.jpg")
    report = prepare_in(tmp_path, monkeypatch, tiny_folder, test_per_class=2)
    assert report["classes"] == 3 and report["test_images"] == 6


def test_bad_files_are_skipped_and_odd_modes_converted(tmp_path, tiny_folder, monkeypatch):
    folder = tiny_folder / "class_0"
    (folder / "tmp").write_bytes(b"not an image at all")
    (folder / "empty.jpg").write_bytes(b"")
    good = (folder / "image_0000.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 3])
    Image.new("L", (60, 50), 128).save(folder / "gray.jpg")
    Image.new("CMYK", (60, 50), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    Image.new("P", (60, 50)).save(folder / "palette.png")
    Image.new("RGBA", (60, 50), (1, 2, 3, 4)).save(folder / "rgba.png")
    report = prepare_in(tmp_path, monkeypatch, tiny_folder)
    skipped = {entry["path"] for entry in report["skipped"]}
    assert {"class_0/tmp", "class_0/empty.jpg", "class_0/truncated.jpg"} <= skipped
    assert report["skipped_files"] == len(report["skipped"]) == 3
    assert load_image(folder / "cmyk.jpg", 32).shape == (32, 32, 3)
    assert load_image(folder / "gray.jpg", 32).shape == (32, 32, 3)
    assert load_image(folder / "palette.png", 32).shape == (32, 32, 3)


def test_class_too_small_names_class_count_and_param(tmp_path, tiny_folder, monkeypatch):
    for extra in sorted((tiny_folder / "class_1").iterdir())[6:]:
        extra.unlink()
    with pytest.raises(DatasetError, match=r"class 'class_1' has 6 readable images; data.train_per_class=6"):
        prepare_in(tmp_path, monkeypatch, tiny_folder)


def test_wrong_source_paths_say_what_was_expected(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        acquire(str(tmp_path / "nowhere"), tmp_path / "raw")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="expected an ImageFolder layout"):
        acquire(str(tmp_path / "flat"), tmp_path / "raw")


def test_caltech_folder_inside_a_parent_is_found(tmp_path, tiny_folder):
    parent = tmp_path / "parent"
    parent.mkdir()
    tiny_folder.rename(parent / "101_ObjectCategories")
    assert acquire(str(parent), tmp_path / "raw") == parent / "101_ObjectCategories"


def official_style_zip(folder: Path, dest: Path) -> tuple[Path, str, str]:
    """A zip shaped like CaltechDATA's caltech-101.zip: caltech-101/101_ObjectCategories.tar.gz inside."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:gz") as tf:
        tf.add(folder, arcname="101_ObjectCategories")
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("caltech-101/101_ObjectCategories.tar.gz", tar_bytes.getvalue())
    return dest, hashlib.md5(dest.read_bytes()).hexdigest(), hashlib.md5(tar_bytes.getvalue()).hexdigest()


@pytest.fixture
def loopback_server(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1; yields (base_url, folder)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", www
    server.shutdown()


def test_download_verifies_and_extracts_the_official_layout(
    tmp_path, tiny_folder, loopback_server, monkeypatch
):
    base, www = loopback_server
    _, zip_md5, tar_md5 = official_style_zip(tiny_folder, www / "caltech-101.zip")
    monkeypatch.setattr(sources, "CALTECH101_URL", f"{base}/caltech-101.zip")
    monkeypatch.setattr(sources, "CALTECH101_ZIP_MD5", zip_md5)
    monkeypatch.setattr(sources, "CALTECH101_TAR_MD5", tar_md5)
    root = acquire("download", tmp_path / "raw")
    assert root.name == "101_ObjectCategories"
    assert sorted(p.name for p in root.iterdir()) == ["class_0", "class_1", "class_2"]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, tiny_folder, loopback_server, monkeypatch):
    base, www = loopback_server
    (www / "caltech-101.zip").write_text("<html>Please sign in</html>")
    monkeypatch.setattr(sources, "CALTECH101_URL", f"{base}/caltech-101.zip")
    with pytest.raises(DatasetError, match="checksum mismatch"):
        acquire("download", tmp_path / "raw")
    assert not any((tmp_path / "raw").iterdir())


def test_no_network_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CALTECH101_URL", "http://127.0.0.1:9/caltech-101.zip")
    raw = tmp_path / "raw"
    with pytest.raises(DatasetError, match="TRANSFERLAB_DATA"):
        acquire("download", raw)
    assert not raw.exists() or not any(raw.iterdir()), "nothing left that the next run would trust"


def test_local_archive_is_used_without_download(tmp_path, tiny_folder, monkeypatch):
    archive, _, tar_md5 = official_style_zip(tiny_folder, tmp_path / "caltech-101.zip")
    monkeypatch.setattr(sources, "CALTECH101_TAR_MD5", tar_md5)
    monkeypatch.setattr(sources, "CALTECH101_URL", "http://127.0.0.1:9/unreachable")
    root = acquire(str(archive), tmp_path / "raw")
    assert len(list(root.iterdir())) == 3


def test_archive_escaping_the_target_is_refused(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload.txt"
    payload.write_text("owned")
    with tarfile.open(evil, "w:gz") as tf:
        tf.add(payload, arcname="../escaped.txt")
    with pytest.raises(DatasetError, match="refusing to extract"):
        acquire(str(evil), tmp_path / "raw" / "inner")
    assert not list(tmp_path.rglob("escaped.txt"))
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("../../escaped.txt", "owned")
    with pytest.raises(DatasetError, match="refusing to extract"):
        acquire(str(evil_zip), tmp_path / "raw" / "inner")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_the_env_var_is_only_a_checked_copy_of_the_official_data(tmp_path, tiny_folder, monkeypatch):
    """TRANSFERLAB_DATA, which DVC does not see, may only say where the official
    data's bytes are: other images are refused (a re-run would look up to date
    on the old ones); data.source, a param DVC sees, names them instead."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tiny_folder))
    with pytest.raises(
        DatasetError,
        match=(
            rf"TRANSFERLAB_DATA={tiny_folder} is not the official Caltech-101 "
            rf".*set data.source: {tiny_folder}"
        ),
    ):
        prepare_in(work, monkeypatch, "download")
    assert not (work / "data/prepared").exists()
    monkeypatch.setattr(
        sources, "CALTECH101_MANIFEST_MD5", sources.manifest_md5(tiny_folder)
    )  # as if it were the official data
    assert prepare_in(work, monkeypatch, "download")["source"] == str(tiny_folder)
    # with data.source naming the images, the variable is ignored
    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    (other / "class_0" / "image_0000.jpg").unlink()
    monkeypatch.setattr(sources, "CALTECH101_MANIFEST_MD5", "0" * 32)
    assert prepare_in(work, monkeypatch, other)["source"] == str(other)
