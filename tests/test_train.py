"""End-to-end training runs at a tiny size: outputs, resume equality, bad data, freezing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from swav import checkpoint
from swav.cli import main
from swav.config import ConfigError, load_config
from swav.runlog import RunLogger
from swav.train import train

TINY = [
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=32",
    "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
    "config.DATA.NUM_DATALOADER_WORKERS=0",
    "config.OPTIMIZER.num_epochs=2",
    "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=1",
    "config.MODEL.AMP_PARAMS.USE_AMP=false",
    "config.MODEL.TRUNK.RESNETS.DEPTH=18",
    "config.MODEL.TRUNK.RESNETS.SMALL_STEM=true",
    'config.MODEL.HEAD.PARAMS=[["swav_head", {"dims": [512, 64, 16], "use_bn": true, "num_clusters": [20, 12]}]]',
    "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
    'config.DATA.TRAIN.TRANSFORMS=[{"name": "ImgPilToMultiCrop", "total_num_crops": 4, "num_crops": [2, 2], '
    '"size_crops": [16, 8], "crop_scales": [[0.3, 1], [0.1, 0.3]]}, {"name": "RandomHorizontalFlip", "p": 0.5}, '
    '{"name": "ImgPilColorDistortion", "strength": 0.5}, {"name": "ToTensor"}]',
    "config.LOG_FREQUENCY=1",
    "config.KNN_MONITOR.ENABLED=false",
]


def tiny(tmp_path: Path, *extra: str):
    return load_config([*TINY, f"config.CHECKPOINT.DIR={tmp_path}", *extra])


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def test_two_iteration_run_writes_every_output(tmp_path):
    train(tiny(tmp_path, "config.OPTIMIZER.num_epochs=1", "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=16"))
    for name in ("train_config.yaml", "log.txt", "metrics.jsonl", checkpoint.CHECKPOINT_NAME, checkpoint.FINAL_NAME):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert {"iteration", "epoch", "loss", "lr", "images_per_sec"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # The saved config is the resolved one and can be given back as config=FILE.
    again = load_config([f"config={tmp_path / 'train_config.yaml'}"])
    assert again.LOSS.swav_loss.num_prototypes == [20, 12]
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert state["iteration"] == 2 and state["epoch"] == 1


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # A queue that starts mid-run and frozen prototypes make the checkpoint carry all the state.
    extra = (
        "config.LOSS.swav_loss.queue.queue_length=16",
        "config.LOSS.swav_loss.queue.start_iter=2",
        'config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[["heads.0.prototypes*", 3]]',
    )
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny(whole, *extra))
    result = train(tiny(parts, *extra), stop_after_iters=3)  # stops mid-epoch (4 iterations per epoch)
    assert result["stopped"] and result["iteration"] == 3
    train(tiny(parts, *extra))
    assert losses(parts) == pytest.approx(losses(whole), rel=1e-5, abs=1e-6)
    a = checkpoint.load(whole / checkpoint.CHECKPOINT_NAME)
    b = checkpoint.load(parts / checkpoint.CHECKPOINT_NAME)
    assert a["iteration"] == b["iteration"] == 8
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in a["loss"].items():
        torch.testing.assert_close(b["loss"][key], value, msg=key)
    # A finished run rerun does nothing more.
    assert train(tiny(parts, *extra))["iteration"] == 8


def test_prototypes_stay_frozen_then_move(tmp_path):
    cfg = tiny(tmp_path, 'config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[["module.heads.0.prototypes0.weight", 4]]',
               "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=1")
    train(cfg, stop_after_iters=1)
    first = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["model"]
    train(cfg, stop_after_iters=4)
    fourth = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["model"]
    train(cfg, stop_after_iters=6)
    sixth = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)["model"]
    name = "heads.0.prototypes0.weight"
    # Frozen: only the per-iteration L2 normalisation touches them (it is idempotent).
    torch.testing.assert_close(fourth[name], first[name])
    assert not torch.allclose(sixth[name], fourth[name])
    # The second prototype set is not frozen.
    assert not torch.allclose(fourth["heads.0.prototypes1.weight"], first["heads.0.prototypes1.weight"])


def test_frozen_pattern_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no parameter"):
        train(tiny(tmp_path, 'config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[["heads.0.protoypes0.weight", 3]]'))


def _image_folder(root: Path, n: int, corrupt: int = 0) -> Path:
    for i in range(n):
        cls = root / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (i * 9 % 255, 80, 160)).save(cls / f"{i:03d}.png")
    for i in range(corrupt):
        (root / "class0" / f"broken{i}.jpg").write_bytes(b"this is not a jpeg")
    return root


def test_corrupt_images_are_replaced_logged_and_counted(tmp_path):
    data = _image_folder(tmp_path / "data", 15, corrupt=1)
    run = tmp_path / "run"
    train(tiny(run, "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]", f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
               "config.OPTIMIZER.num_epochs=1"))
    log = (run / "log.txt").read_text()
    assert "broken0.jpg" in log
    assert "1 unreadable images were replaced" in log


def test_missing_data_path_stops_before_training(tmp_path, capsys):
    code = main(["train", *TINY, f"config.CHECKPOINT.DIR={tmp_path / 'run'}",
                 "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]", f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path / 'nope'}]"])
    assert code == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "run" / checkpoint.CHECKPOINT_NAME).exists()


def test_cli_config_prints_yaml(capsys):
    assert main(["config", "config=pretrain/swav/swav_8node_resnet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config:") and "base_value: 4.8" in out


def test_collapse_warning_names_remedies(tmp_path, caplog):
    log = RunLogger(tmp_path)
    logging.getLogger("swav").propagate = True
    with caplog.at_level(logging.WARNING, logger="swav"):
        log.check_collapse(4.6, level=math.log(100), epoch=0)  # first epoch: too early to tell
        assert not caplog.records
        log.check_collapse(4.6, level=math.log(100), epoch=2)
    log.close()
    assert "collapse" in caplog.text and "TEMP_FROZEN_PARAMS_ITER_MAP" in caplog.text


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = [sys.executable, "-m", "swav", "train", *TINY, f"config.CHECKPOINT.DIR={run}",
            "config.OPTIMIZER.num_epochs=50"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "checkpoint saved" in out
    stopped_at = checkpoint.load(run / checkpoint.CHECKPOINT_NAME)["iteration"]
    assert 2 <= stopped_at < 200
    # The same command resumes where it stopped.
    summary = train(tiny(run, "config.OPTIMIZER.num_epochs=50"), stop_after_iters=stopped_at + 2)
    assert summary["iteration"] == stopped_at + 2
    assert f"resumed from {run / checkpoint.CHECKPOINT_NAME}" in (run / "log.txt").read_text()


def test_nan_loss_stops_with_advice_and_a_dump(tmp_path, capsys):
    # An absurd learning rate blows the weights up within a few iterations.
    code = main(["train", *TINY, f"config.CHECKPOINT.DIR={tmp_path}", "config.OPTIMIZER.param_schedulers.lr.base_value=1e12",
                 "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0", "config.OPTIMIZER.num_epochs=2"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "nan" in err.lower() and "learning rate" in err
    assert list(tmp_path.glob("nan_dump_iter*.pt"))


def test_knn_monitor_scores_trained_and_random_trunks(tmp_path, capsys):
    code = main(["train", *TINY, f"config.CHECKPOINT.DIR={tmp_path}", "config.OPTIMIZER.num_epochs=1",
                 "config.KNN_MONITOR.ENABLED=true", "config.KNN_MONITOR.COMPARE_RANDOM_INIT=true",
                 "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=20", "config.KNN_MONITOR.K=5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "trained" in out and "random init" in out
    results = json.loads((tmp_path / "knn.json").read_text())
    assert results["k"] == 5 and results["epoch"] == 1
    for name in ("trained", "random_init"):
        assert 0.0 <= results[name]["top1"] <= results[name]["top5"] <= 100.0


def test_knn_history_plots_against_training_time_across_a_resume(tmp_path):
    # Monitored every epoch: knn.json keeps every result with the training seconds (evaluations
    # excluded) it took to get there; a resumed run continues both the history and the clock.
    args = ["train", *TINY, f"config.CHECKPOINT.DIR={tmp_path}", "config.KNN_MONITOR.ENABLED=true",
            "config.KNN_MONITOR.EPOCH_FREQUENCY=1", "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=20", "config.KNN_MONITOR.K=5"]
    assert main([*args, "config.OPTIMIZER.num_epochs=2"]) == 0
    assert main([*args, "config.OPTIMIZER.num_epochs=3"]) == 0
    history = json.loads((tmp_path / "knn.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    seconds = [h["train_seconds"] for h in history]
    assert 0 < seconds[0] < seconds[1] < seconds[2]
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["train_seconds"] >= seconds[1]  # the clock went on from the checkpoint
    # the clock does not count evaluation time: training seconds stay below the wall time
    assert steps[-1]["train_seconds"] < steps[-1]["time"] - steps[0]["time"] + seconds[0] + 1


def test_collapse_warning_is_for_a_loss_at_ln_k_not_one_far_above(tmp_path, caplog):
    # A loss twice ln K is a diverging run: calling it a collapse would send the user to the
    # wrong remedies. Several prototype sets: the loss averages them, so the level is the mean.
    from swav.losses import SwAVLoss

    log = RunLogger(tmp_path)
    logging.getLogger("swav").propagate = True
    with caplog.at_level(logging.WARNING, logger="swav"):
        log.check_collapse(2 * math.log(100), level=math.log(100), epoch=3)
        assert not caplog.records
        level = SwAVLoss(num_crops=2, num_prototypes=(20, 12)).collapse_level()
        assert level == pytest.approx((math.log(20) + math.log(12)) / 2)
        log.check_collapse(level, level=level, epoch=3)
    log.close()
    assert "collapse" in caplog.text


def _with_a_cpu_scaler(monkeypatch):
    """float16's gradient scaler, which training makes only for CUDA, on the CPU."""
    import swav.train as training

    real = training.build_step_context

    def with_scaler(*args, **kwargs):
        ctx = real(*args, **kwargs)
        ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        return ctx

    monkeypatch.setattr(training, "build_step_context", with_scaler)


