"""Training throughput beside a CPU-bound neighbour, against the same run on an idle machine.

A laptop always has a browser and a shared server always has neighbours: this benchmark starts
one itself, a bounded busy loop at normal priority (a Python process that spins and stops by
itself after ``--neighbour-seconds``), and runs `swav train` beside it, as a user would. Each
measurement is a real `swav train` subprocess (data loading, every process of the recipe) that
trains ``--iters`` iterations; its throughput is the median of the `images_per_sec` entries of
its metrics.jsonl after the first logging window (start-up and the first, slower steps).

Variants set the environment of the `swav train` process, so that what the command line does
by default can be compared with what it did before (for instance ``GOMP_SPINCOUNT=300000`` is
GNU OpenMP's own default spin before a waiting thread sleeps, which the command line replaces by
a passive wait unless the user set one of the two variables). Rounds interleave idle and busy
runs of every variant, so that a slow phase of the machine hits all alike:

    python benchmarks/busy_neighbour.py --recipe quickstart
    python benchmarks/busy_neighbour.py --recipe cifar --data /work/data/cifar10 \\
        --variant default: --variant spin:GOMP_SPINCOUNT=300000

The report gives each variant's idle and busy medians and their ratio; the target is a busy
throughput of at least 45 % of the idle one with one neighbour on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    # The quickstart as `make demo` runs it, cut to a few iterations.
    "quickstart": ["config=quickstart", "config.KNN_MONITOR.ENABLED=false"],
    # The CPU CIFAR recipe (2 processes, 1 loader worker each, JPEG decoding), cut likewise.
    "cifar": ["config=pretrain/swav/swav_cifar10_resnet18", "config.KNN_MONITOR.ENABLED=false"],
    # The CPU budget recipe (SimCLR, quarter-width ResNet-18 with the CIFAR stem, 2 processes).
    "cifar-simclr-15min": ["config=pretrain/simclr/simclr_cifar10_15min", "config.KNN_MONITOR.ENABLED=false"],
}


def busy_loop(seconds: float) -> subprocess.Popen:
    """A CPU-bound process at normal priority that ends by itself."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def train_speed(recipe: list[str], iters: int, env_changes: dict[str, str], data: str | None) -> float:
    """Median images/s of one `swav train` run of `iters` iterations, after its first log window."""
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            *recipe,
            f"config.CHECKPOINT.DIR={run_dir}",
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=-1",
            "config.CHECKPOINT.CHECKPOINT_FREQUENCY=1000",
            "config.LOG_FREQUENCY=5",
            "config.OPTIMIZER.num_epochs=1",
        ]
        if data is not None:
            overrides.append(f"config.DATA.TRAIN.DATA_PATHS=[{data}/train]")
        # One epoch of exactly `iters` iterations: the dataset cut to iters x global batch images.
        from swav.config import load_config

        cfg = load_config(overrides)
        batch = int(cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA) * int(cfg.DISTRIBUTED.NUM_PROC_PER_NODE)
        if "synthetic" in list(cfg.DATA.TRAIN.DATA_SOURCES):
            overrides.append(f"config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN={iters * batch}")
        else:
            overrides.append(f"config.DATA.TRAIN.DATA_LIMIT={iters * batch}")
        env = {**os.environ, **env_changes}
        for key, value in env_changes.items():
            if value == "":
                env.pop(key, None)
        done = subprocess.run([sys.executable, "-m", "swav", "train", *overrides], env=env,
                              capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"swav train failed:\n{done.stderr[-3000:]}")
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        speeds = [row["images_per_sec"] for row in rows if "images_per_sec" in row][1:]
        if not speeds:
            raise SystemExit("too few logging windows: raise --iters")
        return statistics.median(speeds)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """'name:KEY=VALUE,KEY2=VALUE2' -> (name, {KEY: VALUE, ...}); an empty VALUE unsets KEY."""
    name, _, assignments = text.partition(":")
    changes = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="quickstart")
    parser.add_argument("--data", help="CIFAR-10 folder with train/ (for --recipe cifar)")
    parser.add_argument("--iters", type=int, default=30, help="iterations per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", action="append", default=None,
                        help="name:ENV=VALUE,... (repeatable); default: the command line's default and "
                             "GNU OpenMP's own spin (GOMP_SPINCOUNT=300000)")
    parser.add_argument("--neighbour-seconds", type=float, default=600.0)
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()
    if args.recipe.startswith("cifar") and not args.data:
        parser.error("--recipe cifar needs --data (a folder with train/)")

    variants = [parse_variant(v) for v in (args.variant or ["default:", "gomp-spin:GOMP_SPINCOUNT=300000"])]
    recipe = [*RECIPES[args.recipe], *args.overrides]
    results: dict[str, dict[str, list[float]]] = {name: {"idle": [], "busy": []} for name, _ in variants}
    for round_index in range(args.rounds):
        for name, changes in variants:
            results[name]["idle"].append(train_speed(recipe, args.iters, changes, args.data))
            neighbour = busy_loop(args.neighbour_seconds)
            try:
                time.sleep(1.0)  # let the scheduler see it as a running task
                results[name]["busy"].append(train_speed(recipe, args.iters, changes, args.data))
            finally:
                neighbour.kill()
                neighbour.wait()
            print(f"round {round_index + 1}: {name}: idle {results[name]['idle'][-1]:.1f} img/s, "
                  f"busy {results[name]['busy'][-1]:.1f} img/s", flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, recipe {args.recipe}, "
          f"{args.iters} iterations per run, {args.rounds} rounds")
    print("| variant | idle img/s (median, min-max) | with one busy neighbour | busy / idle |")
    print("|---|---|---|---|")
    for name, changes in variants:
        idle, busy = results[name]["idle"], results[name]["busy"]
        ratio = statistics.median(busy) / statistics.median(idle)
        env_text = ",".join(f"{k}={v}" for k, v in changes.items()) or "as shipped"
        print(f"| {name} ({env_text}) | {statistics.median(idle):.1f} ({min(idle):.1f}-{max(idle):.1f}) | "
              f"{statistics.median(busy):.1f} ({min(busy):.1f}-{max(busy):.1f}) | {100 * ratio:.0f} % |")


if __name__ == "__main__":
    main()
