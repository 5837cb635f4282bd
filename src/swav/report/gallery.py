"""The cluster gallery: training images scored against the prototypes of a trained model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from swav import checkpoint
from swav.build import build_dataset_from, build_model, normalizes_prototypes
from swav.config import ConfigError


class GallerySkipped(Exception):
    """The gallery cannot be made for a reason the page states (no checkpoint, data gone, ...)."""


def prototype_usage(assignments: np.ndarray | Tensor, num_prototypes: int) -> np.ndarray:
    """How many images each prototype is the argmax of: counts ``[num_prototypes]``."""
    a = np.asarray(assignments, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < 0 or a.max() >= num_prototypes):
        raise ValueError(
            f"assignments must lie in [0, {num_prototypes}), got [{a.min()}, {a.max()}]"
        )
    return np.bincount(a, minlength=num_prototypes)


def usage_stats(counts: np.ndarray) -> dict:
    """Images, used prototypes, usage entropy (nats) and its exponential, the effective number
    of prototypes: K for perfectly uniform usage, 1 for a full collapse."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    p = counts[counts > 0] / max(total, 1.0)
    entropy = max(0.0, float(-(p * np.log(p)).sum()))  # max: no "-0.0" for one prototype
    return {
        "images": int(total),
        "prototypes": int(counts.size),
        "used": int((counts > 0).sum()),
        "entropy": entropy,
        "max_entropy": math.log(counts.size) if counts.size else 0.0,
        "effective": math.exp(entropy),
    }


def sample_indices(dataset_size: int, num_images: int, seed: int = 0) -> np.ndarray:
    """A fixed random subset (sorted), the same for every report of the same data."""
    rng = np.random.default_rng(seed)
    n = min(num_images, dataset_size)
    return np.sort(rng.choice(dataset_size, size=n, replace=False))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The evaluation view of an image: as swav.eval's kNN transform (resize the shorter side to
    size / 0.875 when larger, else to size; then a centre crop), so the gallery shows what kNN sees."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    short = int(size / 0.875) if min(width, height) > size else size
    scale = short / min(width, height)
    resized = image.resize(
        (max(short, round(width * scale)), max(short, round(height * scale))), Image.BILINEAR
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def train_image_size(cfg: DictConfig) -> int:
    """The large crop size of the training (first ImgPilToMultiCrop resolution)."""
    return int(cfg.DATA.TRAIN.TRANSFORMS[0].size_crops[0])


def train_normalization(cfg: DictConfig) -> tuple[list[float], list[float]] | None:
    for spec in cfg.DATA.TRAIN.TRANSFORMS:
        if spec.get("name") == "Normalize":
            return list(spec.mean), list(spec.std)
    return None


class _Images:
    """Sampled dataset items as model inputs: ``i -> (tensor [3, S, S], label)``."""

    def __init__(self, dataset, indices: np.ndarray, size: int, normalization) -> None:
        self.dataset, self.indices, self.size = dataset, indices, size
        self.mean = self.std = None
        if normalization is not None:
            self.mean = torch.tensor(normalization[0]).view(3, 1, 1)
            self.std = torch.tensor(normalization[1]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[int(self.indices[i])][:2]
        crop = np.asarray(center_crop(image.convert("RGB"), self.size), dtype=np.float32) / 255.0
        x = torch.from_numpy(crop).permute(2, 0, 1).contiguous()
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x, int(label)


@torch.no_grad()
def prototype_scores(
    model: nn.Module, loader, device: torch.device, normalize_prototypes: bool
) -> tuple[Tensor, Tensor]:
    """Scores ``[N, K]`` of the first prototype set (cosine similarities when both the embedding
    and the prototypes are L2-normalised, as in training) and labels ``[N]``."""
    model.eval()
    if normalize_prototypes:
        # Training normalises before each forward pass, so the saved prototypes are one step off the sphere.
        model.normalize_prototypes()
    scores, labels = [], []
    for x, y in loader:
        _, out = model(x.to(device))
        scores.append(out[0].float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.long))
    return torch.cat(scores), torch.cat(labels)


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in (checkpoint.FINAL_NAME, checkpoint.CHECKPOINT_NAME):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def load_trained_model(cfg: DictConfig, run_dir: Path) -> tuple[nn.Module, str]:
    """The run's model with its latest weights, and a description of the checkpoint used."""
    path = find_checkpoint(run_dir)
    if path is None:
        raise GallerySkipped(
            f"no checkpoint in the run folder ({checkpoint.FINAL_NAME} or {checkpoint.CHECKPOINT_NAME}): "
            "the gallery needs the trained model"
        )
    try:
        state = checkpoint.load(path)
    except RuntimeError as e:
        raise GallerySkipped(str(e)) from e
    try:
        model = build_model(cfg)
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, NotImplementedError, KeyError) as e:
        raise GallerySkipped(
            f"{path.name} does not fit the model of {run_dir / 'train_config.yaml'}: {e}"
        ) from e
    what = f"{path.name}, iteration {state.get('iteration', '?')}"
    if path.name == checkpoint.CHECKPOINT_NAME:
        what += " (no final checkpoint: training unfinished or stopped)"
    return model, what


