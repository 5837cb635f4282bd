"""Features of a frozen trunk: pooled stage outputs, dataset labels, (distributed) extraction."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from swav import distributed, precision
from swav.models.resnet import STAGE_NAMES

logger = logging.getLogger("swav")


class PooledStage(nn.Module):
    """``trunk.forward_stages`` output of one stage, average-pooled to ``pool_size`` squared and
    flattened: ``res5`` with ``pool_size`` 1 is the trunk's own output."""

    def __init__(self, trunk: nn.Module, layer: str = "res5", pool_size: int = 1) -> None:
        super().__init__()
        if layer not in STAGE_NAMES:
            raise ValueError(f"unknown layer {layer!r}; choose from {', '.join(STAGE_NAMES)}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.trunk, self.layer, self.pool_size = trunk, layer, pool_size

    def forward(self, x: Tensor) -> Tensor:
        if self.layer == "res5" and self.pool_size == 1:
            return self.trunk(x)
        out = self.trunk.forward_stages(x, (self.layer,))[self.layer]
        return F.adaptive_avg_pool2d(out, self.pool_size).flatten(1)


def dataset_labels(dataset) -> np.ndarray:
    """Labels of a dataset from ``swav.data.build_dataset`` without decoding its images.

    Unwraps RobustDataset / LimitedDataset / ConcatImageDataset down to the sample lists (or the
    synthetic labels); anything else is read item by item.
    """
    if hasattr(dataset, "samples"):
        return np.asarray([label for _, label in dataset.samples], dtype=np.int64)
    if hasattr(dataset, "labels") and len(dataset.labels) == len(dataset):
        return np.asarray(dataset.labels, dtype=np.int64)
    if hasattr(dataset, "limit") and hasattr(dataset, "dataset"):
        return dataset_labels(dataset.dataset)[: dataset.limit]
    if hasattr(dataset, "datasets"):
        return np.concatenate([dataset_labels(d) for d in dataset.datasets])
    if hasattr(dataset, "dataset") and len(dataset.dataset) == len(dataset):
        return dataset_labels(dataset.dataset)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader,
    device: str | torch.device = "cpu",
    normalize: bool = True,
    amp: bool | torch.dtype | None = False,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` in eval mode over ``(images, labels, ...)`` batches.

    Returns float32 features ``[N, D]`` and int64 labels ``[N]``, both on the CPU. Outputs with
    more than two dimensions are flattened per sample. ``amp`` runs under autocast: to that dtype
    when it is one, else (True) bfloat16, or float16 on a GPU older than compute capability 8.0.
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    features, labels = [], []
    if amp is True:
        amp = precision.autocast_dtype(True, device, "bfloat16", cpu_bfloat16="always")
    autocast = torch.autocast(device.type, dtype=amp) if isinstance(amp, torch.dtype) else nullcontext()
    try:
        for batch in loader:
            images, targets = batch[0], batch[1]
            with autocast:
                out = model(images.to(device, non_blocking=True))
            out = out.float().flatten(1)
            if normalize:
                out = F.normalize(out, dim=1)
            features.append(out.cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.long).cpu())
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


class Transformed(Dataset):
    """``(transform(image), label, index)`` from a dataset of ``(image, label, ...)``, optionally
    restricted to ``indices``."""

    def __init__(self, dataset, transform, indices: Sequence[int] | None = None) -> None:
        self.dataset, self.transform = dataset, transform
        self.indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        index = self.indices[i]
        image, label = self.dataset[index][:2]
        return self.transform(image), int(label), index


@torch.no_grad()
def extract_dataset(
    model: nn.Module,
    dataset,
    transform,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool | torch.dtype | None = False,
    desc: str = "features",
) -> tuple[Tensor, Tensor] | None:
    """Raw (not normalised) features ``[N, D]`` and labels ``[N]`` of every image, in dataset order.

    With an initialised process group each rank takes every world-size-th image and rank 0
    gathers and reorders them; other ranks return None. The model runs in eval mode (BN
    statistics frozen) and its mode is restored afterwards.
    """
    rank, world = distributed.rank(), distributed.world_size()
    indices = list(range(rank, len(dataset), world))
    loader = DataLoader(
        Transformed(dataset, transform, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    if indices:
        progress = tqdm(loader, desc=desc, disable=None if rank == 0 else True, leave=False, file=sys.stderr,
                        dynamic_ncols=True)
        features, targets = extract_features(model, progress, device=device, normalize=False, amp=amp)
    else:  # more processes than images
        features, targets = torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    # The loader is not shuffled: this rank's rows are its `indices`, in order.
    local = (features, targets, torch.tensor(indices, dtype=torch.long))
    if world == 1:
        features, targets, _ = local
        return features, targets.long()
    # Objects, not tensors: shards differ in length by one. No gradients flow (no_grad above).
    # Over nccl a pickled gather stages every rank's bytes in rank 0's GPU memory (about 10 GB
    # for ImageNet's res5 features): these CPU tensors go through a gloo group instead.
    group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(local, gathered, dst=0, group=group)
    if group is not None:
        dist.destroy_process_group(group)
    if rank != 0:
        return None
    parts = [p for p in gathered if p[0].shape[0] > 0]
    features = torch.cat([p[0] for p in parts])
    targets = torch.cat([p[1] for p in parts]).long()
    position = torch.cat([p[2] for p in parts]).argsort()
    return features[position], targets[position]
