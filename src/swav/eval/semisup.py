"""Semi-supervised fine-tuning with 1 % or 10 % of the labels (appendix A.4).

20 epochs, batch 256, SGD without weight decay, trunk LR 0.02 and head LR 5 (1 %) or 0.01 and
0.2 (10 %), both multiplied by 0.2 at epochs 12 and 16. The whole network trains (BN included).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from swav.eval.features import Transformed

logger = logging.getLogger("swav")


def balanced_subset(labels: Sequence[int], percent: float, seed: int) -> np.ndarray:
    """Sorted indices of ``percent`` % of each class (at least one image per class).

    Deterministic: the images of class ``c`` are permuted by a generator seeded with
    ``(seed, c)``, so a class's choice does not depend on the other classes or on the order
    classes appear in. Unlabelled images (-1) are never chosen.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    labels = np.asarray(labels, dtype=np.int64)
    chosen = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        count = max(1, round(len(members) * percent / 100.0))
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(c)]))
        chosen.append(members[rng.permutation(len(members))[:count]])
    if not chosen:
        raise ValueError("no labelled images to sample from")
    return np.sort(np.concatenate(chosen))


def subset_from_file(paths: Sequence[str], list_file: str | Path) -> np.ndarray:
    """Indices of the images named in ``list_file`` (one per line: a path or a file name, as
    SimCLR's ``1percent.txt``); a line matching no image is an error."""
    names = [line.strip() for line in Path(list_file).read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    by_path = {os.path.normpath(p): i for i, p in enumerate(paths)}
    by_name: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_name.setdefault(os.path.basename(p), []).append(i)
    chosen, unknown = set(), []
    for name in names:
        if os.path.normpath(name) in by_path:
            chosen.add(by_path[os.path.normpath(name)])
        elif os.path.basename(name) in by_name:
            chosen.update(by_name[os.path.basename(name)])
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(
            f"{list_file}: {len(unknown)} of {len(names)} listed images are not in the training data, "
            f"e.g. {unknown[:3]}"
        )
    return np.asarray(sorted(chosen), dtype=np.int64)


class Classifier(nn.Module):
    """Trunk features followed by a linear layer."""

    def __init__(self, trunk: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x):
        return self.head(self.trunk(x))


def finetune(
    model: Classifier,
    dataset,
    indices: Sequence[int],
    transform,
    num_epochs: int = 20,
    batch_size: int = 256,
    trunk_lr: float = 0.02,
    head_lr: float = 5.0,
    milestones: Sequence[int] = (12, 16),
    gamma: float = 0.2,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[float]:
    """Fine-tune ``model`` on ``dataset[indices]``; returns the mean loss per epoch."""
    device = torch.device(device)
    torch.manual_seed(seed)
    data = Transformed(dataset, transform, indices)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, num_workers=num_workers, generator=generator,
        # Only a last batch of one image is dropped: it would break BatchNorm on 1x1 maps.
        drop_last=len(data) % batch_size == 1, pin_memory=device.type == "cuda",
    )
    optimizer = torch.optim.SGD(
        [{"params": model.trunk.parameters(), "lr": trunk_lr, "base_lr": trunk_lr},
         {"params": model.head.parameters(), "lr": head_lr, "base_lr": head_lr}],
        momentum=momentum,
        weight_decay=weight_decay,
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    history = []
    for epoch in range(num_epochs):
        factor = gamma ** sum(epoch >= m for m in milestones)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        total, count = 0.0, 0
        for images, labels, _ in tqdm(loader, desc=f"fine-tune {epoch + 1}/{num_epochs}", disable=None,
                                      leave=False, file=sys.stderr, dynamic_ncols=True):
            loss = loss_fn(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item(), count + 1
        history.append(total / max(count, 1))
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"fine-tuning: loss is {history[-1]} in epoch {epoch + 1}; lower the LRs")
        logger.info("fine-tune epoch %d/%d: loss %.4f, trunk LR %.4g, head LR %.4g", epoch + 1, num_epochs,
                    history[-1], trunk_lr * factor, head_lr * factor)
    model.eval()
    return history