@dataclass
class GalleryData:
    indices: np.ndarray  # dataset index of each sampled image
    scores: Tensor  # [N, K]
    labels: Tensor  # [N], -1 when unknown
    assignments: np.ndarray  # [N] argmax prototype
    counts: np.ndarray  # [K] images per prototype
    class_names: list[str] | None
    checkpoint: str
    image_size: int
    num_prototype_sets: int


def compute_gallery(
    cfg: DictConfig,
    run_dir: Path,
    num_images: int,
    image_size: int | None = None,
    batch_size: int = 128,
    seed: int = 0,
) -> tuple[GalleryData, object]:
    """Score a fixed sample of DATA.TRAIN against the prototypes; returns the data and the dataset
    (for thumbnails). Raises GallerySkipped when the model or the images are not available."""
    model, what = load_trained_model(cfg, run_dir)
    if not model.prototype_weights():
        raise GallerySkipped(
            f"the model has no prototypes (LOSS.name={cfg.LOSS.name}): there are no clusters to show"
        )
    data = cfg.DATA.TRAIN
    try:
        dataset = build_dataset_from(cfg, data.DATA_SOURCES, data.DATA_PATHS, data.DATA_LIMIT)
    except ConfigError as e:
        raise GallerySkipped(f"the training images are not available any more: {e}") from e
    size = image_size or train_image_size(cfg)
    indices = sample_indices(len(dataset), num_images, seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    loader = DataLoader(
        _Images(dataset, indices, size, train_normalization(cfg)),
        batch_size=batch_size,
        num_workers=int(cfg.DATA.NUM_DATALOADER_WORKERS),
    )
    scores, labels = prototype_scores(
        model, loader, device, normalizes_prototypes(cfg)
    )
    assignments = scores.argmax(dim=1).numpy()
    num_sets = len(OmegaConf.to_container(cfg.MODEL.HEAD.PARAMS)[0][1].get("num_clusters", [0]))
    gallery = GalleryData(
        indices=indices,
        scores=scores,
        labels=labels,
        assignments=assignments,
        counts=prototype_usage(assignments, scores.shape[1]),
        class_names=_class_names(dataset),
        checkpoint=what,
        image_size=size,
        num_prototype_sets=num_sets,
    )
    return gallery, dataset


def most_used(counts: np.ndarray, n: int) -> list[int]:
    """The `n` prototypes with most images (ties by index), only those used at all."""
    order = np.lexsort((np.arange(len(counts)), -np.asarray(counts)))
    return [int(p) for p in order[:n] if counts[p] > 0]


def top_images(scores: Tensor, prototype: int, n: int) -> list[int]:
    """Sample positions of the `n` images that score highest for `prototype`."""
    column = scores[:, prototype]
    return column.topk(min(n, column.numel())).indices.tolist()


def majority_label(
    labels: Tensor, assignments: np.ndarray, prototype: int
) -> tuple[int, float] | None:
    """(label, share) of the commonest known label among the images assigned to `prototype`."""
    mine = labels[torch.from_numpy(assignments == prototype)]
    mine = mine[mine >= 0]
    if mine.numel() == 0:
        return None
    values, counts = mine.unique(return_counts=True)
    best = int(counts.argmax())
    return int(values[best]), float(counts[best]) / mine.numel()


def _class_names(dataset) -> list[str] | None:
    """`classes` of the (single) underlying dataset, through the wrappers; None when unlabelled."""
    seen = dataset
    for _ in range(5):
        names = getattr(seen, "classes", None)
        if names:
            return list(names)
        seen = getattr(seen, "dataset", None)
        if seen is None:
            return None
    return None
