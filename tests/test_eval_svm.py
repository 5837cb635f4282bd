"""SVM evaluation: AP against scikit-learn's, ignored labels, per-class SVMs, low-shot rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from swav.eval.svm import (
    average_precision,
    load_label_matrix,
    low_shot_rows,
    mean_ap,
    one_hot,
    svm_scores,
    train_svms,
)


def test_average_precision_by_hand_and_against_sklearn():
    # Ranked: +, -, +, -  -> precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2.
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        y[0] = 1
        s = np.round(rng.normal(size=50), 1)  # rounding makes ties: one threshold per tied group
        assert average_precision(s, y) == pytest.approx(average_precision_score(y, s))
    # -1 rows are left out, as if absent from the data.
    y = np.array([1, -1, 0, 1, -1])
    s = np.array([0.3, 0.9, 0.8, 0.1, 0.5])
    assert average_precision(s, y) == pytest.approx(average_precision_score([1, 0, 1], [0.3, 0.8, 0.1]))
    assert np.isnan(average_precision(s, np.zeros(5)))


def test_toy_multilabel_map():
    # Three classes; class 2 is ignored (-1) on one image and has no positive in the last column check.
    targets = np.array([[1, 0, 1], [1, 1, 0], [0, 1, -1], [0, 0, 1], [1, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.2], [0.6, 0.7, 0.1], [0.2, 0.3, 0.9], [0.4, 0.2, 0.8], [0.1, 0.5, 0.3]])
    expected = [
        average_precision_score(targets[:, 0], scores[:, 0]),
        average_precision_score(targets[:, 1], scores[:, 1]),
        average_precision_score(np.delete(targets[:, 2], 2), np.delete(scores[:, 2], 2)),
    ]
    m, aps = mean_ap(scores, targets)
    assert aps == pytest.approx(expected)
    assert m == pytest.approx(100 * np.mean(expected))
    # A class without positives in the evaluation data is left out of the mean.
    m2, aps2 = mean_ap(np.c_[scores, scores[:, :1]], np.c_[targets, np.zeros(5, int)])
    assert np.isnan(aps2[3]) and m2 == pytest.approx(m)


def _multilabel_problem(n, seed):
    centres = np.random.default_rng(100).normal(size=(3, 12)) * 3  # the same for every split
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 3)) < 0.4).astype(int)
    features = targets @ centres + rng.normal(size=(n, 12))
    return features, targets


def test_svms_learn_a_multilabel_problem_and_ignore_difficult_rows():
    x, t = _multilabel_problem(120, 0)
    xt, tt = _multilabel_problem(60, 1)
    w, b, costs = train_svms(x, t, costs=(0.1, 1.0), folds=3, seed=0)
    assert w.shape == (3, 12) and set(costs) <= {0.1, 1.0}
    m, aps = mean_ap(svm_scores(xt, w, b), tt)
    assert m > 95 and min(aps) > 0.9
    # Marking rows -1 for a class removes them from that class's SVM only.
    t_ignored = t.copy()
    t_ignored[:60, 0] = -1
    w2, b2, _ = train_svms(x, t_ignored, costs=(1.0,), folds=3)
    w3, b3, _ = train_svms(x[60:], t[60:], costs=(1.0,), folds=3)
    np.testing.assert_allclose(w2[0], w3[0], atol=1e-6)
    assert not np.allclose(w2[1], w3[1])


def test_single_label_and_label_files(tmp_path):
    assert one_hot([2, 0, 1], 3).tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError):
        one_hot([0, -1], 2)
    matrix = np.array([[1, 0, -1], [0, 1, 1]])
    np.save(tmp_path / "m.npy", matrix)
    np.savetxt(tmp_path / "m.txt", matrix, fmt="%d")
    assert np.array_equal(load_label_matrix(tmp_path / "m.npy", 2), matrix)
    assert np.array_equal(load_label_matrix(tmp_path / "m.txt", 2), matrix)
    with pytest.raises(ValueError, match=r"\[3, num_classes\]"):
        load_label_matrix(tmp_path / "m.npy", 3)
    np.save(tmp_path / "bad.npy", matrix * 2)
    with pytest.raises(ValueError, match="1 \\(present\\)"):
        load_label_matrix(tmp_path / "bad.npy", 2)


def test_low_shot_rows_k_positives_per_class_deterministic():
    labels = np.repeat(np.arange(4), 30)
    t = one_hot(labels, 4)
    rows = low_shot_rows(t, 5, seed=1)
    assert np.bincount(labels[rows]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(rows, low_shot_rows(t, 5, seed=1))
    assert not np.array_equal(rows, low_shot_rows(t, 5, seed=2))
    _, multi = _multilabel_problem(100, 3)
    rows = low_shot_rows(multi, 4, seed=0)
    assert (multi[rows].sum(0) >= 4).all()  # at least k positives for every class
