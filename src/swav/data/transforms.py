"""Multi-crop augmentation with explicit randomness (the paper's crops, flip, colour and blur).

``build_transforms(specs)`` turns the config's transform list (VISSL names) into a
``MultiCropTransform``: ``ImgPilToMultiCrop`` cuts the crops, every following transform applies to
each crop in order. All random numbers come from the generator passed in, never from torch's,
Python's or numpy's global state: crop ``c`` of a sample uses row ``c`` of one fixed-size draw,
so the crops are a pure function of the generator's seed, whatever the worker or loading order.
Each transform consumes the same count of numbers whether or not it fires, for the same reason.

Speed (benchmarks/data_pipeline.py): the image is decoded once for all crops, in JPEG draft mode
(DCT scaling by 2, 4 or 8) when every crop box still has at least its output size at the reduced
scale; each crop is cut from the uint8 pixels and resized by torch's antialiased bilinear
kernel (as torchvision's RandomResizedCrop: crop, then resize; 3x faster than PIL's), then turned
into a float tensor in [0, 1], and the colour, blur and normalisation steps run on that small
tensor (the VISSL names ``ImgPil*`` stay for the config; the maths is PIL's, without rounding to
8 bits between steps).

The same ops run on the training device for ``DATA.TRAIN.GPU_AUGMENT`` (``augment_batch``): the
loader then only decodes and cuts the crops (uint8, a quarter of the bytes to send), and every
choice an op makes (which images flip, the colour factors, the blur widths) is still computed on
the host from the sample's draws, so nothing waits for the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor

from swav.data.datasets import to_rgb

_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range
_CROP_ATTEMPTS = 10  # as torchvision: then fall back to a centre crop
_DRAFT_SCALES = (8, 4, 2)  # the JPEG decoder's DCT scalings
# ITU-R 601-2 luma, as PIL's convert("L") and so torchvision's contrast, saturation and grayscale.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_HUE_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)  # n in the HSV -> RGB formula, for R, G, B


def _on(constant: Tensor, x: Tensor) -> Tensor:
    """A module constant (never freed, so its id stays its own) on ``x``'s device and dtype
    (itself on the CPU in float32), cached."""
    key = (x.device, x.dtype)
    cache = _ON_DEVICE.setdefault(id(constant), {})
    if key not in cache:
        cache[key] = constant.to(device=x.device, dtype=x.dtype, non_blocking=True)  # a blocking copy would sync
    return cache[key]


_ON_DEVICE: dict[int, dict] = {}


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


def _corners(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    left, top, w, h = box
    return left, top, left + w, top + h


def draft_scale(boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[int]) -> int:
    """The largest JPEG draft scale (1, 2, 4 or 8) at which every crop box still has at least
    its output size in both directions, so decoding smaller never lowers a crop's resolution."""
    room = min(min(w, h) / size for (_, _, w, h), size in zip(boxes, sizes, strict=True))
    return next((s for s in _DRAFT_SCALES if s <= room), 1)


