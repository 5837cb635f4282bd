"""Several processes: launcher parsing, SyncBN groups, synchronised BatchNorm, and whole runs on gloo.

The end-to-end tests start real processes on loopback (`swav train` spawning its workers, and
torchrun), each with a timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swav.config import ConfigError
from swav.distributed import (
    env_from_slurm,
    env_from_torchrun,
    first_slurm_host,
    free_port,
    launcher_of,
    parse_slurm_tasks_per_node,
)
from swav.syncbn import CPUSyncBatchNorm, convert_sync_batchnorm, sync_bn_groups

# A run small enough for a few seconds per process: 64 images, 2 epochs, float32 for exact comparisons.
TINY = [
    "config=quickstart",
    "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=64",
    "config.OPTIMIZER.num_epochs=2",
    "config.KNN_MONITOR.ENABLED=false",
    "config.MODEL.AMP_PARAMS.USE_AMP=false",
    "config.LOG_FREQUENCY=1",
    "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
    "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[512,64,16],num_clusters:[20]}]]",
]
GLOBAL_SYNC_BN = [
    "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=true",
    "config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE=0",
]


# ----------------------------------------------------------------------------------------------
# Launcher environments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8", [8]),
        ("8(x2)", [8, 8]),
        ("10(x3),4", [10, 10, 10, 4]),  # multi-digit counts: the official code reads only one digit
        ("2,16(x2),1", [2, 16, 16, 1]),
    ],
)
def test_slurm_tasks_per_node(text, expected):
    assert parse_slurm_tasks_per_node(text) == expected


def test_slurm_tasks_per_node_rejects_garbage():
    with pytest.raises(ValueError, match="tasks per node"):
        parse_slurm_tasks_per_node("8(2)")


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu001", "gpu001"),
        ("gpu[010-012,020]", "gpu010"),
        ("a1,b[3-4]", "a1"),
        ("rack[2-3]-node[07-09]", "rack2-node07"),
        ("n[5,7]-ib,other", "n5-ib"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def _slurm(**extra):
    env = {
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "24",
        "SLURM_TASKS_PER_NODE": "12(x2)",
        "SLURM_JOB_NODELIST": "gpu[100-101]",
        "SLURM_PROCID": "17",
        "SLURM_LOCALID": "5",
        "SLURM_NODEID": "1",
    }
    env.update(extra)
    return env


def test_env_from_slurm_with_twelve_tasks_per_node():
    env = env_from_slurm(_slurm())
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (17, 5, 24, 12)
    assert env.num_nodes == 2
    # Every task derives the same rendezvous from the job: rank 0's node and a job-specific port.
    assert env.init_method == f"tcp://gpu100:{20000 + 123456 % 20000}"
    assert env_from_slurm(_slurm(), run_id="head:4321").init_method == "tcp://head:4321"


def test_launcher_detection():
    assert launcher_of({}) == "none"
    torchrun = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert launcher_of(torchrun) == "torchrun"
    env = env_from_torchrun(torchrun)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size, env.num_nodes) == (1, 1, 4, 2, 2)
    assert launcher_of(_slurm()) == "slurm"
    # A batch script (no srun step) or a one-task step is one process.
    batch_script = {k: v for k, v in _slurm().items() if k != "SLURM_STEP_ID"}
    assert launcher_of(batch_script) == "none"
    assert launcher_of(_slurm(SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1")) == "none"


def test_sync_bn_groups():
    assert sync_bn_groups(16, 8, -1) == [list(range(8)), list(range(8, 16))]  # per node
    assert sync_bn_groups(16, 8, 0) == [list(range(16))]  # everyone
    assert sync_bn_groups(16, 8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    with pytest.raises(ConfigError, match="do not divide"):
        sync_bn_groups(16, 8, 3)
    with pytest.raises(ConfigError, match="GROUP_SIZE"):
        sync_bn_groups(16, 8, -2)


def test_sync_bn_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    synced = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), None, "cpu")
    synced.load_state_dict(ref.state_dict())
    assert isinstance(synced[1], CPUSyncBatchNorm)
    x = torch.randn(6, 3, 5, 5)
    torch.testing.assert_close(synced(x), ref(x))


# ----------------------------------------------------------------------------------------------
# Synchronised BatchNorm on two gloo processes against BatchNorm over the whole batch
# ----------------------------------------------------------------------------------------------


def _sync_bn_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 16, 8), torch.nn.BatchNorm1d(8))
        net = convert_sync_batchnorm(net, None, "cpu")
        # Uneven halves (5 and 3 images) with a large mean: the pooled variance must be exact.
        x = torch.randn(8, 3, 6, 6) * 3 + 10
        weights = torch.randn(8, 8)
        part = slice(0, 5) if rank == 0 else slice(5, 8)
        y = net(x[part])
        (y * weights[part]).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        for g in grads:
            dist.all_reduce(g)  # gradient of the sum over both halves
        torch.save({"y": y.detach(), "grads": grads, "buffers": [b.clone() for b in net.buffers()]},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    ctx = mp.start_processes(_sync_bn_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "the two processes did not finish in 120 s"

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 16, 8), torch.nn.BatchNorm1d(8)).double()
    x = (torch.randn(8, 3, 6, 6) * 3 + 10).double()
    weights = torch.randn(8, 8).double()
    y = ref(x)
    (y * weights).sum().backward()
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]).double(), y.detach(), rtol=1e-4, atol=1e-4)
    for got, p in zip(r0["grads"], ref.parameters(), strict=True):
        torch.testing.assert_close(got.double(), p.grad, rtol=1e-4, atol=1e-4)
    for got, other, want in zip(r0["buffers"], r1["buffers"], ref.buffers(), strict=True):
        torch.testing.assert_close(got, other)  # both ranks keep the same running statistics
        torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------


def _swav(args: list[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "swav", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """The same global batch of 16 in one process and in two (8 each, global SyncBN), two iterations."""
    root = tmp_path_factory.mktemp("dist")
    # No warm-up: both updates use a real learning rate. Only two iterations because this tiny
    # model amplifies float32 rounding chaotically: one process in channels-last and in plain
    # layout already differ by 3 % in their third gradient.
    short = ["config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=32", "config.OPTIMIZER.num_epochs=1",
             "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0", "config.OPTIMIZER.param_schedulers.lr.base_value=0.05"]
    one = _swav([*TINY, *short, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16", f"config.CHECKPOINT.DIR={root / 'one'}"])
    two = _swav([*TINY, *short, *GLOBAL_SYNC_BN, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
                 "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", f"config.CHECKPOINT.DIR={root / 'two'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    return root, one, two


def _assert_tensors_close(a: dict, b: dict, rtol: float) -> None:
    """Each tensor within `rtol` of its own largest entry (gradients of biases before BatchNorm are ~0)."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].double(), b[name].double()
        assert (x - y).abs().max() <= rtol * x.abs().max() + 1e-6, name


