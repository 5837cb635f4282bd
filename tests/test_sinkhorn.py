"""Sinkhorn-Knopp: marginals, parity with float64 references of the paper / official algorithm,
numerical robustness, hard assignments, and one process vs two processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from swav.losses import hard_assignment, sinkhorn


def official_reference(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The official distributed_sinkhorn on one process, float64, no shift."""
    q = torch.exp(scores.double() / eps).t()
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def paper_reference(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The appendix A.1 pseudo-code (u, r, c marginals), float64."""
    q = torch.exp(scores.double() / eps).t()
    q = q / q.sum()
    k, b = q.shape
    r = torch.ones(k, dtype=torch.float64) / k
    c = torch.ones(b, dtype=torch.float64) / b
    for _ in range(iters):
        u = q.sum(dim=1)
        q = q * (r / u).unsqueeze(1)
        q = q * (c / q.sum(dim=0)).unsqueeze(0)
    return (q / q.sum(dim=0, keepdim=True)).t()


def cosine_scores(b: int, k: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_matches_float64_references(iters):
    scores = cosine_scores(32, 20)
    ref = official_reference(scores, 0.05, iters)
    torch.testing.assert_close(paper_reference(scores, 0.05, iters), ref, rtol=1e-10, atol=1e-12)
    out = sinkhorn(scores, epsilon=0.05, num_iters=iters)
    assert out.dtype == torch.float32 and out.shape == scores.shape
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-7)
    out64 = sinkhorn(scores, epsilon=0.05, num_iters=iters, use_double_precision=True)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, ref, rtol=1e-10, atol=1e-13)


def test_marginals():
    b, k = 24, 8
    scores = cosine_scores(b, k, seed=1)
    q = sinkhorn(scores, num_iters=3, use_double_precision=True)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b, dtype=torch.float64))
    assert (q >= 0).all()
    # Three rounds move the prototypes' shares towards equal (compared with a plain softmax);
    # many rounds make them exact.
    spread = (q.sum(dim=0) - b / k).abs().max()
    softmax_spread = (torch.softmax(scores.double() / 0.05, dim=1).sum(dim=0) - b / k).abs().max()
    assert spread < 0.5 * softmax_spread
    q = sinkhorn(scores, num_iters=200, use_double_precision=True)
    torch.testing.assert_close(q.sum(dim=0), torch.full((k,), b / k, dtype=torch.float64))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b, dtype=torch.float64))


def test_no_gradient_and_input_untouched():
    scores = cosine_scores(8, 5).requires_grad_()
    before = scores.detach().clone()
    q = sinkhorn(scores)
    assert not q.requires_grad
    assert torch.equal(scores.detach(), before)


def test_small_epsilon_stays_finite_where_unshifted_float32_overflows():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(64, 30, generator=g) * 2 - 1  # magnitude 1
    naive = torch.exp(scores / 0.01)
    assert not torch.isfinite(naive).all()  # the official float32 code would overflow here
    q = sinkhorn(scores, epsilon=0.01)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(
        q.double(), official_reference(scores, 0.01, 3), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))


def test_float16_and_offset_scores():
    scores = cosine_scores(16, 12, seed=3)
    half = scores.half()
    q = sinkhorn(half)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(
        q.double(), official_reference(half.float(), 0.05, 3), rtol=2e-5, atol=1e-7
    )
    # A common offset cancels in the normalisation; without the shift exp() would overflow.
    shifted = sinkhorn(scores.double() + 1000.0, use_double_precision=True)
    ref = official_reference(scores, 0.05, 3)
    torch.testing.assert_close(shifted, ref, rtol=1e-8, atol=1e-10)


def test_sample_far_from_every_prototype_does_not_poison_the_batch():
    scores = cosine_scores(10, 6, seed=4)
    scores[3] = -100.0  # exp underflows to 0 for this sample against every prototype
    q = sinkhorn(scores)
    assert torch.isfinite(q).all()
    others = torch.arange(10) != 3
    torch.testing.assert_close(q[others].sum(dim=1), torch.ones(9))


def test_runs_outside_autocast():
    scores = cosine_scores(16, 10, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, sinkhorn(scores), rtol=0, atol=0)


def test_hard_assignment():
    codes = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], dtype=torch.float64)
    hard = hard_assignment(codes)
    assert hard.dtype == torch.float64
    assert torch.equal(hard, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    q = sinkhorn(cosine_scores(20, 7))
    h = hard_assignment(q)
    assert torch.equal(h.sum(dim=1), torch.ones(20))
    assert torch.equal(h.argmax(dim=1), q.argmax(dim=1))


# ------------------------------------------------------------------- one vs two processes


def _worker(rank: int, world_size: int, init_file: str, scores: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        local = scores.chunk(world_size)[rank]
        torch.save(sinkhorn(local, epsilon=0.05, num_iters=3), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    # The two halves have different maxima, so the all-reduced shift matters too.
    scores = cosine_scores(12, 9, seed=6)
    scores[:6] += 0.5
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), scores, str(tmp_path)), nprocs=2, join=True)
    got = torch.cat([torch.load(tmp_path / f"rank{r}.pt") for r in range(2)])
    torch.testing.assert_close(got, sinkhorn(scores), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        got.double(), official_reference(scores, 0.05, 3), rtol=2e-5, atol=1e-7
    )
    assert not math.isclose(got[0, 0].item(), sinkhorn(scores[:6])[0, 0].item(), rel_tol=1e-3)


def test_overwrite_uses_the_scores_as_buffer_and_changes_nothing_else():
    torch.manual_seed(0)
    scores = F.normalize(torch.randn(40, 128), dim=1) @ F.normalize(torch.randn(30, 128), dim=1).t()
    kept = scores.clone()
    expected = official_reference(scores, 0.05, 3).float()
    codes = sinkhorn(scores, 0.05, 3)
    assert torch.equal(scores, kept)  # the default copies
    assert torch.allclose(codes, expected, rtol=1e-4, atol=1e-6)
    reused = sinkhorn(scores, 0.05, 3, overwrite=True)
    assert torch.equal(reused, codes)
    assert reused.data_ptr() == scores.data_ptr()  # no copy of the [B, K] matrix
    # float64 Sinkhorn cannot work in a float32 buffer: it copies, and the scores stay.
    doubled = sinkhorn(kept, 0.05, 3, use_double_precision=True, overwrite=True)
    assert doubled.dtype == torch.float64 and doubled.data_ptr() != kept.data_ptr()
