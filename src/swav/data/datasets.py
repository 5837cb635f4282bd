"""Image datasets: folders, file lists, their concatenation, and a wrapper that survives bad files.

Every dataset maps ``dataset[i] -> (PIL RGB image, int label)`` (label -1 when unknown) and
names its items with ``path(i)`` for messages. File-backed ones also have ``open(i)``: the same
pair with the image opened but not decoded, so a transform can choose the decoding scale
(JPEG draft mode); ``open_item`` falls back to ``dataset[i]`` for the others. Problems with the data location itself (missing
folder, empty list) raise at construction, so nothing starts training on a typo.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

logger = logging.getLogger("swav")

UNLABELLED = -1


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully (so a corrupt file fails here) and return it in RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    # convert() copies even when the mode already matches: skip it for RGB files.
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(path: str) -> Image.Image:
    """Open an image file, reading only its header; ``load()`` (or any pixel access) decodes it
    and closes the file."""
    return Image.open(path)


def open_item(dataset, index: int) -> tuple[Image.Image, int]:
    """``dataset.open(index)`` when the dataset has it, else ``dataset[index]``."""
    opener = getattr(dataset, "open", None)
    return opener(index) if opener is not None else dataset[index]


def _check_dir(root: str) -> Path:
    p = Path(root).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    if not p.is_dir():
        raise ValueError(
            f"{root!r} is a file, not a folder; use the disk_filelist source for a list of image paths"
        )
    return p


class _SampleList:
    """A list of (path, label) pairs, decoded on access."""

    samples: list[tuple[str, int]]

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> str:
        return self.samples[index][0]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_rgb(path), label

    def open(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return open_image(path), label


class ImageFolderDataset(_SampleList):
    """Images under ``root``: torchvision's ImageFolder layout, or unlabelled images directly in it.

    With class sub-folders (``root/<class>/**/<image>``), labels index the sorted class names and
    images directly in ``root`` are ignored. Without any, the images directly in ``root`` are used
    with label -1 (pretraining needs no labels).
    """

    def __init__(self, root: str) -> None:
        self.root = str(_check_dir(root))
        with os.scandir(self.root) as it:
            entries = sorted(it, key=lambda e: e.name)
        # Hidden folders (.ipynb_checkpoints, .cache, ...) are never classes.
        class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        loose = [
            os.path.join(self.root, e.name)
            for e in entries
            if e.is_file() and has_file_allowed_extension(e.name, IMG_EXTENSIONS)
        ]
        samples: list[tuple[str, int]] = []
        if class_dirs:
            class_to_idx = {name: i for i, name in enumerate(class_dirs)}
            # make_dataset walks each class folder in sorted order: deterministic across machines.
            samples = make_dataset(
                self.root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True
            )
        if samples:
            self.classes = class_dirs
            if loose:
                logger.warning(
                    "%s has class sub-folders; its %d images outside them are ignored",
                    self.root,
                    len(loose),
                )
        else:
            self.classes = []
            samples = [(p, UNLABELLED) for p in loose]
        if not samples:
            raise ValueError(
                f"no images found in {self.root!r} (looked for {', '.join(IMG_EXTENSIONS)} "
                "directly in it or in class sub-folders)"
            )
        self.samples = samples


def _read_list(path: Path) -> list[tuple[str, int]]:
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError:
            # Object arrays of str need pickle; the list is the user's own file, like the config.
            arr = np.load(path, allow_pickle=True)
        return [(str(p), UNLABELLED) for p in np.asarray(arr).reshape(-1)]
    entries = []
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        label = UNLABELLED
        if len(parts) == 2:
            try:
                label = int(parts[1])
                line = parts[0]
            except ValueError:
                pass  # no label column: the whole line (spaces included) is the path
        if label < UNLABELLED:
            raise ValueError(f"{path}:{lineno}: label {label} is negative")
        entries.append((line, label))
    return entries


class FileListDataset(_SampleList):
    """Images listed in a file: ``.txt`` (``path [label]`` per line) or ``.npy`` (array of paths).

    Relative paths are resolved against the list file's folder; missing labels are -1.
    """

    _CHECKED = 16  # listed files checked at construction: catches a wrong base folder early

    def __init__(self, path: str) -> None:
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a folder; use the disk_folder source" if p.is_dir() else "does not exist"
            raise FileNotFoundError(f"image list {path!r} {what}")
        if p.suffix not in (".txt", ".npy"):
            raise ValueError(f"image list {path!r} must be a .txt or .npy file")
        base = p.resolve().parent
        self.list_path = str(p)
        self.samples = [(str(base / os.path.expanduser(f)), label) for f, label in _read_list(p)]
        if not self.samples:
            raise ValueError(f"image list {path!r} is empty")
        head = [f for f, _ in self.samples[: self._CHECKED]]
        if not any(os.path.isfile(f) for f in head):
            raise FileNotFoundError(
                f"none of the first {len(head)} images listed in {path!r} exist, e.g. {head[0]!r} "
                f"(relative paths are resolved against {str(base)!r})"
            )


class ConcatImageDataset:
    """Several datasets one after the other (like torch's ConcatDataset, plus ``path``)."""

    def __init__(self, datasets: Sequence) -> None:
        if not datasets:
            raise ValueError("ConcatImageDataset needs at least one dataset")
        self.datasets = list(datasets)
        self.offsets = np.cumsum([len(d) for d in self.datasets]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[object, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        k = bisect.bisect_right(self.offsets, index)
        return self.datasets[k], index - (self.offsets[k - 1] if k else 0)

    def path(self, index: int) -> str:
        d, j = self._locate(index)
        return d.path(j)

    def __getitem__(self, index: int):
        d, j = self._locate(index)
        return d[j]

    def open(self, index: int):
        d, j = self._locate(index)
        return open_item(d, j)


class LimitedDataset:
    """The first ``limit`` items of a dataset (``DATA_LIMIT``)."""

    def __init__(self, dataset, limit: int) -> None:
        self.dataset = dataset
        self.limit = min(limit, len(dataset))

    def __len__(self) -> int:
        return self.limit

    def path(self, index: int) -> str:
        return self.dataset.path(index)

    def __getitem__(self, index: int):
        if not 0 <= index < self.limit:
            raise IndexError(f"index {index} out of range for {self.limit} images")
        return self.dataset[index]

    def open(self, index: int):
        if not 0 <= index < self.limit:
            raise IndexError(f"index {index} out of range for {self.limit} images")
        return open_item(self.dataset, index)


class RobustDataset:
    """``dataset[i] -> (image, label, replaced)``: an unreadable image is logged and replaced.

    The replacement is the next readable index (wrapping around), so it is deterministic; the
    flag travels with the sample (and through DataLoader workers) so the loop can count them.
    After ``max_consecutive_failures`` unreadable files in a row the data is presumed broken.
    """

    def __init__(self, dataset, max_consecutive_failures: int = 50) -> None:
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        self.dataset = dataset
        self.max_consecutive_failures = max_consecutive_failures

    def __len__(self) -> int:
        return len(self.dataset)

    def path(self, index: int) -> str:
        return self.dataset.path(index)

    def __getitem__(self, index: int) -> tuple[Image.Image, int, bool]:
        return self.load(index)

    def load(self, index: int, transform: Callable[[Image.Image], Any] | None = None) -> tuple[Any, int, bool]:
        """``(transform(image), label, replaced)``. With a transform the image comes from
        ``open_item`` (maybe not decoded yet) and the transform runs inside the bad-file handling,
        so a file that only fails while being decoded there is replaced too."""
        n = len(self.dataset)
        if not -n <= index < n:  # before the try: a bad index is a bug, not a bad file
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        tries = min(self.max_consecutive_failures, n)
        for k in range(tries):
            j = (index + k) % n
            try:
                if transform is None:
                    out, label = self.dataset[j]
                else:
                    img, label = open_item(self.dataset, j)
                    out = transform(img)
            except (
                Exception
            ) as e:  # any decoder error: PIL raises OSError, ValueError, SyntaxError...
                logger.warning(
                    "unreadable image %s (%s: %s); using the next one instead",
                    self.dataset.path(j),
                    type(e).__name__,
                    e,
                )
                continue
            return out, label, k > 0
        raise RuntimeError(
            f"{tries} consecutive images could not be read, from {self.dataset.path(index)}; "
            "the data is probably broken (see the warnings above for the reasons)"
        )