def test_two_processes_train_like_one(one_and_two_processes):
    root, _, _ = one_and_two_processes
    one_losses, two_losses = _losses(root / "one"), _losses(root / "two")
    assert len(one_losses) == len(two_losses) == 2
    # Same codes (global Sinkhorn), same batch statistics (global SyncBN), same averaged
    # gradients: the runs differ only by float32 summation order.
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-4, atol=1e-4)
    one, two = (torch.load(root / r / "checkpoint.torch", weights_only=False) for r in ("one", "two"))
    # The momentum buffers hold the gradients of both iterations (the second gradient amplifies
    # the first one's rounding). Measured apart: at most 1.2 % on AMD EPYC CPUs, up to 7.6 % on an
    # Intel Xeon with AMX (other kernels, other rounding); with BatchNorm statistics per rank
    # instead of synchronised they are 200 % apart, and a gradient summed over ranks is 100 % off.
    momentum = [{i: s["momentum_buffer"] for i, s in ckpt["optimizer"]["state"].items()} for ckpt in (one, two)]
    _assert_tensors_close(*momentum, rtol=0.15)
    weights = [{k: v for k, v in ckpt["model"].items() if v.is_floating_point()} for ckpt in (one, two)]
    _assert_tensors_close(*weights, rtol=1e-4)


