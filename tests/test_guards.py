"""Bad input fed to the real code paths: odd image files, broken downloads and archives, broken params,
untrusted checkpoints, running out of memory. Each must end in a clear error or a reported skip, and
leave nothing behind that a later run would trust."""

from __future__ import annotations

import http.server
import io
import os
import re
import struct
import subprocess
import sys
import tarfile
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import tiny_params
from test_prepare import prepare_in
from transferlab import resume, sources, training
from transferlab.config import load_params
from transferlab.errors import ConfigError, DatasetError, DivergedError, ModelError
from transferlab.paths import checkpoint_path, resume_path
from transferlab.sources import MAX_IMAGE_PIXELS, acquire, load_image
from transferlab.stages import evaluate, features, probe
from transferlab.tools import cli
from transferlab.trained_model import TrainedModel

STAGE = [sys.executable, "-m"]


def write_png(path: Path, width: int, height: int) -> None:
    """A real, fully decodable greyscale PNG of width x height black pixels: a few hundred KB for ~100 MP."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = (
        zlib.compressobj(9),
        b"\0" * (width + 1),
        [],
    )  # each row: filter byte 0, then pixels
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


# --- bad data -----------------------------------------------------------------------------------------------


def test_text_named_jpg_and_decompression_bombs_are_skipped_with_the_reason(
    tmp_path, tiny_folder, monkeypatch
):
    folder = tiny_folder / "class_0"
    (folder / "notes.jpg").write_text("these are my notes, not a photo")
    write_png(folder / "bomb.png", 12_000, 8_000)  # 96 MP: over the guard, under Pillow's own error threshold
    write_png(folder / "bigger_bomb.png", 20_000, 10_000)  # 200 MP: Pillow itself refuses it
    assert (folder / "bomb.png").stat().st_size < 1_000_000
    report = prepare_in(tmp_path, monkeypatch, tiny_folder)
    reasons = {entry["path"]: entry["reason"] for entry in report["skipped"]}
    assert reasons.keys() == {"class_0/notes.jpg", "class_0/bomb.png", "class_0/bigger_bomb.png"}
    assert reasons["class_0/notes.jpg"].startswith("UnidentifiedImageError")
    assert (
        "12000 x 8000 pixels is over the 89,478,485-pixel limit (decompression-bomb guard)"
        in reasons["class_0/bomb.png"]
    )
    assert reasons["class_0/bigger_bomb.png"].startswith(
        "DecompressionBombError: Image size (200000000 pixels) exceeds limit"
    )
    assert report["train_images"] == 12, "the split is made of the readable images alone"
    # the guard is the only thing between such a file and a full decode: one pixel under it is read
    assert 12_000 * 8_000 > MAX_IMAGE_PIXELS > 12_000 * 7_000
    write_png(tmp_path / "large.png", 12_000, 7_000)
    assert load_image(tmp_path / "large.png", 32).shape == (32, 32, 3)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    Image.fromarray(np.tile(ramp, (64, 1))).save(tmp_path / "deep.png")  # PNG, 16 bits per pixel
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png", 32)
    assert grey.shape == (32, 32, 3) and np.all(grey == 128), (
        "mid-grey stays mid-grey (Pillow alone makes it white)"
    )
    row = load_image(tmp_path / "deep.png", 64)[32, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and np.all(np.diff(row) >= -2), (
        "the ramp stays a ramp from black to white"
    )
    wide = np.tile(
        np.linspace(-1000, 1_000_000, 64).round().astype(np.int32), (64, 1)
    )  # 32-bit TIFF, beyond 16 bits
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    row = load_image(tmp_path / "wide.tif", 64)[32, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and np.all(np.diff(row) >= -2), (
        "stretched over its own range, not clipped"
    )


def test_empty_class_folder_is_an_error_naming_the_class_count_and_param(tmp_path, tiny_folder, monkeypatch):
    (tiny_folder / "class_3").mkdir()
    with pytest.raises(
        DatasetError, match=r"class 'class_3' has 0 readable images; data.train_per_class=6 needs at least 7"
    ):
        prepare_in(tmp_path, monkeypatch, tiny_folder)
    assert (
        not (tmp_path / "data" / "prepared").exists() and not (tmp_path / "metrics" / "prepare.json").exists()
    )


def test_a_dataset_folder_one_level_too_high_says_where_to_point(tmp_path, tiny_folder, monkeypatch):
    parent = tmp_path / "my_dataset"
    parent.mkdir()
    tiny_folder.rename(parent / "images")  # my_dataset/images/class_0/*.jpg, and data.source: my_dataset
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(
        DatasetError,
        match=(
            r"hold only folders \(such as .*my_dataset/images/class_0\), "
            r"so the data source points one level too high"
        ),
    ):
        prepare_in(work, monkeypatch, parent)
    # one level too low (a class folder of images) says what layout it expects
    with pytest.raises(DatasetError, match="expected an ImageFolder layout"):
        acquire(str(parent / "images" / "class_0"), tmp_path / "raw")


# --- bad downloads and archives ----------------------------------------------------------------------------


class CutShort(http.server.BaseHTTPRequestHandler):
    """Announces 100 kB, sends 40 kB, hangs up: a connection lost mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"PK" + b"\0" * 39_998)
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_a_download_cut_halfway_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(sources, "CALTECH101_URL", f"http://127.0.0.1:{server.server_port}/caltech-101.zip")
    raw = tmp_path / "raw"
    try:
        with pytest.raises(DatasetError, match="was cut short: 40000 of 100000 bytes"):
            acquire("download", raw)
    finally:
        server.shutdown()
    assert not any(raw.iterdir()), "no partial download where the next run would look"


