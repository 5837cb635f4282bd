"""The few collectives the assignment phases need, as pure functions that do nothing (or return
their input) when no process group runs, so every caller also runs in one process.

None of them carries gradient: they move pseudo-label material (bank rows, counts, labels).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """In place: the sum over ranks (no gradient flows)."""
    if is_distributed(group):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def broadcast_from_first(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """In place: every rank gets the first rank's `x` (no gradient flows)."""
    if is_distributed(group):
        dist.broadcast(x, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return x


def row_counts(rows: int, device: torch.device, group: dist.ProcessGroup | None = None) -> list[int]:
    """Every rank's number of rows, in rank order."""
    if not is_distributed(group):
        return [rows]
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.long, device=device), group=group)
    return [int(c.item()) for c in counts]


def gather_rows(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's rows of `x` (dim 0), concatenated in rank order, on every rank; ranks may hold
    different numbers of rows. No gradient flows: the result is a plain copy."""
    if not is_distributed(group):
        return x
    counts = row_counts(x.shape[0], x.device, group)
    # all_gather wants equal shapes: pad every rank's rows to the largest count, then trim.
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