def test_two_process_run_records_its_world(one_and_two_processes):
    root, _, two = one_and_two_processes
    config = (root / "two" / "train_config.yaml").read_text()
    assert "NUM_PROC_PER_NODE: 2" in config
    assert "global batch 16 (8 per process)" in (root / "two" / "log.txt").read_text()
    # One voice: rank 1 does not repeat the progress lines on the console.
    assert two.stdout.count("training: 32 images") == 1
    ckpt = torch.load(root / "two" / "checkpoint.torch", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["loss_per_rank"]) == 2


def test_resume_with_another_world_size_restarts_the_queue(tmp_path):
    run = tmp_path / "run"
    queue = ["config.LOSS.swav_loss.queue.queue_length=32", "config.LOSS.swav_loss.queue.start_iter=0"]
    first = _swav([*TINY, *queue, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.num_epochs=1",
                   "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", f"config.CHECKPOINT.DIR={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = torch.load(run / "checkpoint.torch", weights_only=False)
    assert [int(s["queue_filled"]) for s in ckpt["loss_per_rank"]] == [16, 16]  # 32 // 2 rows per rank, full
    second = _swav([*TINY, *queue, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.num_epochs=2",
                    f"config.CHECKPOINT.DIR={run}"])
    assert second.returncode == 0, second.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert "written by 2 processes and this run has 1" in log and "queue starts empty" in log
    # Iterations are counted in this run's units: epoch 1 starts at 8 with 8 steps of batch 8.
    assert torch.load(run / "checkpoint.torch", weights_only=False)["iteration"] == 8 + 8


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    run = tmp_path / "run"
    # The config says one process; torchrun's two win, and the config records them.
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "swav", "train", *TINY,
         "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8", "config.OPTIMIZER.num_epochs=1",
         "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=32", f"config.CHECKPOINT.DIR={run}"],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(run)) == 2
    assert "NUM_PROC_PER_NODE: 2" in (run / "train_config.yaml").read_text()
    assert "torchrun started 2 processes" in result.stdout + result.stderr


def _two_processes_64_iterations(run: Path) -> list[str]:
    """Long enough to be interrupted: 2 epochs of 32 iterations, a checkpoint every 2. A RegNet
    of two narrow stages: with ResNet-18, writing its 90 MB checkpoints every two iterations took
    most of these tests' time, and stopping and resuming do not depend on the trunk."""
    return [*TINY, "config.MODEL.TRUNK.NAME=regnet",
            'config.MODEL.TRUNK.REGNET={name: "", depth: 4, w_0: 16, w_a: 8, w_m: 2.0, group_width: 8, stem_width: 16}',
            "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[32,64,16],num_clusters:[20]}]]",
            "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=512", "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=2",
            f"config.CHECKPOINT.DIR={run}"]


