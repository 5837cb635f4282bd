"""Samples/s of the CIFAR recipe's training pipeline in one thread (as one DataLoader worker):
JPEG files to 2x32 crops with flip, colour and normalisation, in batches of 128 as the loader asks.

    PYTHONPATH=src python benchmarks/cifar_pipeline.py /work/data/cifar10/train

Run it at two commits (a checkout each, PYTHONPATH at its src) to compare pipelines.
"""

import sys
import time

import torch
from omegaconf import OmegaConf

from swav.build import build_dataset_from
from swav.config import load_config
from swav.data.loader import MultiCropDataset, collate_multicrop
from swav.data.transforms import build_transforms


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(["config=pretrain/simclr/simclr_cifar10_resnet18",
                       f"config.DATA.TRAIN.DATA_PATHS=[{sys.argv[1]}]"], world_size=2)
    base = build_dataset_from(cfg, cfg.DATA.TRAIN.DATA_SOURCES, cfg.DATA.TRAIN.DATA_PATHS)
    dataset = MultiCropDataset(base, build_transforms(OmegaConf.to_container(cfg.DATA.TRAIN.TRANSFORMS)), seed=0)
    # Whole batches where the dataset offers them (the DataLoader's own rule), else one by one.
    get = getattr(dataset, "__getitems__", None) or (lambda idx: [dataset[i] for i in idx])
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for b in range(4):
            collate_multicrop(get(list(range(b * 128, b * 128 + 128))))
        best = max(best, 512 / (time.perf_counter() - start))
    print(f"{best:.0f} samples/s (best of 3 rounds of 512)")


if __name__ == "__main__":
    main()
