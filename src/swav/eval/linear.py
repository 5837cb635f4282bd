"""Linear classifier on frozen features (appendix A.3 and A.5 schedules).

A.3 (ImageNet): 100 epochs, LR 0.3, cosine decay, weight decay 1e-6, batch 256, training images
through RandomResizedCrop + flip. A.5 (Places205, iNat18): LR 0.01 divided by 10 three times at
equal intervals, weight decay 1e-4, momentum 0.9. The trunk stays in eval mode (BN statistics
frozen) and without gradient; only the linear layer learns.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from swav.optim import cosine_schedule, step_schedule

logger = logging.getLogger("swav")


def linear_lr_schedule(
    name: str, base_lr: float, num_epochs: int, iters_per_epoch: int, step_decays: int = 3
) -> np.ndarray:
    """Per-iteration LR: ``cosine`` from ``base_lr`` to 0 (A.3), or ``step``: divided by 10
    ``step_decays`` times at equally spaced epochs (A.5: 28 epochs -> epochs 7, 14, 21)."""
    total = num_epochs * iters_per_epoch
    if name == "cosine":
        return cosine_schedule(base_lr, 0.0, total)
    if name == "step":
        epochs = [round(num_epochs * i / (step_decays + 1)) for i in range(1, step_decays + 1)]
        return step_schedule(base_lr, total, [e * iters_per_epoch for e in epochs], 0.1)
    raise ValueError(f"unknown LR schedule {name!r}; use cosine or step")


def topk_accuracy(logits: Tensor, labels: Tensor) -> dict:
    """Top-1 and top-5 accuracy in percent (top-5 capped at the number of classes)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    n = max(len(labels), 1)
    return {"top1": 100.0 * hits[:, 0].sum().item() / n, "top5": 100.0 * hits.any(1).sum().item() / n}


def new_linear(in_features: int, num_classes: int, use_bn: bool = False) -> nn.Module:
    """A linear layer (weights N(0, 0.01), zero bias), optionally after a BatchNorm of the
    features as VISSL's eval_mlp head: the BN makes the LR independent of the feature scale,
    and at test time it is a fixed affine map, so the classifier stays linear."""
    linear = nn.Linear(in_features, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(in_features), linear) if use_bn else linear


def fit_linear(
    head: nn.Module,
    batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    num_epochs: int,
    iters_per_epoch: int,
    lr_schedule: np.ndarray,
    weight_decay: float,
    momentum: float = 0.9,
    desc: str = "linear",
) -> list[float]:
    """SGD on ``head`` over ``batches(epoch)`` (feature, label) pairs; returns the mean loss per epoch."""
    optimizer = torch.optim.SGD(head.parameters(), lr=0.0, momentum=momentum, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    iteration, history = 0, []
    bar = tqdm(total=num_epochs * iters_per_epoch, desc=desc, disable=None, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    for epoch in range(num_epochs):
        total, count = 0.0, 0
        for x, y in batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[min(iteration, len(lr_schedule) - 1)])
            loss = loss_fn(head(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count, iteration = total + loss.item(), count + 1, iteration + 1
            bar.update(1)
        history.append(total / max(count, 1))
        if not math.isfinite(history[-1]):
            bar.close()
            raise FloatingPointError(f"linear classifier: loss is {history[-1]} in epoch {epoch + 1}; lower the LR")
        bar.set_postfix(loss=f"{history[-1]:.3f}", epoch=epoch + 1)
    bar.close()
    logger.info("linear classifier: loss %.4f after %d epochs", history[-1] if history else float("nan"), num_epochs)
    return history


def feature_batches(
    features: Tensor, labels: Tensor, batch_size: int, seed: int
) -> Callable[[int], Iterable[tuple[Tensor, Tensor]]]:
    """Shuffled mini-batches of precomputed features, a fixed permutation per (seed, epoch)."""

    def batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(len(features), generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) > 1 or len(order) == 1:  # a lone last sample would break a BatchNorm head
                yield features[idx], labels[idx]

    return batches


def train_linear_on_features(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    num_epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.3,
    schedule: str = "cosine",
    step_decays: int = 3,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    seed: int = 0,
    use_bn: bool = False,
) -> nn.Module:
    """The fast mode: a linear layer on fixed (centre-crop) features, no augmentation."""
    torch.manual_seed(seed)
    head = new_linear(features.shape[1], num_classes, use_bn).to(features.device)
    iters = math.ceil(len(features) / batch_size)
    fit_linear(
        head,
        feature_batches(features, labels.long(), batch_size, seed),
        num_epochs,
        iters,
        linear_lr_schedule(schedule, lr, num_epochs, iters, step_decays),
        weight_decay,
        momentum,
        desc="linear (features)",
    )
    return head.eval()