def _start_until_checkpoint(args: list[str], run: Path, **popen) -> subprocess.Popen:
    """`swav train ARGS` in the background, returned once its first checkpoint exists."""
    proc = subprocess.Popen([sys.executable, "-m", "swav", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.torch").exists():
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1][-3000:])
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint after 120 s")
        time.sleep(0.2)
    return proc


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    workers = []
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "spawn_main" in cmdline:
            workers.append(int(pid))
    return workers


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find the workers")
def test_a_killed_worker_ends_the_run_and_a_rerun_resumes(tmp_path):
    run = tmp_path / "run"
    args = _two_processes_64_iterations(run)
    proc = _start_until_checkpoint(args, run)
    try:
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "killed by signal SIGKILL" in stderr and "Rerun the same command" in stderr
    saved = torch.load(run / "checkpoint.torch", weights_only=False)["iteration"]
    assert 0 < saved < 64

    rerun = _swav([*args, "config.OPTIMIZER.num_epochs=1"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"iteration {saved}" in (run / "log.txt").read_text().split("resumed from")[-1]
    assert torch.load(run / "checkpoint.torch", weights_only=False)["iteration"] == 32


def test_spawn_ranks_and_rendezvous():
    from swav.config import load_config
    from swav.distributed import spawn_env, spawn_run_id

    one_node = load_config(["config=quickstart", "config.DISTRIBUTED.NUM_PROC_PER_NODE=4"])
    assert spawn_run_id(one_node).startswith("127.0.0.1:")
    env = spawn_env(one_node, 3, "127.0.0.1:1234")
    assert (env.rank, env.local_rank, env.world_size, env.init_method) == (3, 3, 4, "tcp://127.0.0.1:1234")

    second_node = load_config(["config=quickstart", "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=4",
                               "config.DISTRIBUTED.INIT_METHOD=tcp", "config.DISTRIBUTED.RUN_ID=head:29500",
                               "config.DISTRIBUTED.NODE_ID=1"])
    assert spawn_run_id(second_node) == "head:29500"
    env = spawn_env(second_node, 2, "head:29500")
    assert (env.rank, env.local_rank, env.world_size, env.num_nodes) == (6, 2, 8, 2)

    with pytest.raises(ConfigError, match="torchrun or SLURM"):
        spawn_run_id(load_config(["config=quickstart", "config.DISTRIBUTED.NUM_NODES=2"]))
    with pytest.raises(ConfigError, match="needs config.DISTRIBUTED.RUN_ID"):
        spawn_run_id(load_config(["config=quickstart", "config.DISTRIBUTED.NUM_NODES=2",
                                  "config.DISTRIBUTED.INIT_METHOD=tcp"]))
    with pytest.raises(ConfigError, match="NODE_ID=2"):
        spawn_run_id(load_config(["config=quickstart", "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.INIT_METHOD=file",
                                  "config.DISTRIBUTED.RUN_ID=/shared/rdzv", "config.DISTRIBUTED.NODE_ID=2"]))


def test_launcher_world_size_wins_over_the_config():
    from swav.distributed import DistEnv
    from swav.launch import config_for_launcher

    cfg = config_for_launcher(["config=quickstart"], DistEnv(rank=1, local_rank=1, world_size=8, local_world_size=4,
                                                             launcher="torchrun"))
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE) == (2, 4)
    # The learning rate follows the launched global batch: 128 x 8 images, base 0.3 per 256.
    assert cfg.OPTIMIZER.param_schedulers.lr.scaled.base_value == pytest.approx(0.3 * 128 * 8 / 256)


def _fake_gpus(monkeypatch, visible: int) -> tuple[list[int], list[dict]]:
    """Pretend this process sees `visible` GPUs and joins a group; returns the devices
    `set_device` was given and the arguments of each `init_process_group`."""
    chosen: list[int] = []
    groups: list[dict] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1])
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: groups.append({"backend": backend, **kwargs}))
    return chosen, groups


@pytest.mark.parametrize(("visible", "expected"), [(4, 3), (8, 3), (1, 0)])
def test_each_process_takes_its_local_gpu_or_the_only_one_it_sees(monkeypatch, visible, expected):
    from swav.config import load_config
    from swav.distributed import DistEnv
    from swav.launch import join

    chosen, _ = _fake_gpus(monkeypatch, visible)
    # The fourth task of a node: under `srun --gpus-per-task=1` it sees one GPU, its own, as cuda:0.
    env = DistEnv(rank=7, local_rank=3, world_size=8, local_world_size=4, launcher="slurm")
    device = join(load_config(["config=quickstart", "config.MACHINE.DEVICE=cuda"]), env)
    assert chosen == [expected]
    assert device == torch.device("cuda", expected)


