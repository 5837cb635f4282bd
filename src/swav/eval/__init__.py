"""Evaluation of frozen trunks: feature extraction and weighted kNN."""

from swav.eval.features import extract_features
from swav.eval.knn import EvalTransform, evaluate_knn, knn_classify

__all__ = ["EvalTransform", "evaluate_knn", "extract_features", "knn_classify"]
