"""Processes and process groups: one process, torchrun, SLURM, a local spawn or a tcp/file rendezvous.

Everything that asks "which process am I and who are the others" lives here: reading the
launcher's environment, starting local workers, `init_process_group`, the SyncBatchNorm groups,
and the few collectives the training loop needs. Without a process group every helper is a
no-op, so one-process training runs the same code.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from swav.config import ConfigError

logger = logging.getLogger("swav")

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits. `init_method` is what `init_process_group` gets."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    init_method: str = "env://"
    launcher: str = "none"  # none | torchrun | slurm | spawn

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


# ----------------------------------------------------------------------------------------------
# Reading the launcher's environment (pure functions of a mapping, so tests need no cluster)
# ----------------------------------------------------------------------------------------------


def parse_slurm_tasks_per_node(text: str) -> list[int]:
    """SLURM's compressed task counts, one per node: ``"8(x2),10"`` -> ``[8, 8, 10]``."""
    counts: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot read SLURM tasks per node {text!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[010-012,020],cpu1"`` -> ``"gpu010"``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    # Each bracket holds ranges; the first host takes the start of the first range in each.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m[1])[0], nodelist[:end].strip())


def launcher_of(environ: Mapping[str, str]) -> str:
    """"torchrun" when its variables are set, "slurm" inside a multi-task `srun` step, else "none"."""
    if all(name in environ for name in TORCHRUN_VARIABLES):
        return "torchrun"
    # SLURM_STEP_ID marks a task started by srun; a batch script alone is one process.
    tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1"))
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and int(tasks) > 1:
        return "slurm"
    return "none"


def env_from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    world = int(environ["WORLD_SIZE"])
    return DistEnv(
        rank=int(environ["RANK"]),
        local_rank=int(environ["LOCAL_RANK"]),
        world_size=world,
        local_world_size=int(environ.get("LOCAL_WORLD_SIZE", world)),
        init_method="env://",
        launcher="torchrun",
    )


def env_from_slurm(environ: Mapping[str, str], run_id: str = "auto") -> DistEnv:
    """Rank, local rank and world size of an `srun` task; rank 0's host and a port for the rendezvous.

    The port is ``RUN_ID``'s when it is ``host:port``, else derived from the job id so that every
    task of the job computes the same one.
    """
    get = environ.get
    world = int(get("SLURM_STEP_NUM_TASKS") or get("SLURM_NTASKS"))
    per_node = parse_slurm_tasks_per_node(get("SLURM_STEP_TASKS_PER_NODE") or get("SLURM_TASKS_PER_NODE") or str(world))
    node = int(get("SLURM_NODEID", "0"))
    if run_id not in ("", "auto") and ":" in run_id:
        host, port = run_id.rsplit(":", 1)
    else:
        host = first_slurm_host(get("SLURM_STEP_NODELIST") or get("SLURM_JOB_NODELIST") or get("SLURM_NODELIST") or "127.0.0.1")
        port = str(20000 + int(get("SLURM_JOB_ID", "0")) % 20000)
    return DistEnv(
        rank=int(get("SLURM_PROCID")),
        local_rank=int(get("SLURM_LOCALID", "0")),
        world_size=world,
        local_world_size=per_node[node] if node < len(per_node) else per_node[-1],
        init_method=f"tcp://{host}:{port}",
        launcher="slurm",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_plan(cfg: Any, environ: Mapping[str, str]) -> DistEnv | None:
    """The environment of a process an outside launcher started, or None when we start the workers.

    Returns None for one process too (then `world_size_of(cfg) == 1`).
    """
    launcher = launcher_of(environ)
    if launcher == "torchrun":
        return env_from_torchrun(environ)
    if launcher == "slurm":
        return env_from_slurm(environ, cfg.DISTRIBUTED.RUN_ID)
    return None


def spawn_env(cfg: Any, local_rank: int, run_id: str) -> DistEnv:
    """The environment of local worker `local_rank` that `swav train` starts itself."""
    d = cfg.DISTRIBUTED
    procs = d.NUM_PROC_PER_NODE
    method = d.INIT_METHOD
    if method == "env":
        method, run_id = "tcp", run_id  # one node: rank 0 is on this machine
    if method == "tcp":
        init = f"tcp://{run_id}"
    elif method == "file":
        init = f"file://{os.path.abspath(run_id)}"
    else:
        raise ConfigError(f"config.DISTRIBUTED.INIT_METHOD={method!r}: use env, tcp or file")
    return DistEnv(
        rank=d.NODE_ID * procs + local_rank,
        local_rank=local_rank,
        world_size=d.NUM_NODES * procs,
        local_world_size=procs,
        init_method=init,
        launcher="spawn",
    )


def spawn_run_id(cfg: Any) -> str:
    """RUN_ID for the workers `swav train` starts: a free loopback port on one node."""
    d = cfg.DISTRIBUTED
    if d.INIT_METHOD == "env":
        if d.NUM_NODES > 1:
            raise ConfigError(
                f"config.DISTRIBUTED.NUM_NODES={d.NUM_NODES}: start multi-node runs with torchrun or SLURM's srun, "
                "or set config.DISTRIBUTED.INIT_METHOD=tcp config.DISTRIBUTED.RUN_ID=HOST:PORT and "
                "config.DISTRIBUTED.NODE_ID on each machine"
            )
        return d.RUN_ID if d.RUN_ID not in ("", "auto") else f"127.0.0.1:{free_port()}"
    if d.RUN_ID in ("", "auto"):
        what = "HOST:PORT of node 0" if d.INIT_METHOD == "tcp" else "a file path every node can see"
        raise ConfigError(f"config.DISTRIBUTED.INIT_METHOD={d.INIT_METHOD} needs config.DISTRIBUTED.RUN_ID={what}")
    if not 0 <= d.NODE_ID < d.NUM_NODES:
        raise ConfigError(f"config.DISTRIBUTED.NODE_ID={d.NODE_ID} must be in [0, NUM_NODES={d.NUM_NODES})")
    return d.RUN_ID


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------


def backend_for(cfg: Any, device_type: str) -> str:
    wanted = cfg.DISTRIBUTED.BACKEND
    if wanted == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if wanted == "nccl" and device_type != "cuda":
        raise ConfigError("config.DISTRIBUTED.BACKEND=nccl needs CUDA devices; use gloo (or auto) on CPU")
    return wanted


def init_distributed(env: DistEnv, backend: str, timeout_minutes: float = 30) -> None:
    """Join the process group `env` describes (one call for every launcher)."""
    if env.world_size == 1 or dist.is_initialized():
        return
    dist.init_process_group(
        backend,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mean_over_ranks(x: Tensor) -> Tensor:
    """The mean of a tensor over processes (a copy; the input is left alone)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every process when it is True on at least one (e.g. a stop request)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cpu_threads_per_process(local_world_size: int) -> int:
    """Split the cores between the processes of a node: more threads than cores makes every
    OpenMP barrier wait for a descheduled thread (a 2-thread BatchNorm went from 0.2 to 40 ms)."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


# ----------------------------------------------------------------------------------------------
# Synchronised BatchNorm
# ----------------------------------------------------------------------------------------------


def sync_bn_groups(world: int, local_world: int, group_size: int) -> list[list[int]]:
    """Ranks whose BatchNorm statistics are shared: -1 = each node, 0 = all, N = consecutive groups of N."""
    if group_size == 0:
        size = world
    elif group_size == -1:
        size = local_world
    elif group_size > 0:
        size = group_size
    else:
        raise ConfigError(f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE={group_size}: use -1 (per node), 0 (all) or N > 0")
    if world % size:
        raise ConfigError(
            f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE: groups of {size} do not divide {world} processes"
        )
    return [list(range(start, start + size)) for start in range(0, world, size)]


def sync_bn_process_group(group_size: int, local_world: int):
    """This rank's SyncBatchNorm group (every rank creates every group, in the same order)."""
    world, me = dist.get_world_size(), dist.get_rank()
    groups = sync_bn_groups(world, local_world, group_size)
    if len(groups) == 1:
        return None  # the default group: all processes
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: every process's output depends on every input, so the
    gradient of an input is the sum of the output gradients of all processes."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the batches of all processes in `process_group`, for CPU.

    `torch.nn.SyncBatchNorm` refuses CPU tensors. Each process sends its count, mean times count
    and centred sum of squares plus count times mean squared in one all-reduce; the all-reduce
    is differentiable, so autograd gives the exact gradient of BatchNorm over the union of the batches.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32)
        mean = xf.mean(dims)
        m2 = ((xf - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
        # Parallel variance: sum_r [M2_r + n_r m_r^2] - N m^2, cancellation only among rank means.
        stats = _AllReduceSum.apply(torch.cat([count * mean, m2 + count * mean * mean, count]), self.process_group)
        c = self.num_features
        total = stats[-1]
        g_mean = stats[:c] / total
        g_var = (stats[c : 2 * c] / total - g_mean * g_mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = g_var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(g_mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, -1, *[1] * (x.dim() - 2))
        y = (xf - g_mean.view(shape)) * torch.rsqrt(g_var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group, device_type: str) -> nn.Module:
    """Every BatchNorm in `module` synchronised over `process_group` (torch's on CUDA, ours on CPU)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group, device_type))
    return module


def run_spawned(worker: Callable[..., None], nprocs: int, args: tuple) -> None:
    """Start `nprocs` local workers and wait; the first one to fail takes the others down.

    A SIGTERM to this launcher (`kill`, a job scheduler) is passed on to the workers, which then
    save a checkpoint and exit, instead of leaving them orphaned.
    """
    import signal

    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")

    def forward(signum, frame) -> None:
        for pid in context.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while not context.join():
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