def test_a_web_page_given_as_the_local_archive_is_an_error(tmp_path):
    page = tmp_path / "caltech-101.zip"
    page.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    with pytest.raises(DatasetError, match="neither a zip nor a tar archive"):
        acquire(str(page), tmp_path / "raw")
    assert not any((tmp_path / "raw").iterdir())


def test_a_damaged_or_cut_short_local_archive_is_an_error_and_leaves_nothing(tmp_path, tiny_folder):
    whole = tmp_path / "images.tar.gz"
    with tarfile.open(whole, "w:gz") as tf:
        tf.add(tiny_folder, arcname="images")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    tail_cut = (
        tmp_path / "tail_cut.tar.gz"
    )  # every member extracts: only the gzip trailer (checksum, length) is lost
    tail_cut.write_bytes(whole.read_bytes()[:-8])
    damaged = tmp_path / "damaged.zip"
    with zipfile.ZipFile(damaged, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(next((tiny_folder / "class_0").iterdir()), "images/class_0/photo.jpg")
    data = bytearray(damaged.read_bytes())
    data[60:80] = bytes(
        20
    )  # inside the compressed photo: the archive's directory is intact, its contents not
    damaged.write_bytes(bytes(data))
    for archive in (cut, tail_cut, damaged):
        raw = tmp_path / f"raw_{archive.stem}"
        with pytest.raises(
            DatasetError, match=rf"{archive.name} is damaged or cut short \(\w+: .*\): get it again"
        ):
            acquire(str(archive), raw)
        assert not any(raw.iterdir()), "nothing of a damaged archive is kept"


def add_member(
    tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, target: str = "", data: bytes = b"owned"
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "member",
    [
        pytest.param(lambda tf, outside: add_member(tf, str(outside / "absolute.txt")), id="absolute-path"),
        pytest.param(
            lambda tf, outside: add_member(tf, "images/link", tarfile.SYMTYPE, str(outside)),
            id="symlink-outside",
        ),
        pytest.param(
            lambda tf, outside: add_member(tf, "images/up", tarfile.SYMTYPE, "../../../outside"),
            id="relative-symlink-outside",
        ),
        pytest.param(
            lambda tf, outside: add_member(tf, "images/hard", tarfile.LNKTYPE, str(outside / "secret.txt")),
            id="hardlink-outside",
        ),
    ],
)
def test_tar_members_pointing_outside_the_target_are_refused(tmp_path, member):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        add_member(tf, "images/class_0/ok.txt", data=b"fine")
        member(tf, outside)
        add_member(tf, "images/link/planted.txt")  # written through the link, if the link were made
    raw = tmp_path / "raw"
    with pytest.raises(DatasetError, match="refusing to extract"):
        acquire(str(archive), raw)
    assert (
        sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
        and (outside / "secret.txt").read_text() == "secret"
    )
    assert not any(raw.iterdir()), "nothing of a refused archive is kept"


def test_zip_with_an_absolute_path_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(str(tmp_path / "absolute.txt"), "owned")
    with pytest.raises(DatasetError, match="refusing to extract"):
        acquire(str(archive), tmp_path / "raw")
    assert not (tmp_path / "absolute.txt").exists() and not any((tmp_path / "raw").iterdir())


# --- bad params and untrusted files ------------------------------------------------------------------------


def test_params_that_are_not_valid_yaml_fail_before_any_work_naming_the_line(tmp_path):
    params = yaml.safe_dump(tiny_params(), sort_keys=False).replace("train:\n", "train:\n  lr: [0.01\n", 1)
    (tmp_path / "params.yaml").write_text(params)
    line = params.splitlines().index("  lr: [0.01") + 2  # the unclosed list runs into the next key
    with pytest.raises(
        ConfigError,
        match=rf"params.yaml is not valid YAML at line {line}, column 7: expected ',' or '\]', but got ':'",
    ):
        load_params(tmp_path / "params.yaml")
    result = subprocess.run(
        [*STAGE, "transferlab.stages.prepare"], cwd=tmp_path, capture_output=True, text=True
    )
    assert (
        result.returncode == 2
        and "prepare: params.yaml is not valid YAML" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "data").exists()


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.fixture
def probe_checkpoint(project):
    """The tiny project with a real linear probe fitted: data/models/probe/model.pt."""
    features.main()
    probe.main()
    return checkpoint_path("probe")


def test_a_checkpoint_that_would_run_code_is_refused_everywhere_it_is_read(
    project, probe_checkpoint, tmp_path, caplog
):
    evil = tmp_path / "evil.pt"
    torch.save({"arch": "resnet18", "classes": ["a"], "model": RunsCode()}, evil)
    with pytest.raises(
        ModelError, match=r"refusing to load .*evil.pt: it holds more than tensors .*GLOBAL posix.system"
    ):
        TrainedModel.load(evil)
    # as the probe LP-FT starts from
    probe_checkpoint.write_bytes(evil.read_bytes())
    with pytest.raises(ModelError, match="refusing to load"):
        training.start_from_probe(torch.nn.Linear(1, 1), "resnet18", "none", ["a"], [], probe_checkpoint)
    # as a training state to resume from: ignored, and the run starts fresh
    state = tmp_path / "state.pt"
    state.write_bytes(evil.read_bytes())
    assert resume.load_state(state, "any") is None and not state.exists()
    assert "ignoring unreadable training state" in caplog.text
    assert not (Path.cwd() / "pwned.txt").exists() and not (tmp_path / "pwned.txt").exists()


def test_truncated_or_foreign_checkpoints_are_clear_errors(probe_checkpoint, tmp_path):
    data = probe_checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "notes.pt").write_text("a text file")  # the unpickler trips on each of these in its own way
    (tmp_path / "page.pt").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    (tmp_path / "curl.pt").write_text(
        "curl: (22) The requested URL returned error: 404\n"
    )  # "c" reads as a GLOBAL
    kinds = {"truncated.pt": "is damaged or cut short", "empty.pt": "is empty: this is not a model file"}
    for name in ("truncated.pt", "empty.pt", "text.pt", "notes.pt", "page.pt", "curl.pt"):
        with pytest.raises(ModelError, match=f"{name} {kinds.get(name, 'is not a model file')}") as error:
            TrainedModel.load(tmp_path / name)
        message = str(error.value)
        assert (
            message.endswith("if it was downloaded or copied, get it again")
            and "re-run that stage" in message
        )
        assert len(message) < 400 and "write it again" not in message
    torch.save({"weights": torch.zeros(3)}, tmp_path / "state_dict.pt")
    with pytest.raises(ModelError, match="not a checkpoint written by a training stage"):
        TrainedModel.load(tmp_path / "state_dict.pt")
    with pytest.raises(
        ModelError, match="not a checkpoint written by a training stage"
    ):  # as LP-FT's starting point
        training.start_from_probe(
            torch.nn.Linear(1, 1), "resnet18", "none", ["a"], [], tmp_path / "state_dict.pt"
        )
    for name in ("truncated.pt", "page.pt"):  # as a training state: ignored, the run starts fresh
        assert resume.load_state(tmp_path / name, "any") is None and not (tmp_path / name).exists()


