"""The table of shipped model configs: size, feature width, compute, and CPU training memory.

For the base recipe (`pretrain/swav/swav_8node_resnet`, ResNet-50) and every option of the
`models/` config group it prints one Markdown row:

- parameters of trunk and head, built on the `meta` device (no memory is allocated);
- the trunk's feature dimension (= the head's first dimension);
- GFLOPs of one forward pass of trunk + head on one 224-px image, counted by
  `torch.utils.flop_counter.FlopCounterMode` on the meta device (it counts a multiply-add as 2
  FLOPs; the "400MF" / "4.1 GFLOPs" of model names count multiply-adds: half of it, also shown);
- for the small trunks (`--memory`), peak training memory on this CPU: each measurement runs in a
  fresh subprocess that builds the model, the loss and the optimizer of the config, makes random
  crops of the config's sizes (2x224 + 6x96 for these), then runs two training steps
  (`swav.train.train_step`, with the config's precision: bfloat16 autocast and channels-last
  on CPU). Memory = the process's peak RSS (VmHWM) minus its RSS just before the first step.
  Measured at batch 4 and 8: "per image" is (peak_8 - peak_4) / 4, the memory each extra
  image costs; "at batch 8" is the whole step's peak above the built model.

`--prototypes` adds a table for the number of prototypes (paper table 8): head 2048-2048-128 and
the SwAV loss on 512 rows (64 images x 8 crops), one forward + backward + SGD step on random
features; time is the median of 5 steps after 1 warm-up, memory as above (subprocess, VmHWM).

    python benchmarks/model_table.py --memory --prototypes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from swav.build import build_model
from swav.config import load_config

BASE = "config=pretrain/swav/swav_8node_resnet"
GROUP = "+config/pretrain/swav/models"
MODELS = [
    "resnet18", "resnet34", "(base) resnet50", "resnet101", "resnext50", "resnext101", "resnet50_w2",
    "resnet50_w4", "resnet50_w5", "regnet400mf", "regnet16Gf", "regnet128Gf", "regnet256Gf",
]
SMALL = ["resnet18", "resnet34", "(base) resnet50", "regnet400mf"]


def overrides_for(option: str) -> list[str]:
    return [BASE] if option.startswith("(base)") else [BASE, f"{GROUP}={option}"]


def describe(option: str) -> dict:
    cfg = load_config(overrides_for(option))
    with torch.device("meta"):
        model = build_model(cfg).eval()
        with FlopCounterMode(display=False) as counter:
            model([torch.empty(1, 3, 224, 224)])
    trunk = sum(p.numel() for p in model.trunk.parameters())
    head = sum(p.numel() for p in model.heads.parameters())
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    crops = " + ".join(f"{n}x{s}" for n, s in zip(spec.num_crops, spec.size_crops, strict=True))
    world = cfg.DISTRIBUTED.NUM_NODES * cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    return {
        "option": option,
        "trunk_m": trunk / 1e6,
        "head_m": head / 1e6,
        "features": model.trunk.num_features,
        "head": list(cfg.MODEL.HEAD.PARAMS[0][1].dims),
        "gflops": counter.get_total_flops() / 1e9,
        "batch": f"{cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA} x {world}",
        "crops": crops,
        "queue": cfg.LOSS.swav_loss.queue.queue_length,
    }


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_step_memory(option: str, batch: int) -> dict:
    """Run in a fresh process: peak RSS of two training steps above the built model, in MB."""
    from swav.build import build_step_context, place_model
    from swav.train import train_step

    cfg = load_config(overrides_for(option))
    device = torch.device("cpu")
    torch.manual_seed(0)
    ctx = build_step_context(cfg, place_model(cfg, build_model(cfg), device), device)
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    crops = [torch.randn(batch, 3, s, s) for n, s in zip(spec.num_crops, spec.size_crops, strict=True) for _ in range(n)]
    before = _rss_kb()
    times = []
    for i in range(2):
        start = time.perf_counter()
        train_step(ctx, crops, i, 0.01).item()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    return {"option": option, "batch": batch, "model_mb": before / 1024, "step_peak_mb": (peak - before) / 1024,
            "step_seconds": times[-1], "amp": bool(cfg.MODEL.AMP_PARAMS.USE_AMP)}


def measure_prototypes(k: int, rows: int = 512) -> dict:
    """Run in a fresh process: head 2048-2048-128 with k prototypes + SwAV loss, fwd + bwd + step."""
    from swav.losses import SwAVLoss
    from swav.models import SwAVHead

    torch.manual_seed(0)
    head = SwAVHead(dims=[2048, 2048, 128], num_clusters=[k])
    loss_fn = SwAVLoss(num_crops=8)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    feats = torch.randn(rows, 2048)
    before = _rss_kb()
    times = []
    for _ in range(6):
        start = time.perf_counter()
        head.normalize_prototypes()
        _, scores = head(feats)
        loss = loss_fn(scores)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"k": k, "rows": rows, "step_ms": 1000 * statistics.median(times[1:]),
            "step_ms_min": 1000 * min(times[1:]), "step_ms_max": 1000 * max(times[1:]),
            "peak_mb": (peak - before) / 1024, "loss": loss.item()}


def _subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="measure CPU training memory of the small trunks")
    parser.add_argument("--prototypes", action="store_true", help="add the number-of-prototypes table")
    parser.add_argument("--_step", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_proto", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._step:
        print(json.dumps(measure_step_memory(args._step[0], int(args._step[1]))))
        return
    if args._proto:
        print(json.dumps(measure_prototypes(args._proto)))
        return

    load = os.getloadavg()
    print(f"<!-- {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.1f} at start -->")
    memory = {}
    if args.memory:
        for option in SMALL:
            m4, m8 = _subprocess("--_step", option, "4"), _subprocess("--_step", option, "8")
            memory[option] = (m4, m8)
    print("| config | trunk params | head params | features | head | GFLOPs @224 (GMACs) | batch (per process x processes) "
          "| crops | queue | train memory per image | step peak at batch 8 |")
    print("|---|---:|---:|---:|---|---:|---|---|---:|---:|---:|")
    for option in MODELS:
        d = describe(option)
        per_image = at_8 = "-"
        if option in memory:
            m4, m8 = memory[option]
            per_image = f"{(m8['step_peak_mb'] - m4['step_peak_mb']) / 4:.0f} MB"
            at_8 = f"{m8['step_peak_mb']:.0f} MB"
        print(f"| {d['option']} | {d['trunk_m']:.1f} M | {d['head_m']:.1f} M | {d['features']} | "
              f"{'-'.join(map(str, d['head']))} | {d['gflops']:.1f} ({d['gflops'] / 2:.1f}) | {d['batch']} | "
              f"{d['crops']} | {d['queue']} | {per_image} | {at_8} |")
    if memory:
        amp = next(iter(memory.values()))[1]["amp"]
        print(f"\nMemory measured with {'bfloat16 autocast' if amp else 'float32'} and channels-last, "
              "as the configs run on CPU; step seconds at batch 8: "
              + ", ".join(f"{k} {v[1]['step_seconds']:.1f} s" for k, v in memory.items()))
    if args.prototypes:
        print("\n| prototypes | step time (median, min-max of 5) | peak memory above the built head |")
        print("|---:|---|---:|")
        for k in (300, 3000, 30_000, 100_000):
            r = _subprocess("--_proto", str(k))
            print(f"| {k} | {r['step_ms']:.0f} ms ({r['step_ms_min']:.0f}-{r['step_ms_max']:.0f}) | {r['peak_mb']:.0f} MB |")
    print(f"<!-- load average {os.getloadavg()[0]:.1f} at end -->")


if __name__ == "__main__":
    main()