def test_a_float16_forward_that_overflows_skips_the_step_and_leaves_the_queue(tmp_path):
    from swav.build import build_model, build_step_context, place_model
    from swav.train import train_step

    cfg = tiny(tmp_path, "config.LOSS.swav_loss.queue.queue_length=16", "config.LOSS.swav_loss.queue.start_iter=0")
    torch.manual_seed(0)
    model = place_model(cfg, build_model(cfg), torch.device("cpu"))
    ctx = build_step_context(cfg, model, torch.device("cpu"))
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    crops = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)]
    assert train_step(ctx, crops, 0, lr=0.1) is not None
    model.normalize_prototypes()  # what every step does first, skipped or not
    params = [p.detach().clone() for p in model.parameters()]
    queue = ctx.objective.queue.clone()
    crops[1][0, 0, 0, 0] = float("inf")  # what an activation overflowing float16 gives
    assert train_step(ctx, crops, 1, lr=0.1) is None
    for before, after in zip(params, model.parameters(), strict=True):
        torch.testing.assert_close(after, before)  # a step at LR 0.1 moves them far more
    assert torch.equal(queue, ctx.objective.queue)
    assert ctx.scaler.get_scale() == 2.0**8  # the scale multiplies gradients, not the forward pass


def test_float16_overflows_are_skipped_but_ten_in_a_row_stop_the_run(tmp_path, monkeypatch):
    import swav.train as training

    _with_a_cpu_scaler(monkeypatch)
    overflowing = {2, 3}  # iterations (from 0) whose forward pass overflows
    calls = iter(range(10**6))
    monkeypatch.setattr(training, "_overflowed", lambda outputs, device: next(calls) in overflowing)
    train(tiny(tmp_path / "transient"))
    log = (tmp_path / "transient" / "log.txt").read_text().splitlines()
    skipped = [line.split(" ", 3)[3] for line in log if "overflowed" in line]
    assert skipped == [f"iteration {i}: the float16 forward pass overflowed; step skipped ({n} in a row, the run "
                       "stops at 10)" for i, n in ((3, 1), (4, 2))]
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "transient")[4:])
    assert checkpoint.load(tmp_path / "transient" / checkpoint.CHECKPOINT_NAME)["iteration"] == 8

    overflowing = set(range(1, 100))
    calls = iter(range(10**6))
    with pytest.raises(FloatingPointError, match="overflowed in 10 iterations in a row .up to iteration 11"):
        train(tiny(tmp_path / "persistent", "config.OPTIMIZER.num_epochs=4"))