def test_a_training_state_is_kept_when_reading_it_fails_for_want_of_memory(tmp_path, monkeypatch):
    state = tmp_path / "state.pt"
    torch.save({"fingerprint": "any"}, state)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 8 GB"
        )

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(
        RuntimeError, match="can't allocate memory"
    ):  # the stage's out-of-memory message follows
        resume.load_state(state, "any")
    assert state.exists(), "the state may be fine: it is not deleted"


def test_evaluate_refuses_a_model_trained_on_other_classes(project, probe_checkpoint):
    for run in ("finetune", "scratch"):
        checkpoint_path(run).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(run).write_bytes(probe_checkpoint.read_bytes())
    other = torch.load(checkpoint_path("scratch"), weights_only=True)
    other["classes"] = [
        "class_0",
        "class_2",
        "class_1",
    ]  # same count, other order: every label would be misread
    torch.save(other, checkpoint_path("scratch"))
    with pytest.raises(
        ModelError,
        match=r"scratch/model.pt was trained on 3 classes that are not data/prepared/classes.json's 3",
    ):
        evaluate.evaluate("scratch")
    assert not Path("metrics/test_scratch").exists(), "checked before anything is written"


# --- running out of memory ----------------------------------------------------------------------------------

# Runs a stage with its address space capped a little above what it has mapped after start-up: a large batch
# then fails to allocate in torch's real CPU allocator, as on a machine without the memory.
CAPPED = """
import resource, runpy, sys
# the stage module and the one that does its work (torch, timm)
import transferlab.{module}, transferlab.{work}
mapped = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (mapped + {headroom}, resource.RLIM_INFINITY))
sys.argv = ["transferlab.{module}", *sys.argv[1:]]
runpy.run_module("transferlab.{module}", run_name="__main__")
"""


