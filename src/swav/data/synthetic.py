"""Built-in procedural dataset of labelled shapes, for the quickstart and for tests.

Every image is drawn on the fly from ``(seed, split, index)`` alone, so all processes and
data-loader workers see the same pixels without any file. The class is the shape; colours,
background, position, scale, rotation, aspect, clutter and noise are random per image, so
colour statistics carry (almost) no class information and a random-init network scores low.

Measured on 5000 train / 1000 test images of 32 px (2 CPU cores): a random-init CIFAR ResNet-18
scores 27-32 % with weighted kNN (k=200, T=0.1; 3 inits), per-channel colour statistics
(mean, std, histograms) about 12 % (chance 10 %), and a small supervised CNN 100 % after 40 s.
"""

from __future__ import annotations

import colorsys
import functools
import zlib

import numpy as np
from PIL import Image

CLASS_NAMES: tuple[str, ...] = (
    "disc",
    "ring",
    "square_outline",
    "triangle",
    "cross",
    "star",
    "stripes",
    "checkerboard",
    "two_dots",
    "crescent",
)

_SUPERSAMPLE = 2  # masks are drawn at 2x and box-filtered (2x2): anti-aliased edges at 32 px
_TEXTURE_GRID = 5  # the background texture is smooth noise on a 5x5 grid, bilinearly upsampled


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``label`` in its own frame, where it spans about [-1, 1]^2."""
    name = CLASS_NAMES[label]
    if name == "disc":
        return u * u + v * v < 1.0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 < 1.0) & (r2 > 0.55**2)
    if name == "square_outline":
        m = np.maximum(np.abs(u), np.abs(v))
        return (m < 0.85) & (m > 0.52)
    if name == "triangle":
        # Equilateral, circumradius 1: inside the three half-planes whose normals are 120 deg apart.
        return (v < 0.5) & (0.866 * u - 0.5 * v < 0.5) & (-0.866 * u - 0.5 * v < 0.5)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au < 0.28) & (av < 0.95)) | ((av < 0.28) & (au < 0.95))
    if name == "star":
        # Radius alternates linearly between 1 (5 tips) and 0.4 with the polar angle.
        phase = np.arctan2(v, u) * (5.0 / (2.0 * np.pi)) % 1.0
        return np.sqrt(u * u + v * v) < 0.4 + 1.2 * np.abs(phase - 0.5)
    if name == "stripes":
        inside = (np.abs(u) < 0.9) & (np.abs(v) < 0.9)
        return inside & (np.floor((v + 0.9) / 0.36) % 2 == 0)
    if name == "checkerboard":
        inside = (np.abs(u) < 0.9) & (np.abs(v) < 0.9)
        return inside & ((np.floor((u + 0.9) / 0.6) + np.floor((v + 0.9) / 0.6)) % 2 == 0)
    if name == "two_dots":
        v2 = v * v
        return ((u - 0.55) ** 2 + v2 < 0.38**2) | ((u + 0.55) ** 2 + v2 < 0.38**2)
    if name == "crescent":
        return (u * u + v * v < 1.0) & ((u - 0.45) ** 2 + v * v > 0.8**2)
    raise AssertionError(name)


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32)


@functools.cache
def class_scales() -> np.ndarray:
    """Per-class factor on the shape frame that brings every class to the mean area."""
    grid = (np.arange(600, dtype=np.float64) + 0.5) / 600 * 3.0 - 1.5  # shapes fit in [-1.5, 1.5]
    u, v = np.meshgrid(grid, grid)
    areas = np.array([_shape_mask(c, u, v).mean() * 9.0 for c in range(len(CLASS_NAMES))])
    # Scaling the frame coordinates by f shrinks the area by f^2.
    return np.sqrt(areas / areas.mean())


def _bilinear_matrix(size: int, grid: int) -> np.ndarray:
    """``[size, grid]`` weights that interpolate ``grid`` knots onto ``size`` pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    lo = np.minimum(np.floor(pos).astype(int), grid - 2)
    frac = pos - lo
    mat = np.zeros((size, grid), dtype=np.float32)
    mat[np.arange(size), lo] = 1.0 - frac
    mat[np.arange(size), lo + 1] = frac
    return mat


