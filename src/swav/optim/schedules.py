"""Schedules as arrays indexed by the global iteration (float64 numpy, one value per iteration)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_lengths(total_iters: int, warmup_iters: int = 0) -> None:
    if total_iters < 0 or not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"need 0 <= warmup_iters ({warmup_iters}) <= total_iters ({total_iters})")


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_start_value: float = 0.0,
) -> np.ndarray:
    """Linear warm-up, then a half cosine from ``base_value`` to ``final_value``.

    Convention: ``sched[:warmup_iters]`` rises linearly from ``warmup_start_value`` (at 0) in
    equal steps towards ``base_value``, which it reaches at ``sched[warmup_iters]``; with
    ``T = total_iters - warmup_iters`` and ``t = 0 .. T-1`` the rest is
    ``final + 0.5 * (base - final) * (1 + cos(pi * t / (T - 1)))``, so ``sched[-1] == final``.
    (If ``T == 1`` the single value is ``base_value``.)
    """
    _check_lengths(total_iters, warmup_iters)
    warmup = np.linspace(warmup_start_value, base_value, warmup_iters, endpoint=False)
    steps = total_iters - warmup_iters
    t = np.arange(steps, dtype=np.float64)
    progress = t / (steps - 1) if steps > 1 else np.zeros_like(t)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def step_schedule(
    base_value: float, total_iters: int, milestones_iters: Sequence[int], gamma: float
) -> np.ndarray:
    """``base_value`` multiplied by ``gamma`` once at every milestone iteration reached."""
    _check_lengths(total_iters)
    milestones = np.sort(np.asarray(list(milestones_iters), dtype=np.int64))
    passed = np.searchsorted(milestones, np.arange(total_iters), side="right")
    return base_value * np.power(float(gamma), passed).astype(np.float64)


def constant_schedule(value: float, total_iters: int) -> np.ndarray:
    _check_lengths(total_iters)
    return np.full(total_iters, value, dtype=np.float64)


def continue_cosine(schedule: np.ndarray, from_iter: int, value: float, final_value: float) -> np.ndarray:
    """``schedule`` before ``from_iter``, then a half cosine from ``value`` to ``final_value`` at its end.

    A run whose length changes mid-way (a resume with another number of epochs) continues from
    the LR it had instead of jumping to where the new, longer cosine would be at that iteration.
    """
    out = np.array(schedule, dtype=np.float64)
    tail = len(out) - from_iter
    if tail > 0:
        out[from_iter:] = cosine_schedule(value, final_value, tail)
    return out
