"""Data: image datasets (folder, file list, built-in synthetic), multi-crop transforms, loaders."""

from swav.data.datasets import (
    DECODE_ERRORS,
    ConcatImageDataset,
    FileListDataset,
    ImageFolderDataset,
    LimitedDataset,
    RobustDataset,
    load_rgb,
    missing_files,
    to_rgb,
)
from swav.data.loader import (
    DATA_SOURCES,
    MultiCropDataset,
    ResumableSampler,
    build_dataset,
    build_loader,
    collate_multicrop,
    mix_seed,
    shut_down_workers,
)
from swav.data.transforms import TRANSFORM_NAMES, MultiCropTransform, build_transforms

__all__ = [
    "DATA_SOURCES",
    "DECODE_ERRORS",
    "TRANSFORM_NAMES",
    "ConcatImageDataset",
    "FileListDataset",
    "ImageFolderDataset",
    "LimitedDataset",
    "MultiCropDataset",
    "MultiCropTransform",
    "ResumableSampler",
    "RobustDataset",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "collate_multicrop",
    "load_rgb",
    "missing_files",
    "mix_seed",
    "shut_down_workers",
    "to_rgb",
]
