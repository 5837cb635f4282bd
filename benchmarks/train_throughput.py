"""Training throughput of our SwAV step against a plain-PyTorch loop built from lightly's modules.

Images per second of one training iteration (forward of every crop, Sinkhorn and loss, backward,
optimizer step) on in-memory random crops: no data loading. Every setting is built once, warmed
up, then timed in interleaved rounds (A B C D A B C D ...) so that load from other processes hits
all alike; each round times ``--steps`` iterations, and the median and range over ``--rounds``
rounds are reported. Peak memory: the peak resident set size (VmHWM of /proc/self/status; Linux)
of a fresh process that builds the setting and runs 3 iterations, minus its resident size just
before building (after the imports): what the setting adds, activations and optimizer state included.

Settings (same trunk, crops, global batch and number of prototypes on both sides):
- ``ours-default``: ``swav.train.train_step`` with the config exactly as shipped. When the config
  trains with several processes (``DISTRIBUTED.NUM_PROC_PER_NODE``, 2 in the CPU CIFAR recipe),
  they are spawned as training spawns them (gloo, DistributedDataParallel, cores split between
  them) and each timed iteration is one step of every process on its share of the batch.
- ``ours-1proc``: the same in one process with the whole batch and torch's threads.
- ``ours-best``: the same plus the levers that paid on this machine (``--best``).
- ``peer-default``: lightly's SwaVProjectionHead + SwaVPrototypes + SwaVLoss around our trunk, each
  crop forwarded separately and float32, Adam (lr 1e-3), as lightly's examples do.
- ``peer-best``: the same with channels-last, and bfloat16 autocast where the CPU has native
  bfloat16 (the rule ours follows, ``swav.precision``; emulated bfloat16 would cripple the peer).
lightly lives only in the benchmark environment (/work/benchenv), never in the package:

    /work/benchenv/bin/python benchmarks/train_throughput.py                       # shipped CIFAR config
    /work/benchenv/bin/python benchmarks/train_throughput.py --crops 2x32+4x16 --batch 128 \\
        --prototypes 3000 config.MODEL.TRUNK.RESNETS.SMALL_STEM=true               # the peer's published CIFAR setting
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

DEFAULT_CONFIG = "config=pretrain/swav/swav_cifar10_resnet18"
BEST_CHOICES = ("compile", "fused-sgd")


def parse_crops(text: str) -> list[tuple[int, int]]:
    """'2x32+4x16' -> [(2, 32), (4, 16)]."""
    return [tuple(int(v) for v in part.split("x")) for part in text.split("+")]  # type: ignore[misc]


def num_procs(overrides: list[str]) -> int:
    from swav.config import load_config

    return int(load_config(overrides).DISTRIBUTED.NUM_PROC_PER_NODE)


def global_batch(cfg) -> int:
    return int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA) * int(cfg.DISTRIBUTED.NUM_PROC_PER_NODE)


def config_overrides(args) -> list[str]:
    crops = parse_crops(args.crops)
    scales = [[0.14, 1.0]] + [[0.05, 0.14]] * (len(crops) - 1)
    spec = (
        f"{{name: ImgPilToMultiCrop, total_num_crops: {sum(n for n, _ in crops)}, "
        f"num_crops: {[n for n, _ in crops]}, size_crops: {[s for _, s in crops]}, crop_scales: {scales}}}"
    )
    out = [args.config, *args.overrides, f"config.DATA.TRAIN.TRANSFORMS=[{spec}, {{name: ToTensor}}]"]
    if args.batch:  # the global batch, shared by the training processes
        out.append(f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={args.batch // num_procs(out)}")
    if args.prototypes:
        from swav.config import load_config

        name, head = load_config(out).MODEL.HEAD.PARAMS[0]
        dims, use_bn = list(head["dims"]), str(head.get("use_bn", True)).lower()
        out.append(f'config.MODEL.HEAD.PARAMS=[["{name}", {{"dims": {dims}, "use_bn": {use_bn}, '
                   f'"num_clusters": [{args.prototypes}]}}]]')
    return out


def random_crops(cfg, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    return [
        torch.randn(batch, 3, size, size, generator=g)
        for n, size in zip(spec.num_crops, spec.size_crops, strict=True)
        for _ in range(n)
    ]


# ----------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------


def one_process(overrides: list[str]) -> list[str]:
    """The config's global batch in a single process."""
    from swav.config import load_config

    cfg = load_config(overrides)
    return [*overrides, "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={global_batch(cfg)}"]


