"""Sinkhorn-Knopp: equipartitioned soft assignments of samples to prototypes (SwAV appendix A.1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _all_reduce(x: Tensor, op: str, group) -> None:
    """In-place all-reduce ("sum" or "max") when a process group runs; no gradient flows here."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    num_iters: int = 3,
    use_double_precision: bool = False,
    group: dist.ProcessGroup | None = None,
    overwrite: bool = False,
) -> Tensor:
    """Codes ``[B, K]`` for prototype scores ``[B, K]``; each row sums to 1.

    The official ``distributed_sinkhorn``: ``Q = exp(scores / epsilon).T``, normalised to sum 1,
    then ``num_iters`` rounds of (rows to 1/K, columns to 1/B_total), finally scaled by B_total.
    With a process group the batch is the union over ranks: only the shift, the total and the
    row sums (a K-vector) are all-reduced; columns are local. Without one nothing extra happens.

    Runs outside autocast in float32 (float64 with ``use_double_precision``). Each prototype's
    scores are shifted by their maximum over the whole (global) batch before ``exp``: that is a
    row scaling of Q, which the first row normalisation removes exactly, so the result equals
    the unshifted algorithm wherever that is finite, while every row keeps an entry of 1 and
    nothing overflows (small epsilon, fp16 scores). Lower epsilon = sharper codes.
    ``overwrite=True`` lets it use ``scores`` (already of that dtype) as its buffer: one copy of
    the [B, K] matrix fewer, for callers that built it for this call.
    """
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(
            f"sinkhorn expects scores [B, K] with B >= 1, got shape {tuple(scores.shape)}"
        )
    dtype = torch.float64 if use_double_precision else torch.float32
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size(group) if distributed else 1

    with torch.autocast(device_type=scores.device.type, enabled=False):
        # One [B, K] buffer updated in place: with 100,000 prototypes and a 3840-row queue each
        # temporary would be 1.5 GB, about a second to allocate and fill on a CPU (BENCHMARKS.md).
        q = scores.detach().to(dtype, copy=not (overwrite and scores.dtype == dtype))
        shift = q.amax(dim=0)  # [K]
        _all_reduce(shift, "max", group)
        q = q.sub_(shift).div_(epsilon).exp_().t()  # [K, B], entries in [0, 1]
        num_prototypes, batch = q.shape
        batch_total = batch * world_size

        total = q.sum()
        _all_reduce(total, "sum", group)
        q /= total
        for _ in range(num_iters):
            rows = q.sum(dim=1, keepdim=True)
            _all_reduce(rows, "sum", group)
            q /= rows * num_prototypes
            cols = q.sum(dim=0, keepdim=True)
            # A sample whose every entry underflowed (far below each prototype's best match)
            # keeps an all-zero code instead of turning 0/0 into NaN for the whole batch.
            cols = torch.where(cols > 0, cols, torch.ones_like(cols))
            q /= cols * batch_total
        q *= batch_total
    return q.t()


def hard_assignment(codes: Tensor) -> Tensor:
    """One-hot codes of the same shape and dtype: each sample goes to its argmax prototype."""
    return F.one_hot(codes.argmax(dim=1), codes.shape[1]).to(codes.dtype)
