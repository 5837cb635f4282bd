"""Data safety: stop signals during decoding, high-bit-depth images, missing listed files, and
where the replaced-image warnings go (console, log.txt, every rank)."""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav import checkpoint
from swav.config import load_config
from swav.data import (
    FileListDataset,
    MultiCropDataset,
    RobustDataset,
    build_dataset,
    build_loader,
    build_transforms,
    load_rgb,
    missing_files,
    to_rgb,
)
from swav.data.datasets import open_image
from swav.data.transforms import decode_for_crops
from swav.runlog import RunLogger, setup_logging
from swav.train import _StopRequested, train

SPECS = [
    {"name": "ImgPilToMultiCrop", "total_num_crops": 2, "num_crops": [1, 1], "size_crops": [8, 4],
     "crop_scales": [[0.5, 1.0], [0.2, 0.5]]},
    {"name": "ToTensor"},
]

# test_train's tiny run (a ResNet-18 on 16 px crops), on an image folder.
TINY = [
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.OPTIMIZER.num_epochs=50",
    "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=1",
    "config.MODEL.AMP_PARAMS.USE_AMP=false",
    "config.MODEL.TRUNK.RESNETS.DEPTH=18",
    "config.MODEL.TRUNK.RESNETS.SMALL_STEM=true",
    'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 64, 16], "use_bn": true, "num_clusters": [20]}]]',
    "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
    'config.DATA.TRAIN.TRANSFORMS=[{"name": "ImgPilToMultiCrop", "total_num_crops": 4, "num_crops": [2, 2], '
    '"size_crops": [16, 8], "crop_scales": [[0.3, 1], [0.1, 0.3]]}, {"name": "ToTensor"}]',
    "config.LOG_FREQUENCY=1",
    "config.KNN_MONITOR.ENABLED=false",
    "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
]


@pytest.fixture
def swav_logging():
    """Leaves the "swav" logger as an unconfigured process has it (setup_logging changes it)."""
    log = logging.getLogger("swav")
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate, log.level = True, logging.NOTSET


def _png_folder(root: Path, n: int, bad: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (12, 10), (20 * i % 256, 90, 200)).save(root / f"img{i:02d}.png")
    for i in range(bad):
        (root / f"img{i:02d}b.jpg").write_bytes(b"not a jpeg" * 8)
    return root


# ----------------------------------------------------------------------------------------------
# Stop signals during decoding
# ----------------------------------------------------------------------------------------------


class _Oops(Exception):
    """A programming error in a transform: not a bad file."""


DECODING_ERRORS = [OSError("truncated"), Image.UnidentifiedImageError("?"), SyntaxError("bad header"),
                   ValueError("bad header"), EOFError(), struct.error("short"), zlib.error("bad stream"),
                   Image.DecompressionBombError("huge")]


def _failing_once(exc: BaseException):
    """A transform that raises ``exc`` on its first image and decodes the others."""
    calls = []

    def transform(img):
        calls.append(img)
        if len(calls) == 1:
            raise exc
        return np.asarray(to_rgb(img))

    return transform


def test_only_decoding_errors_are_replaced(tmp_path):
    ds = build_dataset(["disk_folder"], [str(_png_folder(tmp_path, 3))])
    for exc in DECODING_ERRORS:
        out, _, replaced = ds.load(0, _failing_once(exc))
        assert replaced and out[0, 0].tolist() == [20, 90, 200], exc  # the next image
    for exc in (_StopRequested("signal 15"), KeyboardInterrupt(), _Oops("a bug")):
        with pytest.raises(type(exc)):
            ds.load(0, _failing_once(exc))


def _slowly_decoded_folder(root: Path, n: int = 16, side: int = 3000) -> Path:
    """Small files (about 30 kB) that take 0.1-0.7 s each to decode and crop, depending on the
    CPU: a batch of 8 takes about a second or more, so a signal sent as training starts arrives
    while images are being decoded."""
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:side, 0:side]
    pattern = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(pattern).save(root / "000.png", compress_level=9)
    data = (root / "000.png").read_bytes()
    for i in range(1, n):
        (root / f"{i:03d}.png").write_bytes(data)
    return root


