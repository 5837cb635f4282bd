"""Objectives: the interface the loop calls, Sinkhorn-Knopp codes, spherical k-means, and the
losses of SwAV, DeepCluster-v2, SeLa-v2 and SimCLR."""

from swav.losses.deepclusterv2 import DeepClusterV2Loss
from swav.losses.kmeans import spherical_kmeans
from swav.losses.objective import EpochContext, Objective, StepOutputs
from swav.losses.sela_v2 import SeLaV2Loss, sinkhorn_labels
from swav.losses.simclr import SimCLRLoss, multicrop_info_nce
from swav.losses.sinkhorn import hard_assignment, sinkhorn
from swav.losses.swav import SwAVLoss

__all__ = [
    "DeepClusterV2Loss",
    "EpochContext",
    "Objective",
    "SeLaV2Loss",
    "SimCLRLoss",
    "StepOutputs",
    "SwAVLoss",
    "hard_assignment",
    "multicrop_info_nce",
    "sinkhorn",
    "sinkhorn_labels",
    "spherical_kmeans",
]
