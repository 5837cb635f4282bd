"""Weighted k-nearest-neighbour evaluation of frozen features (SwAV paper, table 7).

Protocol of Wu et al. 2018 (InstDisc): features are L2-normalised, each test image takes its
``k`` most cosine-similar training images, each neighbour votes for its label with weight
``exp(sim / T)``, and the class with the largest summed weight is the prediction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision import transforms

from swav import distributed
from swav.eval.features import Transformed, extract_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _accuracies(scores: Tensor, targets: Tensor) -> tuple[int, int]:
    """Number of top-1 and top-5 hits for class scores ``[B, C]``."""
    ranked = scores.topk(min(5, scores.shape[1]), dim=1)
    # A class no neighbour voted for is not a hit, even when ties put it in the top 5.
    hits = (ranked.indices == targets[:, None]) & (ranked.values > 0)
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def _check_k(k, temperature: float) -> list[int]:
    ks = [int(k)] if not isinstance(k, Iterable) else [int(x) for x in k]
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be a positive int or a non-empty sequence of them, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return ks


@torch.no_grad()
def nearest_neighbours(train_features: Tensor, train_labels: Tensor, queries: Tensor, k: int,
                       batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """The `k` training rows most similar to each query (capped at the training rows): their
    similarities `[Q, k]`, most similar first, and their labels `[Q, k]`. The queries go
    `batch_size` rows at a time, so memory stays at `batch_size x num_train` similarities."""
    device = train_features.device
    train_features = train_features.float()
    train_labels = train_labels.to(device=device, dtype=torch.long)
    k = min(k, train_features.shape[0])
    sims, labels = [], []
    for start in range(0, queries.shape[0], batch_size):
        block = queries[start : start + batch_size].to(device=device, dtype=torch.float32)
        s, idx = (block @ train_features.T).topk(k, dim=1)  # sorted, most similar first
        sims.append(s)
        labels.append(train_labels[idx])
    return torch.cat(sims), torch.cat(labels)


def vote(sims: Tensor, labels: Tensor, test_labels: Tensor, ks: Sequence[int], temperature: float,
         num_classes: int, batch_size: int = 1024) -> dict:
    """Weighted kNN accuracies in percent from sorted neighbours (`nearest_neighbours`), one
    `{"top1", "top5"}` per k, keyed `k{k}`."""
    test_labels = test_labels.to(device=sims.device, dtype=torch.long)
    num_test = sims.shape[0]
    hits = {kk: [0, 0] for kk in ks}
    for start in range(0, num_test, batch_size):
        s, votes = sims[start : start + batch_size], labels[start : start + batch_size]
        targets = test_labels[start : start + batch_size]
        # Subtracting each row's largest similarity scales its weights by a constant, which
        # leaves the argmax unchanged and keeps exp() finite for small temperatures.
        weights = ((s - s[:, :1]) / temperature).exp()
        for kk in ks:
            kk_eff = min(kk, s.shape[1])
            scores = torch.zeros(s.shape[0], num_classes, device=s.device)
            scores.scatter_add_(1, votes[:, :kk_eff], weights[:, :kk_eff])
            top1, top5 = _accuracies(scores, targets)
            hits[kk][0] += top1
            hits[kk][1] += top5
    return {f"k{kk}": {"top1": 100.0 * h[0] / num_test, "top5": 100.0 * h[1] / num_test} for kk, h in hits.items()}


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int | Sequence[int] = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> dict:
    """Weighted kNN accuracy in percent.

    With an int ``k`` returns ``{"top1": ..., "top5": ...}``; with a sequence of k values
    returns ``{"k20": {"top1": ..., "top5": ...}, "k200": {...}}`` from one neighbour search.
    Features are expected L2-normalised (the dot product is the cosine similarity). ``k`` is
    capped at the number of training samples. Top-5 counts a hit only for a class that got
    votes (with k=1 it equals top-1).
    The test set is processed ``batch_size`` rows at a time to bound memory
    (``batch_size x num_train`` similarities).
    """
    ks = _check_k(k, temperature)
    num_train, num_test = train_features.shape[0], test_features.shape[0]
    if num_train == 0 or num_test == 0:
        raise ValueError(f"need training and test features, got {num_train} and {num_test}")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    sims, labels = nearest_neighbours(train_features, train_labels, test_features, max(ks), batch_size)
    results = vote(sims, labels, test_labels, ks, temperature, num_classes, batch_size)
    return results[f"k{ks[0]}"] if not isinstance(k, Iterable) else results


class EvalTransform:
    """Deterministic evaluation transform: images already ``image_size`` square pass as they
    are; others are resized (to ``image_size / 0.875`` if larger, else to ``image_size``) and
    centre-cropped. Then ToTensor and normalisation (ImageNet's mean and std by default)."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.image_size = image_size
        self.to_tensor = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
        )
        self.shrink = transforms.Compose(
            [transforms.Resize(int(image_size / 0.875)), transforms.CenterCrop(image_size)]
        )
        self.grow = transforms.Compose(
            [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
        )

    def __call__(self, image: Image.Image) -> Tensor:
        image = image.convert("RGB")
        width, height = image.size
        if (width, height) != (self.image_size, self.image_size):
            image = (self.shrink if min(width, height) > self.image_size else self.grow)(image)
        return self.to_tensor(image)


def evaluate_knn(
    trunk: nn.Module,
    train_dataset,
    test_dataset,
    image_size: int,
    batch_size: int = 256,
    k: int | Sequence[int] = 200,
    temperature: float = 0.1,
    num_workers: int = 0,
    amp: bool = False,
    device: str | torch.device | None = None,
) -> dict:
    """Weighted kNN of ``trunk`` features; datasets yield ``(PIL image, label)``.

    ``device`` defaults to the trunk's. Returns what :func:`knn_classify` returns.

    Called by every process of a process group (the kNN monitor of a run on several processes),
    the work is split: each process extracts its share of both splits, searches the test images'
    neighbours among its share of the training images, and the per-process neighbours are merged;
    every process returns the same result, equal to one process's.
    """
    if device is None:
        param = next(trunk.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    transform = EvalTransform(image_size)
    rank, world_size = distributed.rank(), distributed.world_size()

    def features(dataset) -> tuple[Tensor, Tensor]:
        if len(dataset) < world_size:  # known to every process: they all stop here together
            raise ValueError(f"a kNN split of {len(dataset)} images cannot be shared by {world_size} processes")
        loader = DataLoader(
            Transformed(dataset, transform, indices=distributed.shard_range(len(dataset), rank, world_size)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        return extract_features(trunk, loader, device=device, normalize=True, amp=amp)

    ks = _check_k(k, temperature)
    train_features, train_labels = features(train_dataset)
    test_features, test_labels = features(test_dataset)
    # Every process needs every test image's features; the training features stay where they were
    # extracted (on ImageNet they are the large part).
    test_features = distributed.all_gather_rows(test_features.to(device), device)
    test_labels = distributed.all_gather_rows(test_labels.to(device), device)
    num_train = int(distributed.all_gather_rows(torch.tensor([len(train_labels)], device=device), device).sum())
    if num_train == 0 or len(test_labels) == 0:
        raise ValueError(f"need training and test images, got {num_train} and {len(test_labels)}")
    local = torch.cat([train_labels.to(device), test_labels])
    extremes = distributed.all_gather_rows(torch.stack([-local.min(), local.max()])[None], device)
    if int(extremes[:, 0].max()) > 0:
        raise ValueError(
            "kNN needs labelled images (class sub-folders, or a label column in a file list); "
            "some of these images have none"
        )
    sims, labels = nearest_neighbours(train_features.to(device), train_labels, test_features, max(ks))
    if world_size > 1:
        sims, labels = _merge_neighbours(sims, labels, min(max(ks), num_train), device)
    results = vote(sims, labels, test_labels, ks, temperature, num_classes=int(extremes[:, 1].max()) + 1)
    return results[f"k{ks[0]}"] if not isinstance(k, Iterable) else results


def _merge_neighbours(sims: Tensor, labels: Tensor, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each process's `k` nearest training images of every test image, side by side, then the
    best `k` of those: the neighbours one process would have found among all training images."""
    pad = k - sims.shape[1]  # a process with fewer than k training images
    if pad > 0:
        sims = F.pad(sims, (0, pad), value=float("-inf"))  # no weight in the vote
        labels = F.pad(labels, (0, pad))
    # Gathered as rows: one row per neighbour rank, one column per test image.
    all_sims = distributed.all_gather_rows(sims.T.contiguous(), device).T
    all_labels = distributed.all_gather_rows(labels.T.contiguous(), device).T
    best, idx = all_sims.topk(k, dim=1)
    return best, all_labels.gather(1, idx)