def decode_for_crops(
    img: Image.Image, boxes: Sequence[tuple[int, int, int, int]], sizes: Sequence[int]
) -> tuple[Image.Image, float]:
    """Decode ``img`` (if not yet done) as small as the crops allow; returns the RGB image and the
    factor by which its coordinates shrank (1.0 without draft mode)."""
    width, height = img.size
    scale = draft_scale(boxes, sizes)
    drafted = img.draft("RGB", (width // scale, height // scale)) if scale > 1 else None
    img.load()  # a corrupt file fails here, inside the dataset's bad-file handling
    img = to_rgb(img)  # 16-bit and float images scaled by their range, not clipped
    # draft() reports the original extent in the new coordinates; its scale may be smaller than
    # asked (or 1 for a non-JPEG), never larger.
    return img, (width / drafted[1][2] if drafted else 1.0)


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

    def batch(self, x: Tensor, u: Tensor) -> Tensor:
        rows = _rows(u[:, 0] < self.p)
        if len(rows):
            at = _at(rows, x)
            x[at] = x[at].flip(-1)
        return x


def _rows(mask: Tensor) -> Tensor:
    """The rows where a mask of the host-side draws is set (on the host: no device sync)."""
    return mask.nonzero().squeeze(1)


def _at(rows: Tensor, x: Tensor) -> Tensor:
    """Host rows as an index into ``x`` (copied to its device; a few bytes, no sync)."""
    return rows if rows.device == x.device else rows.to(x.device, non_blocking=True)


def _per_image(factor: float | Tensor, x: Tensor, image_dims: int = 3) -> float | Tensor:
    """A float as it is; one factor per image ([N]) shaped to broadcast over [N, 3, H, W]
    (``image_dims`` 3) or [N, H, W] (2), in ``x``'s dtype."""
    if not isinstance(factor, Tensor):
        return factor
    return factor.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, *([1] * image_dims))


# The colour functions take one image [3, H, W] with a float factor, or a batch [N, 3, H, W] with
# a float or one factor per image ([N]): a batch of 32-px crops costs about what one crop does in
# ~40 small tensor operations, so the loader colours a whole batch at once.


def _luma(x: Tensor) -> Tensor:
    """[..., 3, H, W] -> [..., H, W] grey levels."""
    flat = x.reshape(*x.shape[:-3], 3, -1)
    return torch.matmul(_on(_LUMA, x), flat).view(*x.shape[:-3], *x.shape[-2:])  # tensordot costs more in Python


def adjust_brightness(x: Tensor, factor: float | Tensor) -> Tensor:
    """Scale towards black; ``x`` float in [0, 1], changed in place."""
    return x.mul_(_per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: float | Tensor) -> Tensor:
    """Blend with the image's mean grey level (in place)."""
    mean = (x.mean(dim=(-2, -1)) @ _on(_LUMA, x))[..., None, None, None]  # one per image
    f = _per_image(factor, x)
    return x.mul_(f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: float | Tensor) -> Tensor:
    """Blend with the pixel's own grey level (in place)."""
    grey = _luma(x).mul_(1.0 - _per_image(factor, x, 2)).unsqueeze(-3)
    return x.mul_(_per_image(factor, x)).add_(grey).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, shift: float | Tensor) -> Tensor:
    """Rotate the HSV hue by ``shift`` turns (in [-0.5, 0.5]); value and saturation stay.

    Exact HSV in float (PIL's path rounds H, S and V to 8 bits): with M, m the largest and
    smallest channel, C = M - m and h the hue in sixths of a turn, channel n of the result is
    M - C * clamp(2 - |k - 2|, 0, 1), k = (h + n) mod 6, n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x.unbind(-3)
    big, small = x.amax(dim=-3), x.amin(dim=-3)
    chroma = big - small
    # hue * chroma: g - b where red is largest, else b - r + 2C where green is, else r - g + 4C
    # (ties to red, then green, as colorsys and PIL). Float masks: torch.where is 3x slower here.
    is_r = (big == r).to(x.dtype)
    is_g = (big == g).to(x.dtype).sub_(is_r).clamp_(min=0.0)
    hue = (r - g).add_(chroma, alpha=4.0)
    hue.addcmul_(is_g, (b - r).add_(chroma, alpha=2.0).sub_(hue))
    hue.addcmul_(is_r, (g - b).sub_(hue))
    hue.div_(chroma.clamp_min(1e-12))  # grey pixels: the numerator is 0
    hue.add_(6.0 * _per_image(shift, x, 2) + 12.0)  # > 0, so the floor below is the modulo
    k = hue.unsqueeze(-3) + _on(_HUE_OFFSETS, x)
    k.sub_(torch.floor(k * (1.0 / 6.0)), alpha=6.0)
    k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return k.mul_(chroma.neg_().unsqueeze(-3)).add_(big.unsqueeze(-3))


def to_grayscale(x: Tensor) -> Tensor:
    return _luma(x).unsqueeze(-3).expand_as(x).contiguous()


def gaussian_kernel(sigma: float) -> list[float]:
    """Half of PIL's Gaussian kernel (taps 0, 1, ..., r) for standard deviation ``sigma``.

    PIL's GaussianBlur runs three box blurs of a fractional width whose variances add up to
    sigma^2 exactly (Gwosdek et al. 2011); their convolution is this kernel. A sampled Gaussian
    would blur much less than PIL for sigma < 1 (variance 0.008 instead of 0.09 at sigma 0.3).
    """
    var = sigma * sigma / 3.0  # per box
    n = math.floor((math.sqrt(12.0 * var + 1.0) - 1.0) / 2.0)  # integer part of the box radius
    a = (2 * n + 1) * (n * (n + 1) - 3.0 * var) / (6.0 * (var - (n + 1) ** 2))  # the fraction
    box = np.array([a, *([1.0] * (2 * n + 1)), a]) / (2 * n + 1 + 2 * a)
    kernel = np.convolve(np.convolve(box, box), box)
    half = kernel[len(kernel) // 2 :]
    half = half[: 1 + int(np.flatnonzero(half > 1e-4).max())]  # drop the ~0 tails ...
    return (half / (2.0 * half.sum() - half[0])).tolist()  # ... and keep the sum at 1


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """PIL's GaussianBlur(radius=sigma) on a float [3, H, W] tensor, as one separable kernel
    with edges replicated. Returns a new tensor (``x`` itself if sigma is 0)."""
    if sigma <= 0.0:
        return x
    w = gaussian_kernel(sigma)
    r = len(w) - 1
    height, width = x.shape[-2:]
    y = nnf.pad(x.unsqueeze(0), (r, r, r, r), mode="replicate").squeeze(0)
    # Shifted in-place adds with alpha: faster than conv1d/conv2d for 3 channels and <= 13
    # taps, and twice as fast as (a + b) * w, which makes temporaries.
    rows = y[:, :, r : r + width] * w[0]
    for i in range(1, r + 1):
        rows.add_(y[:, :, r - i : r - i + width], alpha=w[i]).add_(y[:, :, r + i : r + i + width], alpha=w[i])
    out = rows[:, r : r + height] * w[0]
    for i in range(1, r + 1):
        out.add_(rows[:, r - i : r - i + height], alpha=w[i]).add_(rows[:, r + i : r + i + height], alpha=w[i])
    return out


def gaussian_blur_batch(x: Tensor, sigmas: Sequence[float]) -> Tensor:
    """``gaussian_blur`` of each image of ``x`` [N, 3, H, W] with its own sigma, in one pass over the
    batch: the half-kernels are zero-padded to the widest (a zero tap adds nothing), so each tap is
    one multiply-add for all images. Equal to the one-image function within float rounding."""
    kernels = [gaussian_kernel(s) if s > 0.0 else [1.0] for s in sigmas]
    r = max(len(k) for k in kernels) - 1
    taps = torch.zeros(len(kernels), r + 1, dtype=torch.float64)
    for i, k in enumerate(kernels):
        taps[i, : len(k)] = torch.tensor(k, dtype=torch.float64)
    taps = taps.to(device=x.device, dtype=x.dtype, non_blocking=True)
    w = [taps[:, i].view(-1, 1, 1, 1) for i in range(r + 1)]
    height, width = x.shape[-2:]
    y = nnf.pad(x, (r, r, r, r), mode="replicate")
    rows = y[..., r : r + width] * w[0]
    for i in range(1, r + 1):
        rows.addcmul_(y[..., r - i : r - i + width], w[i]).addcmul_(y[..., r + i : r + i + width], w[i])
    out = rows[..., r : r + height, :] * w[0]
    for i in range(1, r + 1):
        out.addcmul_(rows[..., r - i : r - i + height, :], w[i]).addcmul_(rows[..., r + i : r + i + height, :], w[i])
    return out


class ImgPilColorDistortion:
    """ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) in random order with p 0.8, then grayscale with p 0.2.

    Works on float [3, H, W] tensors in [0, 1], clipped to [0, 1] after every step as PIL's
    8-bit images are.
    """

    num_random = 10  # apply, 4 for the order, 4 factors, grayscale

    def __init__(self, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 2.5:  # hue = 0.2 s must stay within [0, 0.5]
            raise ValueError(f"ImgPilColorDistortion.strength must be in [0, 2.5], got {strength}")
        self.strength = float(strength)
        s = 0.8 * self.strength
        # (adjust function, low, high); identity factor 1 (hue 0) when the range is empty.
        self._ops = (
            (adjust_brightness, max(0.0, 1.0 - s), 1.0 + s),
            (adjust_contrast, max(0.0, 1.0 - s), 1.0 + s),
            (adjust_saturation, max(0.0, 1.0 - s), 1.0 + s),
            (adjust_hue, -0.2 * self.strength, 0.2 * self.strength),
        )

    def __call__(self, x: Tensor, u: Sequence[float]) -> Tensor:
        if u[0] < 0.8 and self.strength > 0:
            order = sorted(range(4), key=lambda k: u[1 + k])  # a uniform random permutation
            for k in order:
                fn, lo, hi = self._ops[k]
                x = fn(x, lo + (hi - lo) * u[5 + k])
        if u[9] < 0.2:
            x = to_grayscale(x)
        return x

    def batch(self, x: Tensor, u: Tensor) -> Tensor:
        """``__call__`` on each image of ``x`` [N, 3, H, W] with its row of ``u`` [N, 10]:
        each of the 4 slots of the random order takes, op by op, the images that put it there."""
        if self.strength > 0:
            jitter = u[:, 0] < 0.8
            order = torch.argsort(u[:, 1:5], dim=1, stable=True)  # as sorted() above
            for slot in range(4):
                for k, (fn, lo, hi) in enumerate(self._ops):
                    rows = _rows(jitter & (order[:, slot] == k))
                    if len(rows):
                        at = _at(rows, x)
                        x[at] = fn(x[at], lo + (hi - lo) * u[rows, 5 + k])
        rows = _rows(u[:, 9] < 0.2)
        if len(rows):
            at = _at(rows, x)
            x[at] = to_grayscale(x[at])
        return x


class ImgPilGaussianBlur:
    """Gaussian blur with probability p, radius (standard deviation, in pixels) ~ U(radius_min, radius_max)."""

    num_random = 2

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.p = _prob("ImgPilGaussianBlur", "p", p)
        if not 0.0 <= radius_min <= radius_max:
            raise ValueError(
                f"ImgPilGaussianBlur needs 0 <= radius_min <= radius_max, got {radius_min}, {radius_max}"
            )
        self.radius_min, self.radius_max = float(radius_min), float(radius_max)

    def __call__(self, x: Tensor, u: Sequence[float]) -> Tensor:
        if u[0] >= self.p:
            return x
        return gaussian_blur(x, self.radius_min + (self.radius_max - self.radius_min) * u[1])

    def batch(self, x: Tensor, u: Tensor) -> Tensor:
        rows = _rows(u[:, 0] < self.p)
        if x.device.type == "cpu":
            # Each image has its own kernel width: one at a time, the fastest on a CPU.
            for i in rows.tolist():
                x[i] = self(x[i], u[i].tolist())
        elif len(rows):
            # On a GPU one image at a time is ~30 kernel launches each: the whole batch at once.
            sigmas = (self.radius_min + (self.radius_max - self.radius_min) * u[rows, 1]).tolist()
            at = _at(rows, x)
            x[at] = gaussian_blur_batch(x[at], sigmas)
        return x


def to_float_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> float tensor [3, H, W] in [0, 1] (torchvision's ToTensor)."""
    hwc = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    # One pass: transpose to CHW and convert to float together.
    chw = hwc.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    return chw.mul_(1.0 / 255.0)


