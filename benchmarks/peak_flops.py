"""How close the training step comes to this CPU's measured matrix-multiply peak.

Peak: GFLOP/s of a 4096 x 4096 x 4096 matmul (2 N^3 FLOPs) in float32 and in bfloat16, with
torch's default threads (one per core). Achieved: the FLOPs of one ``swav.train.train_step``
(forward and backward, counted by torch.utils.flop_counter.FlopCounterMode: convolutions and
matrix products, which is nearly all of them) divided by the step's median time. The matmuls
and the steps run interleaved in rounds so background load hits both alike.

    python benchmarks/peak_flops.py                                   # shipped CIFAR config
    python benchmarks/peak_flops.py config=pretrain/swav/swav_cifar10_resnet18 \\
        config.MODEL.TRUNK.RESNETS.SMALL_STEM=true --crops 2x32+4x16 --batch 128 --prototypes 3000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402  (the same step builder as the throughput benchmark)


def matmul_gflops(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: packing buffers, oneDNN/MKL dispatch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config", default=tt.DEFAULT_CONFIG)
    parser.add_argument("--crops", default="2x32")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--prototypes", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    parser.add_argument("--bf16-size", type=int, default=0,
                        help="n of the bfloat16 matmul (0: 4096, or 512 where the CPU emulates bfloat16: "
                             "4096^3 would take minutes there)")
    args = parser.parse_args()
    from swav import precision
    from swav.build import amp_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    # One process with the whole batch: the FLOP counter sees only this process's operations.
    overrides = tt.one_process(tt.config_overrides(args))
    bf16_n = args.bf16_size or (4096 if precision.cpu_has_native_bfloat16() else 512)

    step, cfg = tt.build_ours(overrides)
    for _ in range(2):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    print(f"# {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{' '.join([args.config, *args.overrides])} crops {args.crops} batch {batch}; "
          f"step precision {amp_dtype(cfg, torch.device('cpu')) or torch.float32}, "
          f"channels_last={cfg.MODEL.CHANNELS_LAST}; native bfloat16 {precision.cpu_has_native_bfloat16()}")
    print(f"# one step: {flops / 1e9:.1f} GFLOP (forward + backward) = {flops / batch / 1e9:.2f} GFLOP per image; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    fp32, bf16, step_s = [], [], []
    for _ in range(args.rounds):
        fp32.append(matmul_gflops(torch.float32))
        bf16.append(matmul_gflops(torch.bfloat16, n=bf16_n))
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            step_s.append(time.perf_counter() - t0)
    peak32, peak16 = statistics.median(fp32), statistics.median(bf16)
    achieved = flops / statistics.median(step_s) / 1e9
    print(f"matmul 4096^3 float32 : {peak32:7.0f} GFLOP/s (median of {args.rounds}; range {min(fp32):.0f}-{max(fp32):.0f})")
    print(f"matmul {bf16_n}^3 bfloat16: {peak16:7.1f} GFLOP/s (range {min(bf16):.0f}-{max(bf16):.0f})")
    print(f"train step            : {achieved:7.0f} GFLOP/s ({batch / statistics.median(step_s):.0f} img/s, "
          f"median of {len(step_s)} steps) = "
          + (f"{100 * achieved / peak16:.1f} % of the bfloat16 peak, " if amp_dtype(cfg, torch.device("cpu")) else "")
          + f"{100 * achieved / peak32:.1f} % of the float32 peak")
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
