"""Image datasets: folders, file lists, their concatenation, and a wrapper that survives bad files.

Every dataset maps ``dataset[i] -> (PIL RGB image, int label)`` (label -1 when unknown) and
names its items with ``path(i)`` for messages. File-backed ones also have ``open(i)``: the same
pair with the image opened but not decoded, so a transform can choose the decoding scale
(JPEG draft mode); ``open_item`` falls back to ``dataset[i]`` for the others. Problems with the data location itself (missing
folder, empty list, too many missing listed files) raise at construction, so nothing starts
training on a typo.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, make_dataset

logger = logging.getLogger("swav")

UNLABELLED = -1

# What decoding a bad file raises, and only that: anything else goes through the bad-file
# handling untouched, above all the training loop's stop request (its SIGTERM handler raises
# in whatever code is running, decoding included), KeyboardInterrupt and programming errors.
# PIL is the only decoder (transforms.py decodes with it too). OSError: missing, unreadable or
# truncated files, UnidentifiedImageError; SyntaxError, ValueError, EOFError, struct.error and
# zlib.error: malformed headers and streams, depending on the plugin; DecompressionBombError:
# an absurd pixel count.
DECODE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

# Listed files named in a message about missing ones: enough to see the pattern.
_EXAMPLES = 3


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a 16-bit integer or float image scaled to 0..255 by their range.

    Integer modes use the 16-bit range, so 65535 is white and a dark photo stays dark: I;16*,
    and I, PIL's mode for 16-bit PGMs (scaled to 0..65535), 32-bit integer TIFFs and, in older
    Pillow versions, 16-bit PNGs. An I image with values outside 0..65535 is stretched from its
    minimum to its maximum. Float images (F) within [0, 1] use that range, the usual
    convention; others are stretched from their finite minimum to their maximum, as a viewer
    shows them (NaN and infinities become black).
    """
    x = values.astype(np.float64)
    if mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        finite = x[np.isfinite(x)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "I" and lo >= 0.0 and hi <= 65535.0:
            lo, hi = 0.0, 65535.0
        elif mode == "F" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
    scaled = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.rint(np.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0)).clip(0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (decoded) in 8-bit RGB.

    PIL's convert("RGB") clips 16-bit and float grey levels to 0..255, which turns a 16-bit
    photo white and a float one black: those are scaled by their range first (``_to_uint8``).
    PIL already reads 16-bit RGB(A) and grey-with-alpha PNGs as 8-bit RGB(A).
    """
    if img.mode == "RGB":
        return img  # convert() copies even when the mode already matches
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img), img.mode), "L")
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Decode an image file fully (so a corrupt file fails here) and return it in RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


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


def _files_in(folder: str) -> frozenset[str]:
    """Names of the files in ``folder``; none when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return frozenset(e.name for e in it if e.is_file())
    except OSError:  # missing, or not listable: os.path.isfile decides for its entries
        return frozenset()


def missing_files(paths: Sequence[str]) -> list[str]:
    """The ``paths`` that are not existing files, in order.

    One listing per parent folder rather than one stat per path: on a network file system a
    stat is a round trip, and a million images usually sit in a few thousand folders. What the
    listings do not show is confirmed with os.path.isfile (case-insensitive file systems,
    folders that can be entered but not listed).
    """
    listings: dict[str, frozenset[str]] = {}
    candidates = []
    for p in paths:
        folder, sep, name = p.rpartition(os.sep)
        files = listings.get(folder)
        if files is None:
            files = listings[folder] = _files_in(folder or sep or ".")
        if name not in files:
            candidates.append(p)
    return [p for p in candidates if not os.path.isfile(p)]


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
            # Never pickle: unpickling an object array can run any code from the file.
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            if "allow_pickle" not in str(e):  # damaged, not pickled: numpy's message says it
                raise ValueError(f"{path}: {e}") from None
            raise ValueError(
                f"{path}: refusing to load it: it holds pickled Python objects (an object array), "
                "and unpickling them could run code from the file. Save the list as a fixed-width "
                "string array, np.save(path, np.array(paths, dtype=str)) (dtype '<U...'), or as "
                "a .txt list"
            ) from None
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

    Relative paths are resolved against the list file's folder; missing labels are -1. Every
    listed file is checked at construction: when more than ``max_missing_fraction`` of them
    are missing (a wrong base folder, a half-copied data set) it raises FileNotFoundError;
    fewer are named in one warning and replaced at loading like unreadable files (``missing``).
    """

    def __init__(self, path: str, max_missing_fraction: float = 0.01) -> None:
        if not 0.0 <= max_missing_fraction <= 1.0:
            raise ValueError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")
        p = Path(path).expanduser()
        if not p.is_file():
            what = "is a folder; use the disk_folder source" if p.is_dir() else "does not exist"
            raise FileNotFoundError(f"image list {path!r} {what}")
        if p.suffix not in (".txt", ".npy"):
            raise ValueError(f"image list {path!r} must be a .txt or .npy file")
        base = p.resolve().parent
        self.list_path = str(p)
        # os.path.join, not pathlib: a fifth of the time (pathlib takes 10 s for a million entries).
        folder = str(base)
        self.samples = [(os.path.join(folder, os.path.expanduser(f)), label) for f, label in _read_list(p)]
        if not self.samples:
            raise ValueError(f"image list {path!r} is empty")
        self.missing = self._check_files(base, max_missing_fraction)

    def _check_files(self, base: Path, max_missing_fraction: float) -> list[str]:
        """The listed files that do not exist; raises when there are too many to train on."""
        missing = missing_files([f for f, _ in self.samples])
        if not missing:
            return missing
        n = len(self.samples)
        examples = ", ".join(repr(f) for f in missing[:_EXAMPLES])
        where = f"relative paths are resolved against {str(base)!r}"
        if len(missing) == n:
            raise FileNotFoundError(
                f"none of the {n} images listed in {self.list_path!r} exist, e.g. {examples} ({where})"
            )
        if len(missing) > max_missing_fraction * n:
            raise FileNotFoundError(
                f"{len(missing)} of the {n} images listed in {self.list_path!r} do not exist "
                f"({len(missing) / n:.2%}), more than max_missing_fraction={max_missing_fraction:g} "
                f"(DATA.MAX_MISSING_FRACTION) allows; e.g. {examples} ({where})"
            )
        logger.warning(
            "%d of the %d images listed in %s do not exist, e.g. %s; each is replaced by another "
            "image and counted",
            len(missing), n, self.list_path, examples,
        )
        return missing


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

    def load(
        self,
        index: int,
        transform: Callable[[Image.Image], Any] | None = None,
        console: bool = True,
    ) -> tuple[Any, int, bool]:
        """``(transform(image), label, replaced)``. With a transform the image comes from
        ``open_item`` (maybe not decoded yet) and the transform runs inside the bad-file handling,
        so a file that only fails while being decoded there is replaced too.

        Each replaced file gets a warning line; ``console=False`` keeps it out of the console
        (log.txt still has it), for callers that count ``replaced`` and report the total.
        """
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
            except DECODE_ERRORS as e:
                logger.warning(
                    "unreadable image %s (%s: %s); using the next one instead",
                    self.dataset.path(j),
                    type(e).__name__,
                    e,
                    extra={"console": console},
                )
                continue
            return out, label, k > 0
        raise RuntimeError(
            f"{tries} consecutive images could not be read, from {self.dataset.path(index)}; "
            "the data is probably broken (log.txt names each file and its error)"
        )
