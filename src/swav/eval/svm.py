"""One linear SVM per class on L2-normalised features (appendix A.5, VOC07 as in PIRL).

Labels are a matrix ``[N, C]``: 1 = the class is present, 0 = absent, -1 = ignored for that
class (VOC's "difficult"): left out of both its training and its AP. Single-label data becomes
a one-hot matrix. The cost C of each class is chosen by cross-validated AP over a sweep, then
the SVM is refit on all its training rows with that cost.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

logger = logging.getLogger("swav")

IGNORED = -1


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated AP: sum over distinct score thresholds of (recall step) x precision.

    Rows with target -1 are left out; tied scores form one threshold. NaN without positives.
    (VOC07's devkit interpolates at 11 recall points instead, which reads a little higher.)
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    keep = targets != IGNORED
    scores, positive = scores[keep], targets[keep] > 0
    num_pos = positive.sum()
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    tp = np.cumsum(positive)
    # The last row of each group of equal scores closes one threshold.
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    precision = tp[last] / (last + 1)
    recall_step = np.diff(np.r_[0, tp[last]]) / num_pos
    return float((recall_step * precision).sum())


def mean_ap(scores: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
    """Mean over classes (columns) with at least one positive, in percent, and the per-class APs."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    valid = [a for a in aps if not np.isnan(a)]
    return (100.0 * float(np.mean(valid)) if valid else float("nan")), aps


def one_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if (labels < 0).any():
        raise ValueError("single-label SVM data needs a label for every image")
    out = np.zeros((len(labels), num_classes), dtype=np.int64)
    out[np.arange(len(labels)), labels] = 1
    return out


def _load_npy(path: Path) -> np.ndarray:
    try:
        # Never pickle: unpickling an object array can run any code from the file.
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise ValueError(f"{path}: {e}") from None
        raise ValueError(
            f"{path}: refusing to load it: it holds pickled Python objects (an object array), and "
            "unpickling them could run code from the file. Save the matrix as numbers, "
            "np.save(path, labels.astype(np.int64)), or as a .txt matrix"
        ) from None


def load_label_matrix(path: str | Path, num_rows: int) -> np.ndarray:
    """A ``.npy`` or whitespace-separated ``.txt`` matrix ``[N, C]`` of 1 / 0 / -1, rows in dataset order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"label matrix {str(path)!r} does not exist")
    matrix = _load_npy(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != num_rows:
        raise ValueError(f"{path}: expected a [{num_rows}, num_classes] matrix (one row per image), got {matrix.shape}")
    if not np.isin(matrix, (-1, 0, 1)).all():
        raise ValueError(f"{path}: entries must be 1 (present), 0 (absent) or -1 (ignored)")
    return matrix.astype(np.int64)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _svm(cost: float, max_iter: int, seed: int) -> LinearSVC:
    # dual="auto": liblinear's primal solver when there are more images than dimensions.
    return LinearSVC(C=cost, dual="auto", max_iter=max_iter, random_state=seed)


def _fit(x: np.ndarray, y: np.ndarray, cost: float, max_iter: int, seed: int) -> LinearSVC:
    with warnings.catch_warnings():
        # A few iterations short of liblinear's tolerance changes the AP in the 4th digit.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _svm(cost, max_iter, seed).fit(x, y)


def choose_cost(
    x: np.ndarray, y: np.ndarray, costs: Sequence[float], folds: int, max_iter: int, seed: int
) -> tuple[float, dict[float, float]]:
    """The cost with the best mean held-out AP over ``folds`` stratified folds (binary ``y``).

    With fewer positives or negatives than 2, no validation is possible: the cost nearest to 1
    is used and the sweep is empty.
    """
    folds = min(folds, int(y.sum()), int((1 - y).sum()))
    if folds < 2 or len(costs) == 1:
        return min(costs, key=lambda c: abs(np.log(c))), {}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    sweep = {}
    for cost in costs:
        aps = []
        for train, held in splitter.split(x, y):
            model = _fit(x[train], y[train], cost, max_iter, seed)
            aps.append(average_precision(model.decision_function(x[held]), y[held]))
        sweep[float(cost)] = float(np.nanmean(aps))
    best = max(sweep, key=lambda c: (sweep[c], -c))  # ties: the smaller cost (more regularised)
    return best, sweep


def train_svms(
    features: np.ndarray,
    targets: np.ndarray,
    costs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    folds: int = 3,
    max_iter: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Per-class SVMs on L2-normalised ``features`` and a ``[N, C]`` 1/0/-1 ``targets`` matrix.

    Returns weights ``[C, D]``, biases ``[C]`` and the chosen cost per class. A class without
    positives (or without negatives) in the training rows gets a zero SVM.
    """
    x = l2_normalize(features)
    weights = np.zeros((targets.shape[1], x.shape[1]))
    biases = np.zeros(targets.shape[1])
    chosen = []
    for c in range(targets.shape[1]):
        keep = targets[:, c] != IGNORED
        y = (targets[keep, c] > 0).astype(np.int64)
        if y.min(initial=1) == y.max(initial=0):
            logger.warning("SVM class %d: only one kind of training example; its scores are all zero", c)
            chosen.append(float("nan"))
            continue
        cost, sweep = choose_cost(x[keep], y, costs, folds, max_iter, seed)
        model = _fit(x[keep], y, cost, max_iter, seed)
        weights[c], biases[c] = model.coef_[0], model.intercept_[0]
        chosen.append(float(cost))
        logger.info("SVM class %d: cost %g (cross-validated AP per cost: %s)", c, cost,
                    ", ".join(f"{k:g}: {100 * v:.1f}" for k, v in sweep.items()) or "no sweep")
    return weights, biases, chosen


def svm_scores(features: np.ndarray, weights: np.ndarray, biases: np.ndarray) -> np.ndarray:
    return l2_normalize(features) @ weights.T + biases


def low_shot_rows(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted rows with ``k`` positives of every class (fewer if a class has fewer), drawn with a
    generator seeded by ``(seed, k, class)``; their other labels come along (multi-label)."""
    rows = set()
    for c in range(targets.shape[1]):
        positives = np.flatnonzero(targets[:, c] > 0)
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(k), c]))
        rows.update(positives[rng.permutation(len(positives))[:k]].tolist())
    return np.asarray(sorted(rows), dtype=np.int64)
