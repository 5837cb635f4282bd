"""From data sources to batches: the multi-crop dataset, a resumable sampler, collate, builders.

Determinism contract: the sample order is a pure function of (seed, epoch) and the crops of a
sample a pure function of (seed, epoch, index), so batches do not depend on the number of
workers and a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, default_collate

from swav.data.datasets import (
    ConcatImageDataset,
    FileListDataset,
    ImageFolderDataset,
    LimitedDataset,
    RobustDataset,
)
from swav.data.transforms import MultiCropTransform

DATA_SOURCES = ("disk_folder", "disk_filelist", "synthetic")

# Distinct stream tags, so the sampler's and the augmentations' seeds never coincide.
_ORDER_STREAM, _AUGMENT_STREAM, _WORKER_SEED_STREAM = 0, 1, 2


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (SeedSequence hashing, not a sum:
    seed + epoch + i would give sample i of epoch 1 the crops of sample i + 1 of epoch 0)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class MultiCropDataset:
    """``dataset[i] -> (crops, label, i, replaced)`` with crops from ``transform``.

    ``base`` yields ``(image, label)``; it is wrapped in a RobustDataset unless it already is one.
    The epoch lives in shared memory so ``set_epoch`` reaches persistent DataLoader workers.
    With ``augment=False`` the crops are only cut and resized (uint8) and a sample carries its
    ops' random numbers as a fifth item, ``draws`` [num_crops, R]: the training process then
    runs the ops on its device (``MultiCropTransform.augment_batch``) with the same numbers.
    """

    def __init__(self, base, transform: MultiCropTransform, seed: int, augment: bool = True) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.base = base if isinstance(base, RobustDataset) else RobustDataset(base)
        self.transform = transform
        self.seed = int(seed)
        self.augment = bool(augment)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        # Call before iterating the loader: workers read it when they build each sample.
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.base)

    def path(self, index: int) -> str:
        return self.base.path(index)

    def __getitem__(self, index: int) -> tuple[list[Tensor], int, int, bool]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[list[Tensor], int, int, bool]]:
        """A batch of samples (the DataLoader asks for whole batches): crops are cut one image
        at a time, then flip, colour and normalisation run on all of them at once, which at
        32 px is several times cheaper than ~40 small tensor operations per crop. Each sample
        keeps its own random numbers, so its crops do not depend on the batch it is in."""
        loaded = [self._resample(int(index)) for index in indices]
        if not self.augment:
            return [
                (crops, label, int(index), replaced, draws)
                for ((crops, draws), label, replaced), index in zip(loaded, indices, strict=True)
            ]
        crops = self.transform.augment([resampled for resampled, _, _ in loaded])
        return [
            (sample_crops, label, int(index), replaced)
            for sample_crops, (_, label, replaced), index in zip(crops, loaded, indices, strict=True)
        ]

    def _resample(self, index: int) -> tuple[tuple[list[Tensor], Tensor], int, bool]:
        seed = mix_seed(self.seed, _AUGMENT_STREAM, self.epoch, index)

        def resample(img) -> tuple[list[Tensor], Tensor]:
            # A fresh generator per attempt: a replacement image gets this index's crops too.
            generator = torch.Generator()
            generator.manual_seed(seed)
            return self.transform.resample(img, generator, as_uint8=not self.augment)

        # The transform decodes the file itself (at the scale its crops need), inside the
        # bad-file handling. A replaced file's path goes to log.txt only: the training loop
        # counts the flags and prints one line per epoch (RunLogger.epoch_summary).
        return self.base.load(index, resample, console=False)


class ResumableSampler(Sampler[int]):
    """DistributedSampler-like: a seeded permutation per epoch, split over ranks, resumable.

    ``len()`` is the full per-rank epoch length; after ``set_epoch(epoch, start_index)`` iteration
    yields only the rank's indices from ``start_index`` on (the samples not yet consumed).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_samples = int(num_samples)
        self.seed, self.shuffle, self.rank, self.world_size = int(seed), shuffle, rank, world_size
        self.drop_last = drop_last
        if drop_last:
            self.per_rank = self.num_samples // world_size
        else:
            self.per_rank = -(-self.num_samples // world_size)
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        if not 0 <= start_index <= self.per_rank:
            raise ValueError(f"start_index {start_index} is not in [0, {self.per_rank}]")
        self.epoch, self.start_index = int(epoch), int(start_index)

    def rank_indices(self) -> list[int]:
        """This rank's whole epoch, start_index ignored."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(mix_seed(self.seed, _ORDER_STREAM, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        if total > len(order) and order:
            # Pad by repeating the order, as DistributedSampler does, so every rank has as many.
            order = (order * (-(-total // len(order))))[:total]
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index :])

    def __len__(self) -> int:
        return self.per_rank


def collate_multicrop(batch: Sequence[tuple]) -> dict:
    """Samples -> {"crops": [B,3,H,W] per crop, "labels", "indices", "replaced" (per sample, 0/1)},
    and "draws" [B, num_crops, R] for samples not yet augmented (MultiCropDataset(augment=False))."""
    crops, labels, indices, replaced, *draws = zip(*batch, strict=True)
    extra = {"draws": default_collate(list(draws[0]))} if draws else {}
    return {
        # default_collate stacks straight into shared memory inside a worker (no extra copy).
        "crops": [default_collate([c[k] for c in crops]) for k in range(len(crops[0]))],
        "labels": torch.tensor(labels, dtype=torch.long),
        "indices": torch.tensor(indices, dtype=torch.long),
        "replaced": torch.tensor(replaced, dtype=torch.long),
        **extra,
    }


def _one_source(
    source: str,
    path: str,
    synthetic_num_images: int | Mapping[str, int],
    synthetic_image_size: int,
    synthetic_num_classes: int,
    seed: int,
    max_missing_fraction: float,
):
    if source == "disk_folder":
        return ImageFolderDataset(path)
    if source == "disk_filelist":
        return FileListDataset(path, max_missing_fraction)
    if source == "synthetic":
        from swav.data.synthetic import SyntheticShapes

        split = str(path) if path else "train"
        if isinstance(synthetic_num_images, Mapping):
            if split not in synthetic_num_images:
                raise ValueError(
                    f"synthetic split {split!r} is unknown; use one of {', '.join(synthetic_num_images)}"
                )
            num_images = synthetic_num_images[split]
        else:
            num_images = synthetic_num_images
        return SyntheticShapes(split, num_images, synthetic_image_size, synthetic_num_classes, seed)
    raise ValueError(f"unknown data source {source!r}; allowed: {', '.join(DATA_SOURCES)}")


def build_dataset(
    sources: Sequence[str],
    paths: Sequence[str],
    limit: int = -1,
    synthetic_num_images: int | Mapping[str, int] = 5000,
    synthetic_image_size: int = 32,
    synthetic_num_classes: int = 10,
    seed: int = 0,
    max_consecutive_failures: int = 50,
    max_missing_fraction: float = 0.01,
) -> RobustDataset:
    """One dataset from VISSL-style ``DATA_SOURCES`` / ``DATA_PATHS`` (one source per path, or
    one source for all paths). Items are ``(image, label, replaced)``; see RobustDataset.
    ``limit`` >= 0 keeps the first ``limit`` images (``DATA_LIMIT``). A file list with more
    than ``max_missing_fraction`` of its files missing raises (``DATA.MAX_MISSING_FRACTION``,
    see FileListDataset)."""
    sources, paths = list(sources), list(paths)
    if not paths:
        raise ValueError("no data paths given")
    if len(sources) == 1 and len(paths) > 1:
        sources = sources * len(paths)
    if len(sources) != len(paths):
        raise ValueError(
            f"{len(sources)} data sources for {len(paths)} data paths: give one source per path"
        )
    for source in sources:  # before touching the disk, so a typo fails fast
        if source not in DATA_SOURCES:
            raise ValueError(f"unknown data source {source!r}; allowed: {', '.join(DATA_SOURCES)}")
    if not 0.0 <= max_missing_fraction <= 1.0:  # whatever the sources, so a typo never waits
        raise ValueError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")
    parts = [
        _one_source(
            s, p, synthetic_num_images, synthetic_image_size, synthetic_num_classes, seed,
            max_missing_fraction,
        )
        for s, p in zip(sources, paths, strict=True)
    ]
    dataset = parts[0] if len(parts) == 1 else ConcatImageDataset(parts)
    if limit is not None and limit >= 0:
        if limit == 0:
            raise ValueError("DATA_LIMIT=0 leaves no images; use -1 for all")
        dataset = LimitedDataset(dataset, limit)
    return RobustDataset(dataset, max_consecutive_failures)


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's init: leave SIGTERM to the training process.

    A scheduler's pre-emption, `timeout` or `kill -TERM -PGID` signals the whole process group.
    The training process then stops at the end of its step and saves a checkpoint; a worker that
    died of the same signal first would make the loader raise instead, and the step would be lost.
    Workers still end with the loader, or when the training process is gone (PyTorch's watchdog).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shut_down_workers(loader: DataLoader) -> None:
    """End a loader's persistent workers now, and kill any that do not end.

    The workers ignore SIGTERM (above), so the terminate that Python sends its daemonic children
    at interpreter exit does not end them, and the exit then waits for them forever. PyTorch ends
    them when the loader's iterator is garbage collected; a loader still referenced at exit (a
    reference cycle, a traceback kept) would never get there. The iterator's `_shutdown_workers`
    is private API, looked up with getattr so that a PyTorch without it falls back to the kill.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    shut_down = getattr(iterator, "_shutdown_workers", None)
    if shut_down is not None:
        shut_down()
    for worker in getattr(iterator, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
    loader._iterator = None


def build_loader(
    dataset,
    batch_size: int,
    num_workers: int,
    sampler: Sampler | None,
    pin_memory: bool,
    drop_last: bool = True,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of ``collate_multicrop`` batches.

    Workers persist across epochs by default (re-forking them every epoch costs seconds);
    MultiCropDataset.set_epoch still reaches them. The loader gets its own generator: PyTorch
    draws each iterator's worker base seed from it, which would otherwise advance the training
    process's global RNG once per epoch.
    """
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, _WORKER_SEED_STREAM))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_multicrop,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        generator=generator,
        worker_init_fn=ignore_stop_signals,
    )
