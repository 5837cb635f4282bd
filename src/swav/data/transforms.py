"""Multi-crop augmentation with explicit randomness (DESIGN decision 9).

``build_transforms(specs)`` turns the config's transform list (VISSL names) into a
``MultiCropTransform``: ``ImgPilToMultiCrop`` cuts the crops, every following transform applies to
each crop in order. All random numbers come from the generator passed in, never from torch's,
Python's or numpy's global state: crop ``c`` of a sample uses row ``c`` of one fixed-size draw,
so the crops are a pure function of the generator's seed, whatever the worker or loading order.
Each transform consumes the same count of numbers whether or not it fires, for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range
_CROP_ATTEMPTS = 10  # as torchvision: then fall back to a centre crop


def _prob(name: str, key: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}.{key} must be in [0, 1], got {p}")
    return float(p)


def random_resized_crop_box(
    width: int, height: int, scale: Sequence[float], u: Sequence[float]
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of RandomResizedCrop, drawn from ``4 * _CROP_ATTEMPTS`` uniforms ``u``."""
    area = width * height
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for a in range(_CROP_ATTEMPTS):
        u_area, u_ratio, u_top, u_left = u[4 * a : 4 * a + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        ratio = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif in_ratio > _RATIO[1]:
        w, h = round(height * _RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class RandomHorizontalFlip:
    num_random = 1

    def __init__(self, p: float = 0.5) -> None:
        self.p = _prob("RandomHorizontalFlip", "p", p)

    def __call__(self, img, u: Sequence[float]):
        if u[0] >= self.p:
            return img
        if isinstance(img, Tensor):
            return img.flip(-1)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class ImgPilColorDistortion:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) in random order with p 0.8, then grayscale with p 0.2."""

    num_random = 10  # apply, 4 for the order, 4 factors, grayscale

    def __init__(self, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 2.5:  # hue = 0.2 s must stay within [0, 0.5]
            raise ValueError(f"ImgPilColorDistortion.strength must be in [0, 2.5], got {strength}")
        self.strength = float(strength)
        s = 0.8 * self.strength
        # (adjust function, low, high); identity factor 1 (hue 0) when the range is empty.
        self._ops = (
            (F.adjust_brightness, max(0.0, 1.0 - s), 1.0 + s),
            (F.adjust_contrast, max(0.0, 1.0 - s), 1.0 + s),
            (F.adjust_saturation, max(0.0, 1.0 - s), 1.0 + s),
            (F.adjust_hue, -0.2 * self.strength, 0.2 * self.strength),
        )

    def __call__(self, img: Image.Image, u: Sequence[float]) -> Image.Image:
        if u[0] < 0.8 and self.strength > 0:
            order = sorted(range(4), key=lambda k: u[1 + k])  # a uniform random permutation
            for k in order:
                fn, lo, hi = self._ops[k]
                img = fn(img, lo + (hi - lo) * u[5 + k])
        if u[9] < 0.2:
            img = img.convert("L").convert("RGB")
        return img


class ImgPilGaussianBlur:
    """PIL Gaussian blur with probability p, radius ~ U(radius_min, radius_max)."""

    num_random = 2

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = _prob("ImgPilGaussianBlur", "p", p)
        if not 0.0 <= radius_min <= radius_max:
            raise ValueError(
                f"ImgPilGaussianBlur needs 0 <= radius_min <= radius_max, got {radius_min}, {radius_max}"
            )
        self.radius_min, self.radius_max = float(radius_min), float(radius_max)

    def __call__(self, img: Image.Image, u: Sequence[float]) -> Image.Image:
        if u[0] >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * u[1]
        return img.filter(ImageFilter.GaussianBlur(radius))


class ToTensor:
    """PIL RGB -> float tensor [3, H, W] in [0, 1] (as torchvision's ToTensor)."""

    num_random = 0

    def __call__(self, img: Image.Image, u: Sequence[float]) -> Tensor:
        hwc = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        # One pass: transpose to CHW and convert to float together.
        chw = hwc.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        return chw.mul_(1.0 / 255.0)


class Normalize:
    num_random = 0

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"Normalize needs 3 means and 3 positive stds, got {mean}, {std}")
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, x: Tensor, u: Sequence[float]) -> Tensor:
        # In place: the tensor comes fresh from ToTensor.
        return x.sub_(self._mean).mul_(self._inv_std)


_PER_CROP = {
    "RandomHorizontalFlip": RandomHorizontalFlip,
    "ImgPilColorDistortion": ImgPilColorDistortion,
    "ImgPilGaussianBlur": ImgPilGaussianBlur,
    "ToTensor": ToTensor,
    "Normalize": Normalize,
}
_KEYS = {
    "ImgPilToMultiCrop": {"total_num_crops", "num_crops", "size_crops", "crop_scales"},
    "RandomHorizontalFlip": {"p"},
    "ImgPilColorDistortion": {"strength"},
    "ImgPilGaussianBlur": {"p", "radius_min", "radius_max"},
    "ToTensor": set(),
    "Normalize": {"mean", "std"},
}
_PIL_ONLY = {"ImgPilColorDistortion", "ImgPilGaussianBlur"}
TRANSFORM_NAMES = tuple(_KEYS)