# ------------------------------------------------------------------ the non-finite loss on a GPU


def test_the_loss_watch_names_the_first_non_finite_iteration():
    from swav.train import LossWatch

    watch = LossWatch(torch.device("cpu"))
    for iteration, value in enumerate([1.0, 2.0, float("nan"), 3.0, float("inf")]):
        watch.record(torch.tensor(value), iteration)
    with pytest.raises(FloatingPointError, match="not finite at iteration 2 .read at iteration 5"):
        watch.check(5)
    fine = LossWatch(torch.device("cpu"))
    fine.record(torch.tensor(0.5), 0)
    fine.check(1)  # nothing to say


def _nan_images_at_iteration_5_as_on_a_gpu(monkeypatch) -> None:
    """Steps as on a GPU (the objective does not read the loss) with NaN images at iteration 5:
    the loss, then the weights, are NaN from there on."""
    import swav.train as training

    real_step = training.train_step

    def step_as_on_a_gpu(ctx, crops, iteration, lr, **kwargs):
        ctx.check_each_step = False
        if iteration == 5:
            crops = [torch.full_like(c, float("nan")) for c in crops]
        return real_step(ctx, crops, iteration, lr, **kwargs)

    monkeypatch.setattr(training, "train_step", step_as_on_a_gpu)


