"""Screen CPU recipes on CIFAR-10: kNN top-1 against training minutes, one candidate after another.

Each candidate is a name and `swav train` arguments (a config and overrides). Every candidate runs
as the user would run it (`python -m swav train ...`, in a subprocess, never two at once: they
would share the cores), with the kNN monitor after every `--knn-every` epochs on the full train /
test folders of `--data`. Its run folder's knn.json gives, per evaluation, the training seconds so
far (evaluations excluded) and the accuracy; the script prints one table of all candidates and
writes it to OUT/results.json, so runs can be compared at equal training time.

    python benchmarks/recipe_screen.py --data /work/data/cifar10 --out /work/runs/screen \\
        --candidate 'simclr-w0.5=config=pretrain/simclr/simclr_cifar10_resnet18 \\
                     config.MODEL.TRUNK.RESNETS.WIDTH_MULTIPLIER=0.5 config.OPTIMIZER.num_epochs=3'
    python benchmarks/recipe_screen.py --out /work/runs/screen --report-only

A candidate whose run folder exists is not run again (its knn.json is read), so a screen can be
extended one candidate at a time; `--rerun NAME` deletes that candidate's folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def knn_overrides(data: Path, every: int) -> list[str]:
    return [
        "config.KNN_MONITOR.ENABLED=true",
        f"config.KNN_MONITOR.EPOCH_FREQUENCY={every}",
        f"config.KNN_MONITOR.TRAIN.DATA_PATHS=[{data / 'train'}]",
        f"config.KNN_MONITOR.TEST.DATA_PATHS=[{data / 'test'}]",
    ]


def run_candidate(name: str, args: list[str], data: Path, out: Path, every: int) -> None:
    folder = out / name
    argv = [sys.executable, "-m", "swav", "train", *args,
            f"config.DATA.TRAIN.DATA_PATHS=[{data / 'train'}]", *knn_overrides(data, every),
            f"config.CHECKPOINT.DIR={folder}"]
    out.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {shlex.join(argv[2:])}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
    print(f"   exit {code} after {time.perf_counter() - start:.0f} s (log: {out / f'{name}.log'})", flush=True)


def history(folder: Path) -> list[dict]:
    path = folder / "knn.json"
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    return record.get("history", [record])


def report(out: Path, names: list[str]) -> dict:
    results = {}
    for name in names:
        rows = history(out / name)
        results[name] = [{"epoch": r["epoch"], "train_minutes": round(r["train_seconds"] / 60, 2),
                          "top1": r["trained"]["top1"]} for r in rows if "trained" in r]
        curve = ", ".join(f"{r['train_minutes']:.1f} min {r['top1']:.2f} %" for r in results[name])
        print(f"{name:28s} {curve or '(no kNN result)'}")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/data/cifar10"), help="folder with train/ and test/")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--candidate", action="append", default=[], metavar="NAME=ARGS",
                        help="a name and the `swav train` arguments, shell-quoted; repeat for more")
    parser.add_argument("--knn-every", type=int, default=1, help="epochs between kNN evaluations")
    parser.add_argument("--rerun", action="append", default=[], help="delete this candidate's run first")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()

    candidates = {}
    for item in args.candidate:
        name, _, rest = item.partition("=")
        candidates[name.strip()] = shlex.split(rest)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    if not args.report_only:
        for name, argv in candidates.items():
            if name in args.rerun:
                shutil.rmtree(args.out / name, ignore_errors=True)
            if (args.out / name).exists():
                print(f"== {name}: run folder exists, reading it", flush=True)
                continue
            run_candidate(name, argv, args.data, args.out, args.knn_every)
    names = list(candidates) or sorted(p.name for p in args.out.iterdir() if (p / "knn.json").is_file())
    report(args.out, names)


if __name__ == "__main__":
    main()