class ToTensor:
    """Marks where the crop is a [0, 1] float tensor; crops are converted right after resampling
    (the ``ImgPil*`` steps run on tensors), so this converts only a PIL image it is given."""

    num_random = 0

    def __call__(self, img, u: Sequence[float]) -> Tensor:
        return img if isinstance(img, Tensor) else to_float_tensor(img)

    def batch(self, x: Tensor, u: Tensor) -> Tensor:
        return x


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
        # On the CPU in float32 .to() returns the tensors themselves; on a GPU it copies 24 bytes.
        mean = self._mean.to(device=x.device, dtype=x.dtype, non_blocking=True)
        inv_std = self._inv_std.to(device=x.device, dtype=x.dtype, non_blocking=True)
        return x.sub_(mean).mul_(inv_std)

    def batch(self, x: Tensor, u: Tensor) -> Tensor:
        return self(x, [])


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
        """Crops of ``img``; an image opened but not yet loaded (``Image.open``) is decoded here,
        in JPEG draft mode when that keeps every crop at or above its output size."""
        return self.augment([self.resample(img, generator)])[0]

    def augment(self, samples: Sequence[tuple[list[Tensor], Tensor]]) -> list[list[Tensor]]:
        """The ops on resampled crops (``resample``'s results), for many samples at once: crop c
        of every sample in one [N, 3, H, W] batch, each image with its own random numbers."""
        out = [[] for _ in samples]
        for c in range(self.total_num_crops):
            x = torch.stack([crops[c] for crops, _ in samples])
            u = torch.stack([draws[c] for _, draws in samples])
            for crops, crop in zip(out, self._ops_on(x, u).unbind(0), strict=True):
                crops.append(crop)
        return out

    def augment_batch(self, crops: Sequence[Tensor], draws: Tensor, which: Sequence[int] | None = None) -> list[Tensor]:
        """``augment`` on a collated batch, on whatever device its crops are: ``crops[j]`` is crop
        ``which[j]`` (all crops in order by default) of N images, [N, 3, H, W] uint8 or float;
        ``draws`` [N, total_num_crops, R] the samples' ops' random numbers, on the host."""
        which = range(self.total_num_crops) if which is None else which
        if draws is None:
            raise ValueError("augment_batch needs the batch's draws: a loader built with MultiCropDataset(augment=False)")
        if draws.device.type != "cpu":  # every choice is made from them on the host; on a GPU each would sync
            raise ValueError(f"the draws must stay on the CPU, got them on {draws.device}")
        if len(crops) != len(which) or draws.shape[1] != self.total_num_crops:
            raise ValueError(f"{len(crops)} crop batches for crops {list(which)}, draws for {draws.shape[1]} crops")
        return [self._ops_on(x, draws[:, c]) for x, c in zip(crops, which, strict=True)]

    def _ops_on(self, x: Tensor, u: Tensor) -> Tensor:
        if x.dtype == torch.uint8:  # as resample() converts: the same float values
            x = x.to(torch.float32).mul_(1.0 / 255.0)
        pos = 0
        for op in self.ops:
            x = op.batch(x, u[:, pos : pos + op.num_random])
            pos += op.num_random
        return x

    def resample(self, img: Image.Image, generator: torch.Generator,
                 as_uint8: bool = False) -> tuple[list[Tensor], Tensor]:
        """The crops cut and resized (float [3, size, size] in [0, 1], or the uint8 pixels they
        are made from, no op applied yet) and the ops' random numbers, one row per crop;
        ``augment`` finishes them."""
        # One draw for the whole sample; row c is crop c's randomness. float64 so that integer
        # positions from u * range are unbiased for any image size.
        random = torch.rand(
            (self.total_num_crops, self._num_random), generator=generator, dtype=torch.float64
        )
        draws = random.tolist()
        width, height = img.size  # from the header: no decoding yet
        boxes = [
            random_resized_crop_box(width, height, scale, u)
            for scale, u in zip(self._scale_per_crop, draws, strict=True)
        ]
        img, scale = decode_for_crops(img, boxes, self.size_crops_per_crop)
        # [1, 3, H, W] view of the HWC pixels: channels-last, the layout of torch's fast uint8
        # antialiased resize (3x PIL's speed on a 224-px crop, within rounding of PIL's result).
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None]
        crops = []
        for size, box in zip(self.size_crops_per_crop, boxes, strict=True):
            left, top, right, bottom = (round(v / scale) for v in _corners(box))
            x = nnf.interpolate(
                pixels[:, :, top:bottom, left:right],
                size=(size, size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            if as_uint8:
                crops.append(x.contiguous())
            else:
                crops.append(x.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0))
        return crops, random[:, 4 * _CROP_ATTEMPTS :]

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
