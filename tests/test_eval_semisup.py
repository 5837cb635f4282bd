"""Semi-supervised subsets: class-balanced, deterministic, from a file; fine-tuning moves both LRs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from swav.eval.semisup import Classifier, balanced_subset, finetune, subset_from_file


def test_balanced_subset_is_per_class_and_deterministic():
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(3).shuffle(labels)
    one = balanced_subset(labels, 1.0, seed=7)
    ten = balanced_subset(labels, 10.0, seed=7)
    assert np.bincount(labels[one], minlength=10).tolist() == [1] * 10
    assert np.bincount(labels[ten], minlength=10).tolist() == [10] * 10
    assert len(set(ten.tolist())) == 100 and np.all(np.diff(ten) > 0)
    assert np.array_equal(balanced_subset(labels, 10.0, seed=7), ten)  # same seed, same subset
    assert not np.array_equal(balanced_subset(labels, 10.0, seed=8), ten)
    # Unequal classes: the same share of each, at least one image; unlabelled images never chosen.
    uneven = np.array([0] * 200 + [1] * 30 + [2] * 3 + [-1] * 50)
    counts = np.bincount(uneven[balanced_subset(uneven, 10.0, seed=0)] + 1, minlength=4)
    assert counts.tolist() == [0, 20, 3, 1]
    # A class's choice does not depend on the other classes.
    only_first = balanced_subset(np.where(uneven == 0, 0, -1), 10.0, seed=0)
    assert np.array_equal(only_first, np.flatnonzero(np.isin(np.arange(len(uneven)), balanced_subset(uneven, 10.0, 0)) & (uneven == 0)))
    with pytest.raises(ValueError):
        balanced_subset(labels, 0.0, seed=0)


def test_subset_from_file_matches_paths_or_file_names(tmp_path):
    paths = [f"/data/train/c{i % 3}/img_{i}.JPEG" for i in range(12)]
    listing = tmp_path / "1percent.txt"
    listing.write_text("img_4.JPEG\n# comment\n/data/train/c1/img_7.JPEG\n\nimg_0.JPEG\n")
    assert subset_from_file(paths, listing).tolist() == [0, 4, 7]
    listing.write_text("img_4.JPEG\nimg_99.JPEG\n")
    with pytest.raises(ValueError, match="img_99"):
        subset_from_file(paths, listing)


class _Tensors:
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 4, 4, generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0).long().tolist()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_finetune_trains_trunk_and_head_with_step_decay(caplog):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Classifier(trunk, nn.Linear(8, 2))
    before = [p.detach().clone() for p in model.parameters()]
    data = _Tensors(64)
    with caplog.at_level("INFO", logger="swav"):
        history = finetune(model, data, list(range(0, 64, 2)), lambda t: t, num_epochs=5, batch_size=8,
                           trunk_lr=0.02, head_lr=0.5, milestones=(2, 4), gamma=0.2)
    assert len(history) == 5 and all(np.isfinite(history))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not model.training
    lines = [r.getMessage() for r in caplog.records if "fine-tune epoch" in r.getMessage()]
    assert "trunk LR 0.02, head LR 0.5" in lines[0] and "trunk LR 0.004, head LR 0.1" in lines[2]
    assert "trunk LR 0.0008, head LR 0.02" in lines[4]