@pytest.mark.slow
def test_running_out_of_memory_suggests_a_smaller_batch(project):
    project(
        image_size=1024, batch_size=12
    )  # 12 images of 1024 x 1024 through resnet18: several GB of activations
    code = CAPPED.format(module="stages.train", work="training", headroom=1 << 30)
    result = subprocess.run(
        [sys.executable, "-c", code, "finetune"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train finetune: out of memory with train.batch_size: 12" in result.stderr
    assert (
        "Set a smaller train.batch_size in params.yaml (6, say)" in result.stderr
        and "Traceback" not in result.stderr
    )
    assert not checkpoint_path("finetune").exists()


def test_out_of_memory_on_a_gpu_names_the_runs_own_batch_size(project, monkeypatch, capsys):
    from transferlab import training
    from transferlab.stages import train

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["batch_size"] = 4
    Path("params.yaml").write_text(yaml.safe_dump(params))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.6 GiB"
        )

    monkeypatch.setattr(training.Trainer, "step", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["finetune"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "out of memory with train.batch_size: 4 (CUDA out of memory. Tried to allocate 2.00 GiB" in message
    assert "(2, say)" in message
    params["train"]["batch_size"] = 1  # nothing left to halve
    Path("params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit):
        train.main(["finetune"])
    assert "batch_size: 1 (CUDA out of memory" in (message := capsys.readouterr().err)
    assert "already too much: use smaller images or a device with more memory" in message


def test_out_of_memory_in_transferlab_predict_names_its_batch_option(
    probe_checkpoint, tmp_path, monkeypatch, capsys
):
    from transferlab.tools import cli

    Image.new("RGB", (40, 40), "red").save(tmp_path / "photo.jpg")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 8589934592 bytes"
        )

    monkeypatch.setattr(cli, "predict", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            ["predict", str(tmp_path / "photo.jpg"), "--model", str(probe_checkpoint), "--batch-size", "64"]
        )
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    expected = (
        "transferlab predict: out of memory with --batch-size 64 "
        "([enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator"
    )
    assert expected in message
    assert "Set a smaller --batch-size on the command line (32, say)" in message


def test_a_diverging_run_stops_with_advice_and_writes_no_model(project, capsys):
    """A learning rate of 1e9: the loss becomes NaN;
    the stage exits 2 naming the lr and the precision, no model.pt."""
    from transferlab.stages import train

    project(lr=1e9, epochs=2)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["finetune"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert (
        "finetune diverged: the training loss became" in error
        and "Lower train.lr" in error
        and "train.lr: 1e+09" in error
    )
    assert "lr-find finetune" in error and "No model was written" in error
    assert not checkpoint_path("finetune").exists()


def test_divergence_keeps_the_state_saved_before_it(project, monkeypatch):
    """NaN from the second epoch on: the state saved at the end of the first is kept, unchanged,
    and no model is written."""
    project(epochs=2)
    real_step = training.Trainer.step

    def step(self, inputs, indices):
        loss_sum, correct, seen = real_step(self, inputs, indices)
        epoch_two = self.schedule.per_step.last_epoch > len(training.batch_slices(12, 8))
        return (loss_sum * float("nan") if epoch_two else loss_sum), correct, seen

    saved = {}
    real_save = resume.save_state

    def save_state(path, state):
        real_save(path, state)
        saved["bytes"] = path.read_bytes()

    monkeypatch.setattr(training.Trainer, "step", step)
    monkeypatch.setattr(resume, "save_state", save_state)
    with pytest.raises(
        DivergedError,
        match=r"finetune diverged: .* in epoch 2, .*the resumable state saved before it is kept",
    ):
        training.fit("finetune")
    assert resume_path("finetune").read_bytes() == saved["bytes"], (
        "the state of the end of epoch 1, untouched"
    )
    assert not checkpoint_path("finetune").exists()


def test_a_model_with_nan_weights_is_refused_where_it_is_used(probe_checkpoint, tmp_path):
    checkpoint = torch.load(probe_checkpoint, weights_only=True)
    key = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][key] = checkpoint["model"][key] * float("nan")
    torch.save(checkpoint, tmp_path / "diverged.pt")
    with pytest.raises(
        ModelError, match=rf"diverged.pt holds NaN or infinite weights \({re.escape(key)}, 1 tensor"
    ):
        TrainedModel.load(tmp_path / "diverged.pt")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photo.png")
    for command in (
        ["predict", str(tmp_path / "photo.png")],
        ["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*command, "--model", str(tmp_path / "diverged.pt")])
        assert exit_info.value.code == 2


def test_weights_out_of_reach_offline_are_one_line_saying_where_they_were_looked_for(tmp_path, monkeypatch):
    """No network (HF_HUB_OFFLINE is on in the tests;
    torchvision's download is made to fail) and not in the caches."""
    import urllib.error

    from transferlab.models import build_model

    with pytest.raises(ModelError) as error:
        build_model("timm/resnet18", "imagenet", 3)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "model.weights: imagenet: the ImageNet weights of timm/resnet18 are not on"
    )
    assert "timm/resnet18.a1_in1k in the Hugging Face cache" in message and "HF_HUB_OFFLINE is on" in message
    assert "set model.weights to a state-dict file" in message

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        ModelError,
        match=(
            r"weights of resnet18 are not on .*URLError.*resnet18-\w+\.pth "
            r"in torchvision's cache .*torch/hub/checkpoints"
        ),
    ):
        build_model("resnet18", "imagenet", 3)


@pytest.mark.slow
def test_a_rejected_param_names_the_command_that_restores_the_workspace_and_temp_runs_leave_it_alone(
    reproduced,
):
    """`dvc exp run -S train.epochs=-1` in the workspace: DVC has removed the stage's outputs (git-tracked
    metrics included) and written the value into params.yaml before the stage refuses it; the error's line
    names the commands that bring everything back. A --temp run of the same value touches nothing."""
    from conftest import run_command

    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    tracked = reproduced / "metrics/train_finetune/metrics.json"
    before = tracked.read_text()
    bad = subprocess.run(
        ["dvc", "exp", "run", "train_finetune", "-S", "train.epochs=-1"],
        cwd=reproduced,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert bad.returncode != 0
    line = next(line for line in bad.stderr.splitlines() if "train.epochs must be >= 1, got -1" in line)
    assert not tracked.exists(), "DVC removed the stage's outputs before it ran"
    (command, _) = re.findall(r"`([^`]+)`", line)
    assert command == "git checkout params.yaml metrics && dvc checkout", "one command"
    run_command(["bash", "-c", command], reproduced, env)
    assert tracked.read_text() == before and (reproduced / checkpoint_path("finetune")).is_file()
    assert run_command(["dvc", "status", "--json", "dvc.yaml"], reproduced, env).stdout.strip() == "{}"

    temp = subprocess.run(
        ["dvc", "exp", "run", "--temp", "train_finetune", "-S", "train.epochs=-1"],
        cwd=reproduced,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert temp.returncode != 0 and "train.epochs must be >= 1" in temp.stdout + temp.stderr
    assert "git checkout" not in temp.stdout + temp.stderr, "nothing to restore"
    assert tracked.read_text() == before and "epochs: -1" not in (reproduced / "params.yaml").read_text()
