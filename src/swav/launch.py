"""`swav train` in one process, in the processes torchrun or SLURM started, or in workers it starts.

The same `swav train ...` command line works everywhere:
- under torchrun or `srun` it joins the process group their environment describes;
- with `DISTRIBUTED.NUM_PROC_PER_NODE > 1` and no launcher it starts the workers itself, on one
  node, or on each of several nodes with `INIT_METHOD=tcp|file` and `NODE_ID`;
- otherwise it trains in this process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from swav import distributed
from swav.config import load_config, world_size_of
from swav.distributed import DistEnv
from swav.errors import guarded
from swav.supervise import run_spawned

logger = logging.getLogger("swav")


def config_for_launcher(overrides: list[str], env: DistEnv) -> DictConfig:
    """The config, with DISTRIBUTED set to the processes the launcher actually started.

    The launcher is the truth: its world size decides the global batch, the LR scaling and the
    queue split, and train_config.yaml records it.
    """
    cfg = load_config(overrides)
    if world_size_of(cfg) == env.world_size:
        return cfg
    # The launcher's counts are checked too: NUM_NODES x NUM_PROC_PER_NODE describes only equal
    # nodes of at least one process (and a node of 0 would divide by zero here).
    if env.world_size < 1 or env.local_world_size < 1 or env.world_size % env.local_world_size:
        raise distributed.ConfigError(
            f"{env.launcher} started {env.world_size} processes, {env.local_world_size} on this node: "
            "give every node the same number of processes, at least one"
        )
    cfg = load_config(list(overrides) + [
        f"config.DISTRIBUTED.NUM_NODES={env.num_nodes}",
        f"config.DISTRIBUTED.NUM_PROC_PER_NODE={env.local_world_size}",
    ])
    if env.rank == 0:
        logging.getLogger("swav").warning(
            "%s started %d processes (%d nodes x %d): config.DISTRIBUTED set to match; global batch %d",
            env.launcher, env.world_size, env.num_nodes, env.local_world_size,
            env.world_size * cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
        )
    return cfg


def join(cfg: DictConfig, env: DistEnv) -> torch.device:
    """This process's device and CPU threads, then its process group (none for one process)."""
    from swav.build import select_device

    if torch.cuda.is_available() and cfg.MACHINE.DEVICE in ("auto", "cuda", "gpu"):
        visible = torch.cuda.device_count()
        index = distributed.cuda_device_index(env, visible)
        torch.cuda.set_device(index)
        logger.info("process %d (local rank %d of %d) uses cuda:%d of the %d GPUs it sees",
                    env.rank, env.local_rank, env.local_world_size, index, visible)
    device = select_device(cfg)
    if device.type == "cpu" and env.local_world_size > 1:
        torch.set_num_threads(distributed.cpu_threads_per_process(env.local_world_size))
    distributed.init_distributed(env, distributed.backend_for(cfg, device.type), device=device)
    return device


def run_worker(cfg: DictConfig, env: DistEnv, on_summary: Callable[[dict], None] | None = None) -> dict:
    """Join the process group, train, leave. Every process of a run calls this."""
    from swav.train import train

    join(cfg, env)
    try:
        summary = train(cfg)
        if on_summary is not None and env.rank == 0:
            on_summary(summary)
        return summary
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _spawned_worker(local_rank: int, cfg_container: dict, run_id: str, on_summary) -> None:
    # A fresh interpreter: rebuild the read-only config and the console logging.
    from swav.runlog import setup_logging

    cfg = OmegaConf.create(cfg_container)
    OmegaConf.set_readonly(cfg, True)
    env = distributed.spawn_env(cfg, local_rank, run_id)
    setup_logging(console_level=logging.INFO if env.rank == 0 else logging.WARNING)
    def run() -> int:
        run_worker(cfg, env, on_summary)
        return 0

    code = guarded(run)
    if code:
        sys.exit(code)  # the launcher stops the other workers and reports this code


def train_command(overrides: list[str], on_summary: Callable[[dict], None] | None = None) -> int:
    """What `swav train OVERRIDES` does; `on_summary` gets rank 0's result (a picklable function).

    Returns the exit code: 0, or the failing worker's code when this process started workers.
    """
    from swav.runlog import setup_logging

    setup_logging()
    env = distributed.launch_plan(load_config(overrides), os.environ)
    if env is not None:
        cfg = config_for_launcher(overrides, env)
        if env.rank != 0:
            setup_logging(console_level=logging.WARNING)
        run_worker(cfg, env, on_summary)
        return 0
    cfg = load_config(overrides)
    if world_size_of(cfg) == 1:
        run_worker(cfg, DistEnv(), on_summary)
        return 0
    run_id = distributed.spawn_run_id(cfg)
    procs = cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    logger.info("starting %d training processes on this node (rendezvous %s)", procs, run_id)
    # Ctrl-C reaches the workers directly (same process group): they agree to stop, save and
    # exit. The launcher itself ignores it and waits for them; spawned interpreters inherit
    # the ignore until training installs its own handler.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_spawned(_spawned_worker, procs, (OmegaConf.to_container(cfg), run_id, on_summary))
    except mp.ProcessExitedException as e:
        how = f"was killed by signal {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        print(f"swav: training process {e.error_index} {how}; the others were stopped. "
              "Rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(f"{e}\nswav: training process {e.error_index} failed with the error above; the others were stopped. "
              "Rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
