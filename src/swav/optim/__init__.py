"""Optimisation: LARC, parameter groups and per-iteration schedules."""

from __future__ import annotations

from torch import nn

from swav.optim.larc import LARC
from swav.optim.schedules import constant_schedule, continue_cosine, cosine_schedule, step_schedule

__all__ = ["LARC", "constant_schedule", "continue_cosine", "cosine_schedule", "param_groups", "step_schedule"]


def param_groups(
    model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool = False
) -> list[dict]:
    """Parameter groups for the optimizer: the one place that decides who gets weight decay.

    Default, as the official SwAV: one group, every trainable parameter decayed (BN and biases
    included). ``exclude_bias_and_norm`` moves 1-D parameters (biases, norm scales/shifts) to a
    group with ``weight_decay=0``, the usual choice for longer schedules with larger decay.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": params, "weight_decay": weight_decay}]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