class SyntheticShapes:
    """Deterministic labelled shapes: ``dataset[i] -> (PIL RGB image, label)``.

    ``split`` is any name ("train", "test", ...); different names give disjoint random streams.
    Labels are balanced (``num_images // num_classes`` or one more per class) and shuffled.
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 5000,
        image_size: int = 32,
        num_classes: int = 10,
        seed: int = 0,
    ) -> None:
        if not 2 <= num_classes <= len(CLASS_NAMES):
            raise ValueError(f"num_classes must be in [2, {len(CLASS_NAMES)}], got {num_classes}")
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.split = split
        self.num_images = num_images
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.classes = list(CLASS_NAMES[:num_classes])
        # crc32, not hash(): Python salts str hashes per process.
        self._split_key = zlib.crc32(split.encode("utf-8"))
        # Tags 0 (labels) and 1 (images) keep the two streams apart; SeedSequence pads short
        # entropy with zeros, so a bare [seed, split] would collide with image 0.
        label_rng = np.random.default_rng(np.random.SeedSequence([seed, self._split_key, 0]))
        self.labels: list[int] = label_rng.permutation(np.arange(num_images) % num_classes).tolist()

        ss = image_size * _SUPERSAMPLE
        centres = (np.arange(ss, dtype=np.float32) + 0.5) / _SUPERSAMPLE
        self._xs, self._ys = np.meshgrid(centres, centres)  # fine grid, in output pixels
        ramp = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
        self._gx, self._gy = np.meshgrid(ramp, ramp)  # output grid in [-0.5, 0.5]
        self._interp = _bilinear_matrix(image_size, _TEXTURE_GRID)
        self._class_scale = class_scales()

    def __len__(self) -> int:
        return self.num_images

    def path(self, index: int) -> str:
        return f"synthetic:{self.split}:{index}"

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        index = int(index)
        if index < 0:
            index += self.num_images
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        label = self.labels[index]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._split_key, 1, index]))
        return Image.fromarray(self._render(rng, label)), label

    def _fine_to_output(self, mask: np.ndarray) -> np.ndarray:
        """Box-filter a boolean fine-grid mask to output-pixel coverage in [0, 1]."""
        m = mask.view(np.uint8)
        total = m[0::2, 0::2] + m[0::2, 1::2] + m[1::2, 0::2] + m[1::2, 1::2]
        return total.astype(np.float32) * np.float32(0.25)

    def _render(self, rng: np.random.Generator, label: int) -> np.ndarray:
        size = self.image_size
        f32 = np.float32

        # Background: dark, a colour gradient in a random direction plus smooth coloured noise.
        bg0 = rng.uniform(0.0, 0.25, 3).astype(f32)
        bg1 = np.clip(bg0 + rng.normal(0.0, 0.15, 3).astype(f32), 0.0, 1.0)
        theta = rng.uniform(0.0, 2.0 * np.pi)
        t = self._gx * f32(np.cos(theta)) + self._gy * f32(np.sin(theta)) + f32(0.5)
        img = bg0 + t[..., None] * (bg1 - bg0)
        knots = rng.normal(0.0, rng.uniform(0.0, 0.05), (_TEXTURE_GRID, _TEXTURE_GRID, 3))
        rows = self._interp @ knots.astype(f32).reshape(_TEXTURE_GRID, -1)  # [size, grid * 3]
        img += self._interp @ rows.reshape(size, _TEXTURE_GRID, 3)

        # Foreground: bright, any hue, far enough from the background to stay visible. Fully
        # random RGB on both sides drowns the shape in random-init features (kNN ~13 %).
        mean_bg = 0.5 * (bg0 + bg1)
        for _ in range(8):
            fg = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.7), rng.uniform(0.85, 1.0))
            if np.linalg.norm(fg - mean_bg) > 0.45:
                break
        else:
            fg = np.where(mean_bg > 0.5, 0.0, 1.0).astype(f32)
        fg_shade = rng.normal(0.0, 0.08, 3).astype(f32)  # mild shading across the shape

        # Pose, in output pixels. The per-class scale gives every class the same expected area,
        # so colour statistics (mean, histogram) do not reveal the class.
        radius = rng.uniform(0.32, 0.42) * size
        margin = 0.75 * radius
        cx, cy = rng.uniform(margin, size - margin, 2)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        aspect = np.exp(rng.uniform(-0.1, 0.1))
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = self._xs - f32(cx), self._ys - f32(cy)
        inv = self._class_scale[label] / radius
        u = (dx * f32(c) + dy * f32(s)) * f32(inv / aspect)
        v = (dy * f32(c) - dx * f32(s)) * f32(inv * aspect)
        alpha = self._fine_to_output(_shape_mask(label, u, v))[..., None]
        colour = fg + self._gx[..., None] * fg_shade
        img += alpha * (colour - img)

        # Clutter: up to two thin line segments in random colours, over shape and background.
        for _ in range(rng.integers(0, 3)):
            x0, y0 = rng.uniform(0.0, size, 2)
            length = rng.uniform(0.25, 0.6) * size
            phi = rng.uniform(0.0, 2.0 * np.pi)
            ex, ey = np.cos(phi), np.sin(phi)
            px, py = self._xs - f32(x0), self._ys - f32(y0)
            along = np.clip(px * f32(ex) + py * f32(ey), 0.0, length)
            dist2 = (px - along * f32(ex)) ** 2 + (py - along * f32(ey)) ** 2
            half_width = rng.uniform(0.4, 0.8) * size / 32.0
            line = self._fine_to_output(dist2 < half_width * half_width)[..., None]
            img += line * (rng.random(3, dtype=f32) - img)

        img += rng.normal(0.0, rng.uniform(0.0, 0.02), img.shape).astype(f32)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
