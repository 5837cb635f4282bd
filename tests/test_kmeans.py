"""Spherical k-means: the result is a fixed point, empty clusters keep their centroid, the score
matrix is chunked, and two processes cluster like one process on the concatenated rows."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import swav.losses.kmeans as kmeans_module
from swav.distributed import free_port
from swav.losses import spherical_kmeans


def sphere(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def blobs(n: int, d: int, k: int, seed: int = 0, spread: float = 0.3) -> torch.Tensor:
    """`n` unit rows around `k` random directions: a clustering that k-means finds and keeps."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    rows = centres[torch.arange(n) % k] + spread * torch.randn(n, d, generator=g)
    return F.normalize(rows, dim=1)


def test_the_result_is_a_fixed_point():
    x = sphere(300, 8)
    centroids, labels = spherical_kmeans(x, 7, num_iters=100, seed=3)
    assert centroids.shape == (7, 8) and labels.shape == (300,) and labels.dtype == torch.long
    # Every row is in the cluster of its centroid of largest dot product ...
    assert torch.equal(labels, (x @ centroids.t()).argmax(dim=1))
    # ... and every non-empty centroid is the normalised mean of its rows.
    for k in labels.unique():
        torch.testing.assert_close(centroids[k], F.normalize(x[labels == k].mean(dim=0), dim=0))
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(7))


def test_the_seed_chooses_the_start_and_the_same_seed_repeats_it():
    x = sphere(200, 6, seed=1)
    a, la = spherical_kmeans(x, 5, num_iters=3, seed=0)
    b, lb = spherical_kmeans(x, 5, num_iters=3, seed=0)
    assert torch.equal(a, b) and torch.equal(la, lb)
    start, _ = spherical_kmeans(x, 5, num_iters=0, seed=0)
    # The start is made of 5 different rows of x.
    rows = [int((x == c).all(dim=1).nonzero()) for c in start]
    assert len(set(rows)) == 5
    other, _ = spherical_kmeans(x, 5, num_iters=0, seed=1)
    assert not torch.equal(start, other)


def test_an_empty_cluster_keeps_its_centroid():
    # Two distinct directions, three clusters: whatever rows start them, two start on the same
    # direction, the tie goes to the first, and the other stays empty for good.
    a, b = F.normalize(torch.tensor([1.0, 0.2, 0.0]), dim=0), F.normalize(torch.tensor([0.0, 1.0, 0.5]), dim=0)
    x = torch.stack([a, a, a, b, b])
    for seed in range(6):
        start, _ = spherical_kmeans(x, 3, num_iters=0, seed=seed)
        centroids, labels = spherical_kmeans(x, 3, num_iters=5, seed=seed)
        empty = [k for k in range(3) if not (labels == k).any()]
        assert empty, seed
        for k in empty:
            assert torch.equal(centroids[k], start[k])
        assert torch.isfinite(centroids).all()


def test_chunked_scores_give_the_same_clustering(monkeypatch):
    x = sphere(257, 8, seed=2)
    whole = spherical_kmeans(x, 9, num_iters=5, seed=4)
    monkeypatch.setattr(kmeans_module, "_SCORE_BUDGET", 9 * 10)  # 10 rows per product
    chunked = spherical_kmeans(x, 9, num_iters=5, seed=4)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[0], chunked[0], rtol=0, atol=1e-6)


def test_more_clusters_than_rows_is_refused():
    with pytest.raises(ValueError, match="k-means with 11 clusters over 10 rows"):
        spherical_kmeans(sphere(10, 4), 11)


# ------------------------------------------------------------------- one vs two processes


def _join_gloo(rank: int, port: int) -> None:
    import datetime

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))


def run_two_processes(worker, args: tuple, timeout: float = 120) -> None:
    """`worker(rank, port, *args)` in two spawned processes joined over gloo on loopback (each
    worker calls `_join_gloo`); a hang fails the test after `timeout` seconds."""
    context = mp.start_processes(worker, args=(free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"the two processes did not finish in {timeout} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _kmeans_worker(rank: int, port: int, x: torch.Tensor, split: int, out_dir: str) -> None:
    _join_gloo(rank, port)
    try:
        mine = x[:split] if rank == 0 else x[split:]
        torch.save(spherical_kmeans(mine, 6, num_iters=8, seed=5), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_processes_equal_one_process_on_the_concatenated_rows(tmp_path):
    x = blobs(200, 8, 6, seed=7)
    split = 130  # unequal shares: the chosen start rows and the gathers must not assume equal ones
    run_two_processes(_kmeans_worker, (x, split, str(tmp_path)))
    (c0, l0), (c1, l1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    centroids, labels = spherical_kmeans(x, 6, num_iters=8, seed=5)
    torch.testing.assert_close(c0, c1, rtol=0, atol=0)  # every rank has the same centroids
    torch.testing.assert_close(c0, centroids, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat([l0, l1]), labels)
    assert len(labels.unique()) == 6
