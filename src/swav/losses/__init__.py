"""Losses: Sinkhorn-Knopp codes and the SwAV swapped-prediction loss."""

from swav.losses.sinkhorn import hard_assignment, sinkhorn
from swav.losses.swav import SwAVLoss

__all__ = ["SwAVLoss", "hard_assignment", "sinkhorn"]