def build_ours(overrides: list[str], levers: tuple[str, ...] = ()):
    from swav.config import load_config

    cfg = load_config(overrides)
    if cfg.DISTRIBUTED.NUM_PROC_PER_NODE > 1:
        return build_ours_processes(overrides, levers), cfg
    return build_ours_step(cfg, levers), cfg


def build_ours_step(cfg, levers: tuple[str, ...] = (), rank: int = 0):
    """One process's training step on its share of the batch (DDP-wrapped when a group exists)."""
    import torch.distributed as dist

    from swav.build import (
        StepContext,
        autocast_context,
        build_loss,
        build_model,
        build_optimizer,
        frozen_parameters,
        place_model,
        wrap_distributed,
    )
    from swav.train import train_step

    device = torch.device("cpu")
    torch.manual_seed(0)
    model = place_model(cfg, build_model(cfg), device)
    core = model
    if dist.is_initialized():
        model = wrap_distributed(cfg, model, device)
    optimizer = build_optimizer(cfg, core)
    if "fused-sgd" in levers:
        # train.build_optimizer with fused=True (one kernel over all parameters on the CPU too).
        o = cfg.OPTIMIZER
        optimizer = torch.optim.SGD(optimizer.param_groups, lr=0.0, momentum=o.momentum, nesterov=o.nesterov,
                                    weight_decay=o.weight_decay, fused=True)
    if "compile" in levers:
        core.trunk = torch.compile(core.trunk)
    ctx = StepContext(
        model=model, objective=build_loss(cfg), optimizer=optimizer, scaler=None,
        frozen=frozen_parameters(core, cfg.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP),
        autocast=autocast_context(cfg, device), device=device, channels_last=cfg.MODEL.CHANNELS_LAST,
        normalize_prototypes=cfg.LOSS.swav_loss.normalize_last_layer,
    )
    crops = random_crops(cfg, cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA, seed=rank)
    state = {"iteration": 0}

    def step() -> float:
        # Past the prototype-freezing iterations, as most of a run is.
        loss = train_step(ctx, crops, 10_000 + state["iteration"], 0.01)
        state["iteration"] += 1
        return float(loss)  # waits for the step (on a GPU too)

    return step


def _process_worker(rank: int, world: int, port: int, overrides: list[str], levers: tuple[str, ...], conn) -> None:
    """A training process of ``build_ours_processes``: steps on request, answers when done."""
    import torch.distributed as dist

    from swav.config import load_config
    from swav.distributed import cpu_threads_per_process

    torch.set_num_threads(cpu_threads_per_process(world))  # as `swav train` splits the cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    before = _status_kib("VmRSS")
    step = build_ours_step(load_config(overrides), levers, rank)
    conn.send("ready")
    while (n := conn.recv()) is not None:
        for _ in range(n):
            step()
        conn.send((_status_kib("VmHWM") - before) / 1024)
    dist.destroy_process_group()


