"""Objectives: the interface the loop calls, Sinkhorn-Knopp codes, the SwAV swapped-prediction loss."""

from swav.losses.objective import Objective, StepOutputs
from swav.losses.sinkhorn import hard_assignment, sinkhorn
from swav.losses.swav import SwAVLoss

__all__ = ["Objective", "StepOutputs", "SwAVLoss", "hard_assignment", "sinkhorn"]
