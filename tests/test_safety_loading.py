"""Loading a file never runs code from it: every entry point refuses pickles of arbitrary objects.

Each malicious file here would create a marker file when unpickled; the tests check that every
command refuses it with one clear line and that the marker never appears.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib

import numpy as np
import pytest
import torch
import torchvision
from test_train import TINY as TRAIN_TINY

from swav import checkpoint
from swav.cli import main
from swav.config import load_config, to_yaml
from swav.data.datasets import FileListDataset
from swav.eval.svm import load_label_matrix
from swav.models import ResNet
from swav.train import train
from swav.weights import UntrustedPickleError, load_file, load_trunk_weights

TINY = [  # as tests/test_eval_commands.py: ResNet-18, 32-px synthetic shapes, CPU
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=40",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=20",
    "config.DATA.NUM_DATALOADER_WORKERS=0",
    "config.EVAL.BATCH_SIZE=16",
    "config.MACHINE.DEVICE=cpu",
]


class Payload:
    """Unpickles into a call of ``Path.touch(marker)``: proof that code from the file ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path) -> pathlib.Path:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "code from a loaded file ran"


def _trunk_state() -> dict:
    return torchvision.models.resnet18().state_dict()


def _malicious_weights(tmp_path, marker) -> pathlib.Path:
    """A real torchvision state dict with the payload beside it."""
    path = tmp_path / "evil.pth"
    torch.save({**_trunk_state(), "extra": Payload(marker)}, path)
    return path