def _wait_for(path: Path, text: str, alive, seconds: float = 120) -> bool:
    """Whether ``text`` shows up in ``path`` within ``seconds``, while ``alive()``."""
    deadline = time.monotonic() + seconds
    while not (path.exists() and text in path.read_text()):
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _run_config(tmp_path: Path, workers: int):
    data, run = _slowly_decoded_folder(tmp_path / "data"), tmp_path / "run"
    overrides = [*TINY, f"config.DATA.TRAIN.DATA_PATHS=[{data}]", f"config.DATA.NUM_DATALOADER_WORKERS={workers}",
                 f"config.CHECKPOINT.DIR={run}"]
    return overrides, run


def _assert_stopped_cleanly(run: Path) -> None:
    log = (run / "log.txt").read_text()
    assert "unreadable image" not in log  # the stop request was not taken for a bad file
    assert "stopped (signal 15)" in log and "checkpoint saved" in log
    assert (run / checkpoint.CHECKPOINT_NAME).is_file()


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_while_decoding_stops_training(tmp_path, workers, swav_logging):
    """In this process, so it takes seconds: a real SIGTERM while the first batch is decoded
    (here with 0 workers, in the loader workers with 2)."""
    overrides, run = _run_config(tmp_path, workers)
    training = threading.Event()
    training.set()

    def stop_once_training() -> None:
        if _wait_for(run / "log.txt", "training:", training.is_set):
            # Workers: until they are up and decoding (forked in well under a second), but before
            # a fast CPU has decoded the few batches that stop_after_iters allows.
            time.sleep(0.5 if workers else 0.0)
            os.kill(os.getpid(), signal.SIGTERM)

    # Whatever happens, a SIGTERM after train() has returned must not end pytest.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    sender = threading.Thread(target=stop_once_training, daemon=True)
    try:
        sender.start()
        # stop_after_iters: when the signal is swallowed, training ends anyway, a few batches on.
        result = train(load_config(overrides), stop_after_iters=4)
    finally:
        training.clear()
        sender.join(timeout=10)
        signal.signal(signal.SIGTERM, previous)
    assert result.get("stopped") and result["iteration"] < 4
    _assert_stopped_cleanly(run)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_sigterm_while_decoding_stops_swav_train(tmp_path):
    """The same as a user sees it: `swav train` in the foreground, SIGTERM to its process group."""
    overrides, run = _run_config(tmp_path, workers=0)
    proc = subprocess.Popen([sys.executable, "-m", "swav", "train", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        if not _wait_for(run / "log.txt", "training:", lambda: proc.poll() is None):
            proc.kill()
            pytest.fail(proc.communicate()[0][-3000:])
        os.killpg(proc.pid, signal.SIGTERM)  # decoding the first batch takes seconds
        try:
            # About 7 s on a 2-core machine at load 6; a swallowed signal trains on for minutes.
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("still training 30 s after SIGTERM")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    _assert_stopped_cleanly(run)


# ----------------------------------------------------------------------------------------------
# High bit depth
# ----------------------------------------------------------------------------------------------

RAMP8 = np.arange(256, dtype=np.uint8)


def _ramp(dtype, lo: float, hi: float, rows: int = 4) -> np.ndarray:
    """A left-to-right ramp, lo to hi in 256 steps."""
    return np.linspace(lo, hi, 256).astype(dtype)[None, :].repeat(rows, 0)


def _png16(path: Path, arr: np.ndarray, colour_type: int) -> Path:
    """A 16-bit PNG written by hand (PIL writes 16-bit grey only): colour type 2 RGB, 6 RGBA."""
    height, width = arr.shape[:2]
    rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def _grey_row(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr == arr[..., :1]).all()
    return arr[0, :, 0]


@pytest.fixture
def high_bit_depth_files(tmp_path):
    png16 = tmp_path / "ramp16.png"
    Image.fromarray(_ramp(np.uint16, 0, 65535, rows=256)).save(png16)
    float01 = tmp_path / "ramp01.tif"
    Image.fromarray(_ramp(np.float32, 0.0, 1.0, rows=256)).save(float01)
    float_wide = tmp_path / "ramp_wide.tif"  # not in [0, 1]: stretched from its min to its max
    Image.fromarray(_ramp(np.float32, -2.0, 6.0, rows=256)).save(float_wide)
    int32 = tmp_path / "ramp32.tif"
    Image.fromarray(_ramp(np.int32, 0, 65535, rows=256)).save(int32)
    files = {"I;16": png16, "F": float01, "F wide": float_wide, "I": int32}
    assert {Image.open(p).mode for p in files.values()} == {"I;16", "F", "I"}
    return files


def test_high_bit_depth_images_load_as_the_same_8_bit_ramp(high_bit_depth_files, tmp_path):
    for name, path in high_bit_depth_files.items():
        np.testing.assert_array_equal(_grey_row(load_rgb(str(path))), RAMP8, err_msg=name)
    # 16-bit RGB and RGBA PNGs: PIL itself reads them as 8-bit RGB(A).
    ramp = _ramp(np.uint16, 0, 65535)
    rgb = np.stack([ramp, ramp // 2, 65535 - ramp], -1)
    rgba = np.concatenate([rgb, np.full_like(ramp, 65535)[..., None]], -1)
    for name, arr, colour_type in (("rgb48.png", rgb, 2), ("rgba64.png", rgba, 6)):
        img = load_rgb(str(_png16(tmp_path / name, arr, colour_type)))
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img)[0, :, 0], RAMP8)
        np.testing.assert_array_equal(np.asarray(img)[0, :, 2], 255 - RAMP8)


def test_the_crop_decoder_scales_high_bit_depth_too(high_bit_depth_files):
    transform = build_transforms(SPECS)
    for name, path in high_bit_depth_files.items():
        img, scale = decode_for_crops(open_image(str(path)), [(0, 0, 256, 256)], [256])
        assert scale == 1.0
        np.testing.assert_array_equal(_grey_row(img), RAMP8, err_msg=name)
        crops = transform(open_image(str(path)), torch.Generator().manual_seed(0))
        assert all(c.std() > 0.05 for c in crops), name  # a ramp, not a white or black image


def test_other_high_bit_depth_modes():
    big_endian = Image.frombytes("I;16B", (256, 4), _ramp(">u2", 0, 65535).tobytes())
    np.testing.assert_array_equal(_grey_row(to_rgb(big_endian)), RAMP8)
    wide = Image.fromarray(_ramp(np.int32, -1000, 254000))  # beyond 16 bits: stretched
    np.testing.assert_array_equal(_grey_row(to_rgb(wide)), RAMP8)
    with_nan = _ramp(np.float32, 0.0, 1.0)
    with_nan[:, 0] = np.nan
    row = _grey_row(to_rgb(Image.fromarray(with_nan)))
    assert row[0] == 0 and row[-1] == 255
    flat = to_rgb(Image.fromarray(np.full((4, 4), 7.0, np.float32)))
    assert np.asarray(flat).max() == 0  # no range to scale: black, not an error


# ----------------------------------------------------------------------------------------------
# Missing listed files
# ----------------------------------------------------------------------------------------------


def _file_list(root: Path, good: int, missing: int, missing_first: bool = False) -> Path:
    _png_folder(root / "imgs", good)
    names = [f"imgs/img{i:02d}.png" for i in range(good)]
    gone = [f"imgs/gone{i:03d}.png" for i in range(missing)]
    (root / "list.txt").write_text("\n".join(gone + names if missing_first else names + gone) + "\n")
    return root / "list.txt"


def test_a_list_with_many_missing_files_is_refused_up_front(tmp_path):
    listed = _file_list(tmp_path, good=16, missing=60)  # the first 16 exist
    with pytest.raises(FileNotFoundError) as err:
        FileListDataset(str(listed))
    message = str(err.value)
    assert "60 of the 76 images" in message and "gone000.png" in message and "MAX_MISSING_FRACTION" in message
    assert "gone003.png" not in message  # a few examples, not all 60
    with pytest.raises(FileNotFoundError, match="60 of the 76"):
        build_dataset(["disk_filelist"], [str(listed)])
    # Allowed: built, and each missing file is replaced and counted like an unreadable one.
    ds = build_dataset(["disk_filelist"], [str(listed)], max_missing_fraction=0.8)
    assert len(ds) == 76 and ds[75][2] is True and ds[3][2] is False  # 75 wraps around to 0


def test_a_few_missing_files_are_one_warning(tmp_path, caplog, swav_logging):
    listed = _file_list(tmp_path, good=99, missing=1, missing_first=True)
    swav_logging.propagate = True  # caplog listens at the root logger
    with caplog.at_level(logging.WARNING, logger="swav"):
        ds = FileListDataset(str(listed))  # 1 % of 100: allowed by default
    assert len(ds.missing) == 1 and ds.missing[0].endswith("gone000.png")
    assert [r.getMessage() for r in caplog.records if "do not exist" in r.getMessage()] == [
        f"1 of the 100 images listed in {listed} do not exist, e.g. {ds.missing[0]!r}; "
        "each is replaced by another image and counted"
    ]
    image, label, replaced = RobustDataset(ds)[0]
    assert replaced and image.getpixel((0, 0)) == (0, 90, 200)  # img00, listed next
    with pytest.raises(FileNotFoundError, match="1 of the 100"):
        FileListDataset(str(listed), max_missing_fraction=0.0)


def test_the_missing_fraction_is_checked(tmp_path):
    listed = _file_list(tmp_path, good=2, missing=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"max_missing_fraction must be in \[0, 1\]"):
            FileListDataset(str(listed), max_missing_fraction=bad)
        with pytest.raises(ValueError, match=r"max_missing_fraction must be in \[0, 1\]"):
            build_dataset(["synthetic"], ["train"], max_missing_fraction=bad)
    assert load_config([]).DATA.MAX_MISSING_FRACTION == 0.01


def test_missing_files_finds_exactly_the_missing_ones(tmp_path, monkeypatch):
    _png_folder(tmp_path / "a", 3)
    (tmp_path / "a" / "sub").mkdir()
    paths = [str(tmp_path / "a" / "img00.png"), str(tmp_path / "a" / "nope.png"), str(tmp_path / "a" / "sub"),
             str(tmp_path / "nowhere" / "x.png"), str(tmp_path / "a" / "img02.png") + "/"]
    monkeypatch.chdir(tmp_path / "a")
    paths += ["img01.png", "nope2.png"]  # relative to the working folder
    assert missing_files(paths) == paths[1:5] + ["nope2.png"]
    assert missing_files(paths[:1] * 10_000) == []


# ----------------------------------------------------------------------------------------------
# Replacement warnings: console, log.txt, ranks
# ----------------------------------------------------------------------------------------------


def test_replaced_paths_go_to_log_txt_and_the_console_gets_a_count(tmp_path, capsys, swav_logging):
    data = _png_folder(tmp_path / "data", 4, bad=1)
    bad = str(data / "img00b.jpg")
    setup_logging(tmp_path / "log.txt")
    ds = MultiCropDataset(build_dataset(["disk_folder"], [str(data)]), build_transforms(SPECS), seed=0)
    assert ds.path(1) == bad and ds[1][3] is True
    RunLogger(tmp_path).epoch_summary(0, replaced=1)
    console = capsys.readouterr().out
    assert bad not in console
    assert "epoch 1: 1 unreadable images were replaced by others (their paths are in log.txt)" in console
    log = (tmp_path / "log.txt").read_text()
    assert f"unreadable image {bad} (UnidentifiedImageError" in log and "1 unreadable images were replaced" in log
    # Evaluations count nothing, so there each replaced file is still shown on the console.
    ds.base[1]
    assert bad in capsys.readouterr().out
    # Loader workers (forked) write to the same log.txt.
    (tmp_path / "log.txt").unlink()
    setup_logging(tmp_path / "log.txt")
    loader = build_loader(ds, batch_size=2, num_workers=2, sampler=None, pin_memory=False)
    assert sum(int(b["replaced"].sum()) for b in loader) == 1
    assert f"unreadable image {bad}" in (tmp_path / "log.txt").read_text()


def test_other_ranks_append_their_warnings_to_log_txt(tmp_path, capsys, swav_logging):
    log_file = tmp_path / "run" / "log.txt"
    setup_logging(log_file, console_level=logging.WARNING, rank=1)
    swav_logging.info("rank 1 info")
    assert not log_file.exists()  # opened at the first warning only
    swav_logging.warning("file only", extra={"console": False})
    setup_logging(log_file)  # rank 0, in the same file
    swav_logging.info("rank 0 info")
    setup_logging(log_file, console_level=logging.WARNING, rank=3)
    swav_logging.warning("rank 3 warning")
    RunLogger(tmp_path, enabled=False).epoch_summary(0, replaced=5)  # not rank 0: silent
    lines = log_file.read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "WARNING [rank 1] file only", "INFO rank 0 info", "WARNING [rank 3] rank 3 warning"]
    console = capsys.readouterr().out
    assert "rank 0 info" in console and "rank 3 warning" in console
    assert "rank 1 info" not in console and "file only" not in console