def test_fewer_gpus_than_processes_but_more_than_one_is_refused(monkeypatch):
    from swav.config import load_config
    from swav.distributed import DistEnv
    from swav.launch import join

    chosen, groups = _fake_gpus(monkeypatch, 2)
    env = DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4, launcher="torchrun")
    with pytest.raises(ConfigError, match="4 processes run on this node.*each sees 2 GPUs.*at most 2 processes"):
        join(load_config(["config=quickstart"]), env)
    assert chosen == [] and groups == []


@pytest.mark.parametrize(("device", "backend", "bound_to"), [("cuda", "nccl", 3), ("cpu", "gloo", None)])
def test_an_nccl_group_is_bound_to_the_process_gpu(monkeypatch, device, backend, bound_to):
    from swav.config import load_config
    from swav.distributed import DistEnv
    from swav.launch import join

    _, groups = _fake_gpus(monkeypatch, 4)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # join splits the cores on a CPU
    env = DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4, launcher="torchrun")
    join(load_config(["config=quickstart", f"config.MACHINE.DEVICE={device}"]), env)
    [group] = groups
    assert (group["backend"], group["rank"], group["world_size"]) == (backend, 3, 4)
    if bound_to is None:
        assert "device_id" not in group
    else:
        assert group["device_id"] == torch.device("cuda", bound_to)


def test_sigterm_to_the_launcher_stops_every_process_with_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = _two_processes_64_iterations(run)
    proc = _start_until_checkpoint(args, run)
    try:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "checkpoint saved, rerun the same command to resume" in stdout + stderr
    ckpt = torch.load(run / "checkpoint.torch", weights_only=False)
    assert 0 < ckpt["iteration"] < 64 and len(ckpt["loss_per_rank"]) == 2


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_sigterm_to_the_whole_process_group_spares_the_loader_workers(tmp_path):
    # What a scheduler's pre-emption, `timeout` or `kill -TERM -PGID` does: every process of the
    # run, data-loader workers included, gets the signal at once.
    run = tmp_path / "run"
    args = [*_two_processes_64_iterations(run), "config.DATA.NUM_DATALOADER_WORKERS=1"]
    proc = _start_until_checkpoint(args, run, start_new_session=True)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        # The whole group, also when the launcher has exited: a loader worker left behind would
        # outlive the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    assert "checkpoint saved, rerun the same command to resume" in stdout + stderr
    assert "DataLoader worker" not in stderr
    assert 0 < torch.load(run / "checkpoint.torch", weights_only=False)["iteration"] < 64


def test_the_knn_monitor_of_two_processes_scores_like_one_process(tmp_path):
    from swav.build import build_knn_data, build_model
    from swav.config import load_config
    from swav.eval.knn import evaluate_knn

    run = tmp_path / "run"
    knn = ["config.KNN_MONITOR.ENABLED=true", "config.KNN_MONITOR.EPOCH_FREQUENCY=1", "config.KNN_MONITOR.K=20",
           "config.DATA.SYNTHETIC.NUM_IMAGES_TEST=33"]
    args = [*TINY, *knn, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=16", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
            f"config.CHECKPOINT.DIR={run}"]
    done = _swav(args)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run / "knn.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    # The final monitor scored the final weights: one process scoring them alone agrees exactly.
    cfg = load_config([*TINY, *knn, f"config.CHECKPOINT.DIR={run}"])
    model = build_model(cfg)
    model.load_state_dict(torch.load(run / "model_final_checkpoint.torch", weights_only=True)["model"])
    train_set, test_set = build_knn_data(cfg)
    alone = evaluate_knn(model.trunk, train_set, test_set, image_size=cfg.KNN_MONITOR.IMAGE_SIZE, k=20, temperature=0.1)
    assert record["trained"] == pytest.approx(alone, abs=1e-9)
