"""Processes and process groups: one process, torchrun, SLURM, a local spawn or a tcp/file rendezvous.

Everything that asks "which process am I and who are the others" lives here: reading the
launcher's environment, starting local workers, `init_process_group`, the SyncBatchNorm groups,
and the few collectives the training loop needs. Without a process group every helper is a
no-op, so one-process training runs the same code.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

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
        method = "tcp"  # one node: rank 0 is on this machine, at run_id
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


def init_distributed(env: DistEnv, backend: str, timeout_minutes: float = 30,
                     device: torch.device | None = None) -> None:
    """Join the process group `env` describes (one call for every launcher).

    With nccl the group is bound to this process's GPU, `device` (else the current one): nccl
    then sets up its communicator on that GPU at once, instead of guessing the device at the
    first collective (a barrier before any tensor reached the GPU guesses it from the rank).
    """
    if env.world_size == 1 or dist.is_initialized():
        return
    options = {}
    if backend == "nccl":
        index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
        options["device_id"] = torch.device("cuda", index)
    dist.init_process_group(
        backend,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        **options,
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


def min_over_ranks(x: Tensor) -> Tensor:
    """The smallest value of a tensor over processes, elementwise (a copy)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


def mean_over_ranks(x: Tensor) -> Tensor:
    """The mean of a tensor over processes (a copy; the input is left alone)."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def any_rank(flag: bool | Tensor, device: torch.device) -> bool:
    """True on every process when it is True on at least one (e.g. a stop request). A tensor flag
    goes into the all-reduce as it is: one host sync, at the end."""
    if not is_distributed():
        return bool(flag)
    t = torch.as_tensor(flag, device=device).to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def copy_buffers_from_rank0(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running averages) in every process's `model`, in place."""
    if not is_distributed():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def all_gather_rows(x: Tensor, device: torch.device) -> Tensor:
    """Every rank's rows of `x` (any number of rows per rank, the same trailing shape), in rank
    order, on every rank, on `device` (where the process group's backend works: a GPU for nccl).
    Tensors, not pickled objects: a pickled gather stages world x size bytes in one process."""
    if not is_distributed():
        return x.to(device)
    rows = torch.tensor([x.shape[0]], device=device)
    counts = [torch.zeros_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, rows)
    counts = [int(c.item()) for c in counts]
    padded = x.new_zeros((max(counts), *x.shape[1:]), device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of `num_items`: the first `num_items % world_size` ranks get
    one more; together they cover every item once, in order."""
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cuda_device_index(env: DistEnv, visible_gpus: int) -> int:
    """The GPU of this process among the `visible_gpus` it sees.

    Processes that all see every GPU of the node take the one of their local rank. Under SLURM's
    GPU binding (`srun --gpus-per-task=1`) each task sees only its own GPU, as device 0, and the
    local rank would name a device that does not exist there. Any other split (2 GPUs visible to
    4 processes, say) would put several processes on one GPU without anyone asking for it.
    """
    if visible_gpus >= env.local_world_size:
        return env.local_rank
    if visible_gpus == 1:
        return 0
    raise ConfigError(
        f"{env.local_world_size} processes run on this node (config.DISTRIBUTED.NUM_PROC_PER_NODE, or "
        f"the {env.launcher} launcher's count) but each sees {visible_gpus} GPUs: start at most "
        f"{visible_gpus} processes per node, let every process see all of the node's GPUs "
        "(CUDA_VISIBLE_DEVICES), or give each process its own GPU (srun --gpus-per-task=1)"
    )


def cpu_threads_per_process(local_world_size: int) -> int:
    """Split the cores between the processes of a node: more threads than cores makes every
    OpenMP barrier wait for a descheduled thread (a 2-thread BatchNorm went from 0.2 to 40 ms)."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


# ----------------------------------------------------------------------------------------------
# Synchronised BatchNorm
# ----------------------------------------------------------------------------------------------
