"""The training step of the paper's recipe on one GPU: images/s, peak memory, share of the bf16 peak.

`pretrain/swav/swav_8node_resnet` (ResNet-50, 2 x 224 + 6 x 96 crops, 3000 prototypes) in one
process on random crops already on the GPU (no data loading), for each precision and batch size
asked for. Each setting is warmed up, then `--steps` steps are timed with CUDA events, `--rounds`
times; the median is reported. The share of the peak divides the step's floating-point operations
(counted once by torch's FlopCounterMode, forward and backward) by the time, against a bf16 matrix
product of 8192^3 timed the same way. A batch that does not fit is reported as such.

    python benchmarks/gpu_step.py --batches 64,128,256 --precisions bfloat16,float16,float32 --out results.json

`--peer` adds the peer loop of benchmarks/train_throughput.py (lightly's SwaV head, prototypes and
loss around the same trunk, each crop forwarded on its own, Adam) on the same GPU at its best
settings (channels-last, bfloat16 autocast), at the same batch sizes; it needs lightly importable
(its wheel installed with --no-deps: lightly 1.6 imports with torch, torchvision, numpy and tqdm).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from swav.build import build_model, build_step_context, place_model
from swav.config import load_config
from swav.train import train_step

PRECISIONS = {
    "bfloat16": ["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.AMP_TYPE=bfloat16"],
    "float16": ["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.AMP_TYPE=float16"],
    "float32": ["config.MODEL.AMP_PARAMS.USE_AMP=false"],
}


def timed_ms(fn, steps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def matmul_peak_tflops(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ms = statistics.median(timed_ms(lambda: a @ b, 10) for _ in range(3))
    return 2 * size**3 / (ms / 1000) / 1e12


def crops_for(cfg, batch: int, device: torch.device) -> list[torch.Tensor]:
    multicrop = cfg.DATA.TRAIN.TRANSFORMS[0]
    sizes = [s for s, n in zip(multicrop.size_crops, multicrop.num_crops, strict=True) for _ in range(n)]
    return [torch.randn(batch, 3, s, s, device=device) for s in sizes]


def measure(precision: str, batch: int, steps: int, rounds: int, extra: list[str]) -> dict:
    cfg = load_config(["config=pretrain/swav/swav_8node_resnet", "config.DISTRIBUTED.NUM_NODES=1",
                       "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", "config.MACHINE.DEVICE=cuda",
                       f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}", *PRECISIONS[precision], *extra])
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    ctx = build_step_context(cfg, place_model(cfg, build_model(cfg), device), device)
    crops = crops_for(cfg, batch, device)
    iteration = [10**6]  # past the prototype freeze: every parameter trains, as in most of a run

    def step() -> None:
        train_step(ctx, crops, iteration[0], lr=0.1)
        iteration[0] += 1

    try:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        ms = statistics.median(timed_ms(step, steps) for _ in range(rounds))
    except torch.cuda.OutOfMemoryError:
        return {"precision": precision, "batch": batch, "fits": False}
    with FlopCounterMode(display=False) as counter:
        with ctx.autocast():
            embedding, scores = ctx.model(crops)
        (embedding.float().sum() + sum(s.float().sum() for s in scores)).backward()
    return {"precision": precision, "batch": batch, "fits": True, "ms_per_step": ms,
            "images_per_sec": batch / (ms / 1000), "tflop_per_step": counter.get_total_flops() / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def measure_peer(batch: int, steps: int, rounds: int) -> dict:
    from train_throughput import build_peer  # this folder is on sys.path when run as a script

    overrides = ["config=pretrain/swav/swav_8node_resnet", "config.DISTRIBUTED.NUM_NODES=1",
                 "config.DISTRIBUTED.NUM_PROC_PER_NODE=1", f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={batch}"]
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats()
    try:
        step, _ = build_peer(overrides, best=True, device=torch.device("cuda"))
        for _ in range(5):
            step()
        ms = statistics.median(timed_ms(step, steps) for _ in range(rounds))
    except torch.cuda.OutOfMemoryError:
        return {"precision": "peer bfloat16", "batch": batch, "fits": False}
    # The peer's step reads its loss back (float(loss)) each iteration, as its examples do.
    return {"precision": "peer bfloat16", "batch": batch, "fits": True, "ms_per_step": ms,
            "images_per_sec": batch / (ms / 1000), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--precisions", default="bfloat16,float16,float32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--peer", action="store_true", help="also the lightly peer loop (bfloat16, channels-last)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_step.py needs a CUDA GPU")
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 matrix product 8192^3 at {peak:.0f} TFLOP/s", flush=True)
    rows = []
    for precision in args.precisions.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = measure(precision, batch, args.steps, args.rounds, args.overrides)
            if row["fits"]:
                row["share_of_bf16_peak"] = row["tflop_per_step"] / (row["ms_per_step"] / 1000) / peak
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    for batch in (int(b) for b in args.batches.split(",")) if args.peer else ():
        row = measure_peer(batch, args.steps, args.rounds)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    print("\n| precision | batch | images/s | ms/step | peak GiB | share of bf16 peak |\n|---|---|---|---|---|---|")
    for r in rows:
        if r["fits"]:
            share = f"{100 * r['share_of_bf16_peak']:.1f} %" if "share_of_bf16_peak" in r else ""
            print(f"| {r['precision']} | {r['batch']} | {r['images_per_sec']:.0f} | {r['ms_per_step']:.1f} | "
                  f"{r['peak_memory_gib']:.1f} | {share} |")
        else:
            print(f"| {r['precision']} | {r['batch']} | does not fit | | | |")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "bf16_peak_tflops": peak,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