def _malicious_checkpoint(path: pathlib.Path, marker) -> pathlib.Path:
    """Shaped like a swav training checkpoint, plus the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "model": {}, "iteration": 1,
                "epoch": 0, "extra": Payload(marker)}, path)
    return path


def _legacy_file(tmp_path) -> pathlib.Path:
    """An old official-style checkpoint: training arguments pickled as an argparse.Namespace."""
    path = tmp_path / "legacy.pth.tar"
    state = {f"module.{k}": v for k, v in _trunk_state().items() if not k.startswith("fc.")}
    torch.save({"epoch": 100, "arch": "resnet18", "args": argparse.Namespace(arch="resnet18", lr=4.8),
                "state_dict": state}, path)
    return path


def _one_clear_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("swav:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command, extra", [
    ("knn", []),
    ("linear", ["config.EVAL.LINEAR.NUM_EPOCHS=1"]),
    ("semisup", ["config.EVAL.SEMISUP.NUM_EPOCHS=1", "config.EVAL.SEMISUP.BATCH_SIZE=8"]),
    ("svm", ["config.EVAL.SVM.COSTS=[1.0]"]),
    ("extract", []),
])
def test_eval_commands_refuse_a_malicious_params_file(tmp_path, marker, capsys, command, extra):
    weights = _malicious_weights(tmp_path, marker)
    argv = [command, *TINY, f"config.CHECKPOINT.DIR={tmp_path / 'out'}",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={weights}", *extra]
    assert main(argv) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert "PARAMS_FILE" in line and "refusing to load" in line and str(weights) in line
    assert "could run any code" in line and "config.MODEL.WEIGHTS_INIT.TRUST_PICKLE=true" in line
    assert "the first one refused: getattr" in line  # Path.touch is pickled as getattr(Path, "touch")


def test_export_refuses_a_malicious_file(tmp_path, marker, capsys):
    weights = _malicious_weights(tmp_path, marker)
    out = tmp_path / "trunk.pth"
    assert main(["export", str(weights), str(out)]) == 2
    line = _one_clear_line(capsys.readouterr().err)
    assert "refusing to load" in line and "--trust-pickle" in line
    assert not out.exists()


def test_resume_refuses_a_malicious_checkpoint(tmp_path, marker):
    _malicious_checkpoint(tmp_path / checkpoint.CHECKPOINT_NAME, marker)
    with pytest.raises(RuntimeError, match="refusing to load .*could run code"):
        train(load_config([*TRAIN_TINY, f"config.CHECKPOINT.DIR={tmp_path}"]))


def test_report_skips_the_gallery_of_a_malicious_checkpoint(tmp_path, marker, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text(to_yaml(load_config([*TRAIN_TINY, f"config.CHECKPOINT.DIR={run}"])))
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "epoch": 0, "loss": 3.0, "lr": 0.1}) + "\n")
    _malicious_checkpoint(run / checkpoint.FINAL_NAME, marker)
    assert main(["report", str(run), "--num-images", "8"]) == 0
    out = capsys.readouterr().out
    assert "note: No cluster gallery: refusing to load" in out and "report written to" in out
    assert "refusing to load" in (run / "report" / "index.html").read_text()


def test_npy_file_list_of_objects_is_refused(tmp_path, marker, capsys):
    listing = tmp_path / "files.npy"
    np.save(listing, np.array(["a.png", Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"refusing to load.*could run code.*dtype=str\).*'<U\.\.\.'.*\.txt list"):
        FileListDataset(str(listing))
    # Through a command: one line, no traceback.
    argv = ["knn", *TINY, f"config.CHECKPOINT.DIR={tmp_path / 'out'}",
            "config.DATA.TRAIN.DATA_SOURCES=[disk_filelist]", f"config.DATA.TRAIN.DATA_PATHS=[{listing}]"]
    assert main(argv) == 2
    assert "fixed-width string array" in _one_clear_line(capsys.readouterr().err)


def test_npy_file_list_of_fixed_width_strings_still_loads(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"")  # only existence is checked here
    np.save(tmp_path / "files.npy", np.array(["a.png", "b.png"], dtype=str))
    assert [p for p, _ in FileListDataset(str(tmp_path / "files.npy")).samples] == [
        str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_svm_label_matrix_of_objects_is_refused(tmp_path, marker):
    path = tmp_path / "labels.npy"
    np.save(path, np.array([[1, 0], [0, Payload(marker)]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="refusing to load.*could run code.*as a .txt matrix"):
        load_label_matrix(path, 2)


def test_legacy_file_needs_the_opt_in(tmp_path, capsys):
    legacy = _legacy_file(tmp_path)
    with pytest.raises(UntrustedPickleError, match=r"argparse\.Namespace"):
        load_trunk_weights(ResNet(depth=18), legacy)
    base = ["extract", *TINY, f"config.CHECKPOINT.DIR={tmp_path / 'out'}", "config.EVAL.FEATURES.SPLITS=[test]",
            f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={legacy}"]
    assert main(base) == 2
    assert "argparse.Namespace" in _one_clear_line(capsys.readouterr().err)
    # Opted in: it loads, with a warning that names the file and the risk.
    assert main([*base, "config.MODEL.WEIGHTS_INIT.TRUST_PICKLE=true"]) == 0
    warning = next(line for line in (tmp_path / "out" / "log.txt").read_text().splitlines() if "WARNING" in line)
    assert str(legacy) in warning and "argparse.Namespace" in warning and "can run any code" in warning
    saved = torch.load(tmp_path / "out" / "features" / "test_res5.torch", weights_only=True)
    assert saved["features"].shape == (20, 512)
    # swav export takes the same opt-in as a flag; what it writes is a plain, safe file.
    out = tmp_path / "trunk.pth"
    assert main(["export", str(legacy), str(out)]) == 2
    assert main(["export", str(legacy), str(out), "--trust-pickle"]) == 0
    assert load_trunk_weights(ResNet(depth=18), out)["format"] == "trunk state dict"


def test_the_opt_in_really_trusts_the_file(tmp_path):
    # What TRUST_PICKLE risks, shown: the same malicious file runs its code once trusted.
    ran = tmp_path / "ran"
    weights = _malicious_weights(tmp_path, ran)
    with pytest.raises(UntrustedPickleError):
        load_file(weights)
    assert not ran.exists()
    load_file(weights, trust_pickle=True)
    assert ran.exists()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_plain_tensor_files_load_without_the_opt_in_or_a_warning(tmp_path):
    torch.save(_trunk_state(), tmp_path / "tv.pth")
    # On the swav logger itself: setup_logging (run by other tests) stops it propagating to caplog.
    records = _Records()
    logging.getLogger("swav").addHandler(records)
    try:
        info = load_trunk_weights(ResNet(depth=18), tmp_path / "tv.pth", trust_pickle=True)
    finally:
        logging.getLogger("swav").removeHandler(records)
    assert info["format"] == "torchvision state dict" and records.records == []