def build_ours_processes(overrides: list[str], levers: tuple[str, ...]):
    """The config's processes, spawned; ``step()`` runs one iteration in all of them."""
    import atexit
    import multiprocessing
    import socket

    from swav.config import load_config

    world = int(load_config(overrides).DISTRIBUTED.NUM_PROC_PER_NODE)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    conns, procs = [], []
    for rank in range(world):
        parent, child = context.Pipe()
        proc = context.Process(target=_process_worker, args=(rank, world, port, overrides, levers, child), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    for conn in conns:
        conn.recv()

    def stop() -> None:
        for conn in conns:
            conn.send(None)
        for proc in procs:
            proc.join(timeout=30)

    atexit.register(stop)
    state = {"peak_mib": 0.0}

    def step() -> float:
        for conn in conns:
            conn.send(1)
        state["peak_mib"] = sum(conn.recv() for conn in conns)  # every process done
        return state["peak_mib"]

    step.peak_mib = lambda: state["peak_mib"]  # type: ignore[attr-defined]
    return step


# ----------------------------------------------------------------------------------------------
# The peer: a plain PyTorch loop from lightly's modules, as its examples write it
# ----------------------------------------------------------------------------------------------


def build_peer(overrides: list[str], best: bool, device: torch.device | None = None):
    """The peer's step; on `device` (the CPU by default: benchmarks/gpu_step.py passes a GPU, where
    "best" is channels-last and bfloat16 autocast)."""
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

    from swav import precision
    from swav.build import build_model
    from swav.config import load_config

    cfg = load_config(overrides)
    torch.manual_seed(0)
    head = cfg.MODEL.HEAD.PARAMS[0][1]
    in_dim, hidden, out_dim = (int(d) for d in head["dims"])

    class PeerSwaV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = build_model(cfg).trunk  # the same trunk as ours
            self.projection_head = SwaVProjectionHead(in_dim, hidden, out_dim)
            self.prototypes = SwaVPrototypes(out_dim, n_prototypes=int(head["num_clusters"][0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.backbone(x).flatten(start_dim=1)
            x = nn.functional.normalize(self.projection_head(x), dim=1, p=2)
            return self.prototypes(x)

    device = device or torch.device("cpu")
    model = PeerSwaV()
    batch = global_batch(cfg)
    memory_format = torch.channels_last if best else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    criterion = SwaVLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    crops = [c.to(device, memory_format=memory_format) for c in random_crops(cfg, batch)]
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    n_high = int(spec.num_crops[0])
    bf16 = best and (device.type == "cuda" or precision.cpu_has_native_bfloat16())
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> float:
        model.prototypes.normalize()
        with autocast():
            high = [model(c) for c in crops[:n_high]]
            low = [model(c) for c in crops[n_high:]]
        # Scores back to float32: lightly's Sinkhorn would otherwise run on bfloat16 (as ours does not).
        loss = criterion([h.float() for h in high], [lo.float() for lo in low])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    return step, cfg


# ----------------------------------------------------------------------------------------------


def build(setting: str, overrides: list[str], best_levers: tuple[str, ...]):
    if setting == "ours-default":
        return build_ours(overrides)
    if setting == "ours-best":
        return build_ours(overrides, best_levers)
    if setting == "ours-1proc":
        return build_ours(one_process(overrides))
    if setting.startswith("ours+"):  # a single lever, for the lever table
        return build_ours(overrides, tuple(setting.split("+")[1:]))
    if setting in ("peer-default", "peer-best"):
        return build_peer(overrides, best=setting == "peer-best")
    raise ValueError(f"unknown setting {setting}")


def peak_memory_mib(setting: str) -> float:
    """Peak RSS growth of a fresh process (this script, ``--memory-of``) that builds ``setting``
    and runs 3 iterations."""
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--memory-of", setting]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def _status_kib(field: str) -> int:
    # VmHWM, not getrusage's ru_maxrss: the latter survives fork + exec, so a child would report
    # its parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_memory(setting: str, overrides: list[str], best_levers: tuple[str, ...]) -> None:
    before = _status_kib("VmRSS")
    step, _ = build(setting, overrides, best_levers)
    for _ in range(3):
        step()
    if hasattr(step, "peak_mib"):  # spawned training processes: the sum of theirs
        print(json.dumps(step.peak_mib()))
        return
    print(json.dumps((_status_kib("VmHWM") - before) / 1024))  # KiB -> MiB


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (after the config)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--crops", default="2x32", help="crop groups, large first: 2x32 or 2x32+4x16")
    parser.add_argument("--batch", type=int, default=0, help="global batch size (0: the config's)")
    parser.add_argument("--prototypes", type=int, default=0, help="number of prototypes (0: the config's)")
    parser.add_argument("--settings", default="ours-default,ours-best,peer-default,peer-best")
    parser.add_argument("--best", default="fused-sgd", help=f"levers of ours-best, comma-separated: {BEST_CHOICES}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per setting")
    parser.add_argument("--steps", type=int, default=3, help="iterations per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of this process (0: torch's default, one per core); spawned training "
                             "processes split the cores as `swav train` does")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # the peak-memory subprocess
    args = parser.parse_args()
    best = tuple(x for x in args.best.split(",") if x)
    unknown = set(best) - set(BEST_CHOICES)
    if unknown:
        parser.error(f"unknown --best levers {sorted(unknown)}; choose from {BEST_CHOICES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = config_overrides(args)
    if args.memory_of:
        _measure_memory(args.memory_of, overrides, best)
        return
    settings = args.settings.split(",")
    from swav.build import amp_dtype  # imported late, like the other swav imports here

    steps, build_s, warm_s = {}, {}, {}
    cfg = None
    for name in settings:
        t0 = time.perf_counter()
        steps[name], cfg = build(name, overrides, best)
        t1 = time.perf_counter()
        for _ in range(args.warmup):  # includes torch.compile's compilation, if any
            steps[name]()
        build_s[name], warm_s[name] = t1 - t0, time.perf_counter() - t1
    batch = global_batch(cfg)
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    print(f"# {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{' '.join(overrides[:1] + list(args.overrides))}; trunk resnet{cfg.MODEL.TRUNK.RESNETS.DEPTH} "
          f"small_stem={cfg.MODEL.TRUNK.RESNETS.SMALL_STEM}; crops {list(spec.num_crops)} x {list(spec.size_crops)} px; "
          f"batch {batch} ({cfg.DISTRIBUTED.NUM_PROC_PER_NODE} processes for ours); prototypes {cfg.MODEL.HEAD.PARAMS[0][1]['num_clusters']}; ours precision {amp_dtype(cfg, torch.device('cpu')) or torch.float32} "
          f"channels_last={cfg.MODEL.CHANNELS_LAST}; ours-best levers: {','.join(best) or 'none'}")
    print(f"# {args.warmup} warm-up iterations, then {args.rounds} interleaved rounds of {args.steps} iterations; {load()}")

    rates = {name: [] for name in settings}
    cpu_rates = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name in settings:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[name]()
            rates[name].append(args.steps * batch / (time.perf_counter() - t0))
            cpu_rates[name].append(args.steps * batch / (time.process_time() - c0))
    end_load = load()
    memory = {}
    if not args.no_memory:
        for name in settings:
            memory[name] = peak_memory_mib(name)

    # img per CPU-second: what the setting costs, less sensitive to other processes than wall time
    print(f"{'setting':14s} {'median img/s':>12s} {'min':>7s} {'max':>7s} {'img/CPU-s':>10s} {'peak MiB':>9s} {'warm-up s':>10s}")
    for name in settings:
        r = rates[name]
        mem = f"{memory[name]:9.0f}" if name in memory else f"{'-':>9s}"
        # spawned processes: this process only waits, its CPU time says nothing
        cpu_rate = "-" if hasattr(steps[name], "peak_mib") else f"{statistics.median(cpu_rates[name]):.1f}"
        print(f"{name:14s} {statistics.median(r):12.1f} {min(r):7.1f} {max(r):7.1f} "
              f"{cpu_rate:>10s} {mem} {warm_s[name]:10.1f}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}
    for ours, peer, target in (("ours-default", "peer-default", 3.0), ("ours-best", "peer-best", 1.25)):
        if ours in med and peer in med:
            cpu_ratio = "" if hasattr(steps[ours], "peak_mib") else f", {cpu[ours] / cpu[peer]:.2f}x img/CPU-s"
            print(f"{ours} / {peer}: {med[ours] / med[peer]:.2f}x img/s{cpu_ratio} (target >= {target}x)")
    print(f"# {end_load}")


if __name__ == "__main__":
    main()
