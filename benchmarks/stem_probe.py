"""Training images/s of ResNet-18 trunks at 32 px, one thread, bfloat16 and float32: which stem and
width a CPU trains fastest (forward + backward + SGD on 256 crops = 128 images of 2 crops).

    PYTHONPATH=src python benchmarks/stem_probe.py
"""

import time

import torch

from swav.models.resnet import ResNet

TRUNKS = {
    "imagenet-stem w1": {},
    "imagenet-stem w0.5": {"width_multiplier": 0.5},
    "s2-stem w0.5": {"width_multiplier": 0.5, "small_stem": True, "small_stem_stride": 2},
    "s1-stem w0.25": {"width_multiplier": 0.25, "small_stem": True},
    "s1-stem w1": {"small_stem": True},
}


def images_per_second(bfloat16: bool, **trunk) -> float:
    torch.manual_seed(0)
    model = ResNet(depth=18, **trunk).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(256, 3, 32, 32).to(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            y = model(x)
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):  # warm-up: allocator and oneDNN kernels
        step()
    start, n = time.perf_counter(), 4
    for _ in range(n):
        step()
    return 128 * n / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(1)
    for bfloat16 in (True, False):
        for name, trunk in TRUNKS.items():
            rate = images_per_second(bfloat16, **trunk)
            print(f"{name:20s} {'bfloat16' if bfloat16 else 'float32 '}: {rate:7.0f} img/s", flush=True)


if __name__ == "__main__":
    main()
