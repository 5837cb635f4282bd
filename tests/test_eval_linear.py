"""Linear probe: schedules, accuracy, and a linearly separable set learned exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swav.eval.linear import linear_lr_schedule, topk_accuracy, train_linear_on_features


def test_schedules_follow_a3_and_a5():
    cosine = linear_lr_schedule("cosine", 0.3, num_epochs=100, iters_per_epoch=5)
    assert len(cosine) == 500 and cosine[0] == pytest.approx(0.3) and cosine[-1] == pytest.approx(0.0)
    assert np.all(np.diff(cosine) <= 1e-12)
    # A.5: 0.01 divided by 10 three times at equal intervals: 28 epochs -> epochs 7, 14, 21.
    step = linear_lr_schedule("step", 0.01, num_epochs=28, iters_per_epoch=3, step_decays=3)
    per_epoch = step[::3]
    assert per_epoch[:7] == pytest.approx([0.01] * 7)
    assert per_epoch[7:14] == pytest.approx([1e-3] * 7)
    assert per_epoch[14:21] == pytest.approx([1e-4] * 7)
    assert per_epoch[21:] == pytest.approx([1e-5] * 7)
    with pytest.raises(ValueError):
        linear_lr_schedule("linear", 0.1, 1, 1)


def test_topk_accuracy_by_hand():
    logits = torch.tensor([
        [0.0, 1, 2, 3, 4, 5, 6],    # label 6: rank 1
        [6.0, 5, 4, 3, 2, 1, 0],    # label 1: rank 2
        [1.0, 0.5, 0, 0, 0, 0, 2],  # label 1: rank 3
        [0.0, 1, 2, 3, 4, 5, 6],    # label 0: rank 7, a miss
    ])
    out = topk_accuracy(logits, torch.tensor([6, 1, 1, 0]))
    assert out == {"top1": 25.0, "top5": 75.0}


@pytest.mark.parametrize("use_bn", [False, True])
def test_linearly_separable_set_is_learned(use_bn):
    g = torch.Generator().manual_seed(0)
    num_classes, dim = 4, 16
    directions = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    labels = torch.randint(num_classes, (400,), generator=g)
    # Features at scale 20, as post-ReLU trunk features: the BN head must not care.
    feats = 20 * (directions[labels] + 0.05 * torch.randn(400, dim, generator=g)).relu()
    train_f, train_y, test_f, test_y = feats[:300], labels[:300], feats[300:], labels[300:]
    # Sanity of the data: the class directions classify it perfectly.
    assert (test_f @ directions.T).argmax(1).eq(test_y).all()
    lr = 0.3 if use_bn else 0.003
    head = train_linear_on_features(train_f, train_y, num_classes, num_epochs=30, batch_size=32, lr=lr,
                                    weight_decay=1e-6, use_bn=use_bn)
    with torch.no_grad():
        assert topk_accuracy(head(test_f), test_y)["top1"] == 100.0
        # Chance level for shuffled labels: the probe does not just memorise something else.
        assert topk_accuracy(head(test_f), test_y[torch.randperm(100, generator=g)])["top1"] < 60.0