class MultiCropTransform:
    """``transform(img, generator) -> [crop tensors]``: RandomResizedCrop per crop, then ``ops``.

    Crops are ordered as ``num_crops`` (the large ones first, as the loss expects).
    """

    def __init__(
        self,
        num_crops: Sequence[int],
        size_crops: Sequence[int],
        crop_scales: Sequence[Sequence[float]],
        ops: Sequence,
    ) -> None:
        self.num_crops = [int(n) for n in num_crops]
        self.size_crops = [int(s) for s in size_crops]
        self.crop_scales = [(float(lo), float(hi)) for lo, hi in crop_scales]
        self.ops = list(ops)
        self.size_crops_per_crop = [
            s for n, s in zip(self.num_crops, self.size_crops, strict=True) for _ in range(n)
        ]
        self._scale_per_crop = [
            c for n, c in zip(self.num_crops, self.crop_scales, strict=True) for _ in range(n)
        ]
        self._num_random = 4 * _CROP_ATTEMPTS + sum(op.num_random for op in self.ops)

    @property
    def total_num_crops(self) -> int:
        return len(self.size_crops_per_crop)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> list[Tensor]:
        # One draw for the whole sample; row c is crop c's randomness. float64 so that integer
        # positions from u * range are unbiased for any image size.
        draws = torch.rand(
            (self.total_num_crops, self._num_random), generator=generator, dtype=torch.float64
        ).tolist()
        width, height = img.size
        crops = []
        for size, scale, u in zip(
            self.size_crops_per_crop, self._scale_per_crop, draws, strict=True
        ):
            left, top, w, h = random_resized_crop_box(width, height, scale, u)
            # resize with a box crops and resamples in one pass (no intermediate crop copy).
            x = img.resize(
                (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
            )
            pos = 4 * _CROP_ATTEMPTS
            for op in self.ops:
                x = op(x, u[pos : pos + op.num_random])
                pos += op.num_random
            crops.append(x)
        return crops

    def __repr__(self) -> str:
        ops = ", ".join(type(op).__name__ for op in self.ops)
        return (
            f"MultiCropTransform(num_crops={self.num_crops}, size_crops={self.size_crops}, "
            f"crop_scales={self.crop_scales}, ops=[{ops}])"
        )


def _check_keys(name: str, spec: dict) -> dict:
    args = {k: v for k, v in spec.items() if k != "name"}
    unknown = sorted(set(args) - _KEYS[name])
    if unknown:
        allowed = ", ".join(sorted(_KEYS[name])) or "none"
        raise ValueError(
            f"transform {name}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}"
        )
    return args


def _multicrop_args(args: dict) -> tuple[list[int], list[int], list[list[float]]]:
    missing = sorted({"num_crops", "size_crops", "crop_scales"} - set(args))
    if missing:
        raise ValueError(f"transform ImgPilToMultiCrop: missing key(s) {', '.join(missing)}")
    num_crops, size_crops, scales = (
        list(args["num_crops"]),
        list(args["size_crops"]),
        list(args["crop_scales"]),
    )
    if not (len(num_crops) == len(size_crops) == len(scales)) or not num_crops:
        raise ValueError(
            "ImgPilToMultiCrop: num_crops, size_crops and crop_scales need one entry per crop "
            f"group, got {len(num_crops)}, {len(size_crops)}, {len(scales)}"
        )
    total = args.get("total_num_crops", sum(num_crops))
    if total != sum(num_crops):
        raise ValueError(
            f"ImgPilToMultiCrop: total_num_crops={total} but sum(num_crops)={sum(num_crops)} ({num_crops})"
        )
    if any(int(n) < 0 for n in num_crops) or sum(num_crops) == 0:
        raise ValueError(
            f"ImgPilToMultiCrop: num_crops must be >= 0 with at least one crop, got {num_crops}"
        )
    if any(int(s) <= 0 for s in size_crops):
        raise ValueError(f"ImgPilToMultiCrop: size_crops must be positive, got {size_crops}")
    for sc in scales:
        if len(sc) != 2 or not 0.0 < sc[0] <= sc[1]:
            raise ValueError(
                f"ImgPilToMultiCrop: each crop_scales entry must be [low, high] with 0 < low <= high, got {sc}"
            )
    return num_crops, size_crops, scales


def build_transforms(specs: list[dict]) -> MultiCropTransform:
    """The config's ``TRANSFORMS`` list -> MultiCropTransform; raises ValueError on bad specs."""
    if not specs or specs[0].get("name") != "ImgPilToMultiCrop":
        first = specs[0].get("name") if specs else "nothing"
        raise ValueError(f"the transforms must start with ImgPilToMultiCrop, got {first}")
    for spec in specs:
        name = spec.get("name")
        if name not in _KEYS:
            raise ValueError(f"unknown transform {name!r}; allowed: {', '.join(TRANSFORM_NAMES)}")
    num_crops, size_crops, scales = _multicrop_args(_check_keys("ImgPilToMultiCrop", specs[0]))

    ops, is_tensor = [], False
    for spec in specs[1:]:
        name = spec["name"]
        args = _check_keys(name, spec)
        if name == "ImgPilToMultiCrop":
            raise ValueError("ImgPilToMultiCrop may appear only once, first")
        if is_tensor and (name in _PIL_ONLY or name == "ToTensor"):
            raise ValueError(f"transform {name} works on PIL images: place it before ToTensor")
        if name == "Normalize" and not is_tensor:
            raise ValueError("Normalize works on tensors: place it after ToTensor")
        try:
            ops.append(_PER_CROP[name](**args))
        except TypeError as e:  # a required argument is missing
            raise ValueError(f"transform {name}: {e}") from None
        is_tensor = is_tensor or name == "ToTensor"
    if not is_tensor:
        raise ValueError("the transforms must include ToTensor (the model takes tensors)")
    return MultiCropTransform(num_crops, size_crops, scales, ops)
