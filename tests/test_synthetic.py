"""Synthetic shapes: determinism, splits, labels, image format, area equalisation."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from swav.data.synthetic import CLASS_NAMES, SyntheticShapes, _shape_mask, class_scales


def _pixels(ds: SyntheticShapes, i: int) -> np.ndarray:
    return np.asarray(ds[i][0])


def test_deterministic_across_instances_and_global_rng():
    a = SyntheticShapes("train", num_images=50)
    np.random.seed(123)
    random.seed(123)
    first = [_pixels(a, i) for i in range(0, 50, 7)]
    b = SyntheticShapes("train", num_images=50)
    np.random.seed(999)
    random.seed(999)
    second = [_pixels(b, i) for i in reversed(range(0, 50, 7))][::-1]  # order must not matter
    for x, y in zip(first, second, strict=True):
        assert np.array_equal(x, y)
    assert a.labels == b.labels
    assert np.array_equal(_pixels(a, 3), _pixels(pickle.loads(pickle.dumps(a)), 3))


def test_identical_in_another_process():
    code = (
        "import hashlib, numpy as np; from swav.data.synthetic import SyntheticShapes; "
        "ds = SyntheticShapes('train', 20, seed=4); "
        "print(hashlib.sha256(np.asarray(ds[11][0]).tobytes()).hexdigest(), ds[11][1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import hashlib

    ds = SyntheticShapes("train", 20, seed=4)
    image, label = ds[11]
    assert out.stdout.split() == [
        hashlib.sha256(np.asarray(image).tobytes()).hexdigest(),
        str(label),
    ]


def test_splits_and_seeds_differ():
    train = SyntheticShapes("train", 30)
    test = SyntheticShapes("test", 30)
    other_seed = SyntheticShapes("train", 30, seed=1)
    for i in range(30):
        assert not np.array_equal(_pixels(train, i), _pixels(test, i))
        assert not np.array_equal(_pixels(train, i), _pixels(other_seed, i))
    # Images within a split differ too, even with the same label.
    same = [i for i, y in enumerate(train.labels) if y == train.labels[0]]
    assert not np.array_equal(_pixels(train, same[0]), _pixels(train, same[1]))


@pytest.mark.parametrize("n, c", [(5000, 10), (1000, 10), (103, 7), (7, 10)])
def test_labels_balanced_and_consistent(n, c):
    ds = SyntheticShapes("train", num_images=n, num_classes=c)
    counts = np.bincount(ds.labels, minlength=c)
    assert len(ds.labels) == n and counts.sum() == n and len(counts) == c
    assert counts.max() - counts.min() <= 1  # balanced to within one image
    if n >= c:
        assert (counts > 0).all()
    assert ds.labels != sorted(ds.labels) or n <= 1  # shuffled, not blocks
    for i in range(min(n, 20)):
        assert ds[i][1] == ds.labels[i]
        assert isinstance(ds[i][1], int)


def test_image_format_and_api():
    ds = SyntheticShapes("test", num_images=12, image_size=32)
    assert len(ds) == 12
    image, label = ds[5]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert 0 <= label < 10
    assert ds.path(5) == "synthetic:test:5"
    assert np.array_equal(_pixels(ds, -1), _pixels(ds, 11))
    with pytest.raises(IndexError):
        ds[12]
    big = SyntheticShapes("train", num_images=3, image_size=64)
    assert big[0][0].size == (64, 64)
    assert len(CLASS_NAMES) == 10 and len(set(CLASS_NAMES)) == 10
    assert SyntheticShapes(num_images=1, num_classes=4).classes == list(CLASS_NAMES[:4])


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 11}, {"num_classes": 1}, {"num_images": -1}, {"image_size": 4}, {"seed": -1}],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        SyntheticShapes(**kwargs)


def test_shapes_are_distinct_and_area_equalised():
    grid = (np.arange(300) + 0.5) / 300 * 4.0 - 2.0
    u, v = np.meshgrid(grid, grid)
    scales = class_scales()
    masks = [_shape_mask(c, u * scales[c], v * scales[c]) for c in range(len(CLASS_NAMES))]
    areas = np.array([m.mean() * 16.0 for m in masks])
    np.testing.assert_allclose(areas, areas.mean(), rtol=0.02)
    for i in range(len(masks)):
        for j in range(i):
            # Every pair differs on a good part of its area (intersection over union < 0.8).
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.8, (CLASS_NAMES[i], CLASS_NAMES[j], iou)


def test_brightness_does_not_reveal_the_class():
    ds = SyntheticShapes("train", num_images=1000)
    means = np.array([_pixels(ds, i).mean() / 255.0 for i in range(len(ds))])
    labels = np.array(ds.labels)
    class_means = np.array([means[labels == c].mean() for c in range(10)])
    # Per-class means have a standard error of about 0.005 here; unequal areas (disc vs two
    # dots) would separate them by ~0.1.
    assert class_means.max() - class_means.min() < 0.03
