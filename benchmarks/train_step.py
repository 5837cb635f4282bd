"""Training-step throughput of a config, without data loading.

Measures images per second of `swav.train.train_step` (forward, loss, backward, optimizer) on
random crops of the config's sizes, for each precision / memory-format combination asked for.
Each setting: 3 warm-up steps, then `--steps` timed steps; the median and the spread (min-max)
of the per-step rate are reported.

    python benchmarks/train_step.py config=quickstart --steps 10
    python benchmarks/train_step.py config=pretrain/swav/swav_cifar10_resnet18 --variants bf16-cl,fp32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from swav.build import build_model, build_step_context, place_model
from swav.config import load_config
from swav.train import train_step

VARIANTS = {
    # always: measure bfloat16 even where the CPU emulates it (training's auto rule would not use it)
    "bf16-cl": ["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.CPU_BFLOAT16=always",
                "config.MODEL.CHANNELS_LAST=true"],
    "bf16": ["config.MODEL.AMP_PARAMS.USE_AMP=true", "config.MODEL.AMP_PARAMS.CPU_BFLOAT16=always",
             "config.MODEL.CHANNELS_LAST=false"],
    "fp32-cl": ["config.MODEL.AMP_PARAMS.USE_AMP=false", "config.MODEL.CHANNELS_LAST=true"],
    "fp32": ["config.MODEL.AMP_PARAMS.USE_AMP=false", "config.MODEL.CHANNELS_LAST=false"],
}


def measure(overrides: list[str], steps: int) -> list[float]:
    cfg = load_config(overrides)
    device = torch.device("cpu")
    torch.manual_seed(0)
    ctx = build_step_context(cfg, place_model(cfg, build_model(cfg), device), device)
    batch = cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA
    spec = cfg.DATA.TRAIN.TRANSFORMS[0]
    crops = [torch.randn(batch, 3, size, size) for n, size in zip(spec.num_crops, spec.size_crops, strict=True) for _ in range(n)]
    rates = []
    for i in range(3 + steps):
        start = time.perf_counter()
        train_step(ctx, crops, i, 0.01).item()  # .item() waits for the step to finish
        if i >= 3:
            rates.append(batch / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, overrides: {' '.join(args.overrides) or '(quickstart)'}")
    print(f"{'variant':10s} {'median img/s':>13s} {'min':>8s} {'max':>8s}")
    for name in args.variants.split(","):
        rates = measure([*args.overrides, *VARIANTS[name]], args.steps)
        print(f"{name:10s} {statistics.median(rates):13.1f} {min(rates):8.1f} {max(rates):8.1f}")


if __name__ == "__main__":
    main()
