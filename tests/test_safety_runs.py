"""A run folder belongs to one run: the lock, interrupted writes, diverged weights, a full disk,
file permissions, and what a resume may change."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import TINY, losses, tiny

from swav import checkpoint
from swav.cli import main
from swav.config import ConfigError
from swav.train import train


def _cli_args(run: Path, *extra: str) -> list[str]:
    return [*TINY, f"config.CHECKPOINT.DIR={run}", *extra]


def _lrs(run: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding the folder's lock, as a running `swav train` does."""
    code = textwrap.dedent(f"""
        import time
        from swav.checkpoint import RunFolderLock
        RunFolderLock({str(run)!r}).acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_folder_refuses_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        code = main(["train", *_cli_args(run)])
        err = capsys.readouterr().err
        assert code == 2
        assert f"another swav train (pid {holder.pid} on " in err and str(run) in err
        assert not (run / "train_config.yaml").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # kill -9 leaves no stale lock: the next run goes ahead at once.
    checkpoint.RunFolderLock(run).acquire().release()


def test_stale_temporaries_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = run / ".checkpoint.torch.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    someone_elses = run / ".notes.tmp"
    someone_elses.write_text("keep me")
    train(tiny(run, "config.OPTIMIZER.num_epochs=1", "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=16"))
    assert not stale.exists() and someone_elses.exists()
    assert "removed 1 temporary files of interrupted writes" in (run / "log.txt").read_text()


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    # The second save hangs half-written, as a process killed mid-write would leave it.
    code = textwrap.dedent(f"""
        import sys, time, torch
        from swav import checkpoint
        from swav.config import load_config
        from swav.train import train
        real_save, calls = torch.save, []
        def slow_save(obj, f, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"half a checkpoint")
                f.flush()
                print("writing", flush=True)
                time.sleep(120)
            return real_save(obj, f, *a, **k)
        checkpoint.torch.save = slow_save
        train(load_config({_cli_args(run, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        while (line := proc.stdout.readline()) and line.strip() != "writing":
            pass
        assert line.strip() == "writing", "the second checkpoint write never started"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert list(run.glob(".checkpoint.torch.*.tmp"))
    assert checkpoint.load(run / checkpoint.CHECKPOINT_NAME)["iteration"] == 1
    result = train(tiny(run), stop_after_iters=2)
    assert result["iteration"] == 2 and not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# What gets saved
# ----------------------------------------------------------------------------------------------


def test_diverged_weights_are_never_saved(tmp_path, monkeypatch):
    import swav.train as train_module

    real_step = train_module.train_step

    def diverging_step(ctx, crops, iteration, lr, **kwargs):
        loss = real_step(ctx, crops, iteration, lr, **kwargs)
        if iteration == 3:  # just before a save: a finite loss, but weights and BN statistics gone to infinity
            core = train_module.unwrap(ctx.model)
            with torch.no_grad():
                next(core.trunk.parameters()).fill_(float("inf"))
                for m in core.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_var.fill_(float("inf"))
        return loss

    monkeypatch.setattr(train_module, "train_step", diverging_step)
    with pytest.raises(FloatingPointError, match="not finite.*last good checkpoint stays"):
        train(tiny(tmp_path, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2"))
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert state["iteration"] == 2
    assert not checkpoint.non_finite_tensors(state["model"])


def test_previous_checkpoint_is_kept_and_a_damaged_latest_falls_back_to_it(tmp_path, caplog):
    train(tiny(tmp_path, "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1"), stop_after_iters=3)
    latest = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    prev = checkpoint.load(tmp_path / checkpoint.PREV_NAME)
    assert (latest["iteration"], prev["iteration"]) == (3, 2)
    # A copy cut short: the rerun resumes one checkpoint earlier instead of refusing.
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:5000])
    result = train(tiny(tmp_path), stop_after_iters=4)
    assert result["iteration"] == 4
    log = (tmp_path / "log.txt").read_text()
    assert "checkpoint.torch cannot be read" in log and "resuming from checkpoint.prev.torch, iteration 2" in log


def test_both_checkpoints_damaged_is_a_clear_error(tmp_path):
    for name in (checkpoint.CHECKPOINT_NAME, checkpoint.PREV_NAME):
        (tmp_path / name).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.DamagedCheckpoint, match="previous one is damaged too"):
        train(tiny(tmp_path))


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        checkpoint.save_atomic({"x": torch.zeros(2)}, tmp_path / "a.torch")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.torch").stat().st_mode) == 0o664


def _limited_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_is_one_line_and_the_previous_checkpoint_stays(tmp_path):
    run = tmp_path / "run"
    train(tiny(run, "config.OPTIMIZER.num_epochs=1"))
    before = (run / checkpoint.CHECKPOINT_NAME).read_bytes()
    # Files over 1 MB fail to grow (EFBIG; Python ignores SIGXFSZ): a full disk for a checkpoint,
    # while the small logs still write.
    proc = subprocess.run(
        [sys.executable, "-m", "swav", "train", *_cli_args(run, "config.OPTIMIZER.num_epochs=2")],
        capture_output=True, text=True, timeout=300, preexec_fn=_limited_file_size(1_000_000),
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "the disk is full" in proc.stderr and "Traceback" not in proc.stderr
    assert "MB" in proc.stderr and "previous checkpoint is intact" in proc.stderr
    assert "the disk is full" in (run / "log.txt").read_text()
    assert (run / checkpoint.CHECKPOINT_NAME).read_bytes() == before
    assert not list(run.glob(".*.tmp"))


# ----------------------------------------------------------------------------------------------
# Resume compares the config
# ----------------------------------------------------------------------------------------------


def test_resume_with_changed_meaning_stops_before_writing(tmp_path):
    train(tiny(tmp_path), stop_after_iters=3)
    saved = {name: (tmp_path / name).read_bytes() for name in ("train_config.yaml", "metrics.jsonl", "checkpoint.torch")}
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=4", "config.SEED_VALUE=3"))
    message = str(e.value)
    assert "DATA.TRAIN.BATCHSIZE_PER_REPLICA: 8 -> 4" in message and "SEED_VALUE: 0 -> 3" in message
    assert "config.CHECKPOINT.RESUME_CHANGED=true" in message and "another config.CHECKPOINT.DIR" in message
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    # The prototypes' shape change is caught by the same check, not by a size-mismatch traceback.
    with pytest.raises(ConfigError, match="num_clusters"):
        train(tiny(tmp_path, 'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 64, 16], "use_bn": true, "num_clusters": [30, 12]}]]'))


def test_resume_accepts_safe_changes_and_the_opt_in(tmp_path):
    train(tiny(tmp_path), stop_after_iters=3)
    train(tiny(tmp_path, "config.LOG_FREQUENCY=2"), stop_after_iters=4)
    log = (tmp_path / "log.txt").read_text()
    assert "resume: LOG_FREQUENCY changed from 1 to 2" in log
    assert len(list(tmp_path.glob("train_config.*.yaml"))) == 1  # the old config is kept
    train(tiny(tmp_path, "config.LOSS.swav_loss.temperature=0.2", "config.CHECKPOINT.RESUME_CHANGED=true"),
          stop_after_iters=5)
    assert "LOSS.swav_loss.temperature changed from 0.1 to 0.2 (accepted" in (tmp_path / "log.txt").read_text()
    assert "temperature: 0.2" in (tmp_path / "train_config.yaml").read_text()


def test_more_epochs_continue_the_lr_without_a_jump(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for run in (whole, parts):
        train(tiny(run), stop_after_iters=6)  # 2 epochs of 4 iterations planned, stopped in the cosine
    train(tiny(whole, "config.OPTIMIZER.num_epochs=4"))
    assert "OPTIMIZER.num_epochs changed from 2 to 4" in (whole / "log.txt").read_text()
    lrs = _lrs(whole)
    assert len(lrs) == 16
    # After the warm-up (4 iterations) the LR only goes down, also across the resume; a schedule
    # recomputed for 16 iterations would jump back up at iteration 7.
    tail = lrs[4:]
    assert all(b <= a + 1e-12 for a, b in zip(tail, tail[1:], strict=False)), lrs
    assert lrs[-1] == pytest.approx(tiny(whole).OPTIMIZER.param_schedulers.lr.scaled.end_value)
    # The restart point is saved: the lengthened run stopped and resumed again follows the same LRs.
    train(tiny(parts, "config.OPTIMIZER.num_epochs=4"), stop_after_iters=11)
    train(tiny(parts, "config.OPTIMIZER.num_epochs=4"))
    assert _lrs(parts) == pytest.approx(lrs, rel=1e-12)
    assert losses(parts) == pytest.approx(losses(whole), rel=1e-5, abs=1e-6)


def test_a_refused_resume_is_one_line_on_the_command_line(tmp_path):
    train(tiny(tmp_path), stop_after_iters=2)
    proc = subprocess.run([sys.executable, "-m", "swav", "train", *_cli_args(tmp_path, "config.SEED_VALUE=5")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "SEED_VALUE: 0 -> 5" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# Several processes
# ----------------------------------------------------------------------------------------------


def test_unreadable_images_are_counted_over_ranks_and_logged_by_each(tmp_path):
    data = tmp_path / "images" / "cls"
    data.mkdir(parents=True)
    for i in range(32):
        if i % 8 == 3:  # 4 files that are no images, none next to another
            (data / f"{i:02d}.png").write_bytes(b"not an image")
        else:
            Image.new("RGB", (20, 20), (i * 7, 0, 255 - i * 7)).save(data / f"{i:02d}.png")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "swav", "train", *_cli_args(run, "config.OPTIMIZER.num_epochs=1",
         "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]", f"config.DATA.TRAIN.DATA_PATHS=[{data.parent}]",
         "config.DISTRIBUTED.NUM_PROC_PER_NODE=2")],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "log.txt").read_text()
    # 2 iterations of 2 x 8 images visit all 32 once: the summary has both ranks' replacements.
    assert "epoch 1: 4 unreadable images were replaced" in log
    per_image = [line for line in log.splitlines() if "unreadable image " in line]
    assert len(per_image) == 4
    assert any("[rank 1]" in line for line in per_image) and any("[rank" not in line for line in per_image)
    # The console has the summary, not the paths.
    assert "unreadable image " not in proc.stdout + proc.stderr


def test_a_bad_transform_is_a_config_error_before_anything_is_written(tmp_path):
    bad = ('config.DATA.TRAIN.TRANSFORMS=[{"name": "ImgPilToMultiCrop", "total_num_crops": 2, "num_crops": [2], '
           '"size_crops": [16], "crop_scales": [[0.3, 1]]}, {"name": "NoSuchTransform"}, {"name": "ToTensor"}]')
    with pytest.raises(ConfigError, match="config.DATA.TRAIN.TRANSFORMS: .*NoSuchTransform"):
        train(tiny(tmp_path, bad))
    assert not (tmp_path / "train_config.yaml").exists()
