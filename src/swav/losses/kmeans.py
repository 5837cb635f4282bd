"""Spherical k-means over the rows of all ranks: DeepCluster-v2's assignment phase (appendix D.2)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from swav.losses.collectives import all_reduce_sum, broadcast_from_first, rank_and_world, row_counts

# Rows scored against the centroids at once: chunk x K floats stay near 64 MB whatever N is, so
# 1.28 M images x 3000 clusters never need their 15 GB score matrix.
_SCORE_BUDGET = 1 << 24


@torch.no_grad()
def nearest_centroid(x: Tensor, centroids: Tensor) -> Tensor:
    """The index of each row's centroid of largest dot product (the first one on ties), ``[N]``."""
    chunk = max(1, _SCORE_BUDGET // max(1, centroids.shape[0]))
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([(part @ centroids.t()).argmax(dim=1) for part in x.split(chunk)])


@torch.no_grad()
def _initial_centroids(x: Tensor, num_clusters: int, seed: int, group) -> Tensor:
    """K distinct rows of the global bank, chosen by the first rank with `seed`."""
    rank, world = rank_and_world(group)
    counts = row_counts(x.shape[0], x.device, group)
    total, offset = sum(counts), sum(counts[:rank])
    if num_clusters > total:
        raise ValueError(
            f"k-means with {num_clusters} clusters over {total} rows: every cluster needs a row to start "
            "from; use fewer clusters or more images"
        )
    chosen = torch.empty(num_clusters, dtype=torch.long, device=x.device)
    if rank == 0:
        generator = torch.Generator().manual_seed(seed)
        chosen.copy_(torch.randperm(total, generator=generator)[:num_clusters])
    broadcast_from_first(chosen, group)
    # Each rank writes the chosen rows it holds; the sum over ranks then holds all of them.
    centroids = x.new_zeros(num_clusters, x.shape[1])
    mine = (chosen >= offset) & (chosen < offset + x.shape[0])
    centroids[mine] = x[chosen[mine] - offset]
    return all_reduce_sum(centroids, group)


@torch.no_grad()
def spherical_kmeans(
    x: Tensor,
    num_clusters: int,
    num_iters: int = 10,
    seed: int = 0,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """``(centroids [K, D], assignments [N])`` for L2-normalised rows ``x [N, D]``.

    Starts from K distinct rows chosen with ``seed``; each of ``num_iters`` rounds assigns every
    row to its centroid of largest dot product, then moves each centroid to the normalised sum of
    its rows; a cluster left empty keeps its centroid. The returned assignments are those to the
    returned centroids. With a process group, ``x`` is this rank's rows, the clustering is over
    the union of all ranks' rows (the K x D sums and the counts are all-reduced) and every rank
    gets the same centroids and its own rows' assignments. Runs in float32, without gradient.
    """
    if x.ndim != 2:
        raise ValueError(f"k-means expects rows [N, D], got shape {tuple(x.shape)}")
    if num_clusters < 1 or num_iters < 0:
        raise ValueError(f"num_clusters={num_clusters} must be >= 1 and num_iters={num_iters} >= 0")
    x = x.detach().float()
    centroids = _initial_centroids(x, num_clusters, seed, group)
    for _ in range(num_iters):
        assignments = nearest_centroid(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=num_clusters)
        all_reduce_sum(sums, group)
        all_reduce_sum(counts, group)
        filled = counts > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)
    return centroids, nearest_centroid(x, centroids)