def test_without_a_check_per_step_the_logging_window_stops_the_run_and_no_checkpoint_follows(tmp_path, monkeypatch):
    """What a GPU run does (there, reading each step's loss would wait for its kernels): the
    objective does not read the loss, the loop reads the first bad iteration when a window's loss is not finite,
    and before any checkpoint."""
    _nan_images_at_iteration_5_as_on_a_gpu(monkeypatch)
    # 4 iterations an epoch, log lines at epoch ends (4, 8), saves there and every 3 iterations:
    # the save after iteration 6 is the first read after the bad step (iteration 5).
    cfg = tiny(tmp_path, "config.LOG_FREQUENCY=10", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
               "config.OPTIMIZER.num_epochs=3")
    with pytest.raises(FloatingPointError, match="not finite at iteration 5 .read at iteration 6"):
        train(cfg)
    state = checkpoint.load(tmp_path / checkpoint.CHECKPOINT_NAME)
    assert state["iteration"] == 4 and not checkpoint.non_finite_tensors(state["model"])


def test_without_a_check_per_step_a_logging_window_with_a_bad_step_stops_the_run(tmp_path, monkeypatch):
    """Between checkpoints, the window's summed loss (read anyway for the log) shows the bad step,
    and the watch then names its iteration."""
    _nan_images_at_iteration_5_as_on_a_gpu(monkeypatch)
    # Log lines every 3 iterations (3, 6, ...) and at epoch ends (4, 8); no iteration checkpoints:
    # the log line after iteration 6 is the first read after the bad step.
    cfg = tiny(tmp_path, "config.LOG_FREQUENCY=3", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=-1",
               "config.OPTIMIZER.num_epochs=3")
    with pytest.raises(FloatingPointError, match="not finite at iteration 5 .read at iteration 6"):
        train(cfg)


def test_augmenting_in_the_step_trains_exactly_as_augmenting_in_the_loader(tmp_path):
    # DATA.TRAIN.GPU_AUGMENT is meant for GPUs; on the CPU the same ops on the same numbers must
    # give the same run, bit for bit (the loader's path is the one tested against PIL).
    # Every op (blur and normalisation too), and the uint8 crops and draws through a worker process.
    ops = ['config.DATA.TRAIN.TRANSFORMS=[{"name": "ImgPilToMultiCrop", "total_num_crops": 4, "num_crops": [2, 2], '
           '"size_crops": [16, 8], "crop_scales": [[0.3, 1], [0.1, 0.3]]}, {"name": "RandomHorizontalFlip", "p": 0.5}, '
           '{"name": "ImgPilColorDistortion", "strength": 1.0}, {"name": "ImgPilGaussianBlur", "p": 0.5}, '
           '{"name": "ToTensor"}, {"name": "Normalize", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}]',
           "config.DATA.NUM_DATALOADER_WORKERS=1"]
    train(tiny(tmp_path / "loader", *ops))
    train(tiny(tmp_path / "step", *ops, "config.DATA.TRAIN.GPU_AUGMENT=true"))
    assert losses(tmp_path / "step") == losses(tmp_path / "loader")
    a = checkpoint.load(tmp_path / "loader" / checkpoint.FINAL_NAME)["model"]
    b = checkpoint.load(tmp_path / "step" / checkpoint.FINAL_NAME)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
