"""SwAV loss against a hand-computed value and an independent float64 re-implementation; the
queue, hard assignments, gradients, checkpoints and the non-finite dump."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_sinkhorn import official_reference

from swav.losses import SwAVLoss

# ---------------------------------------------------------------- float64 reference, by the formula




def ref_loss(
    score_sets,
    num_crops,
    assign=(0, 1),
    temperature=0.1,
    eps=0.05,
    hard=False,
    queue_scores=None,
    detach_codes=True,
):
    """queue_scores[j][i]: rows prepended to assignment crop i of set j before Sinkhorn."""
    total = 0.0
    for j, s in enumerate(score_sets):
        b = s.shape[0] // num_crops
        crops = [s[v * b : (v + 1) * b] for v in range(num_crops)]
        set_loss = 0.0
        for i, c in enumerate(assign):
            out = crops[c].detach() if detach_codes else crops[c]
            if queue_scores is not None and queue_scores[j][i] is not None:
                out = torch.cat([queue_scores[j][i].double(), out.double()])
            q = official_reference(out, eps, 3)[-b:]
            if hard:
                q = F.one_hot(q.argmax(dim=1), q.shape[1]).double()
            sub = 0.0
            for v in range(num_crops):
                if v != c:
                    log_p = F.log_softmax(crops[v].double() / temperature, dim=1)
                    sub = sub - (q * log_p).sum(dim=1).mean()
            set_loss = set_loss + sub / (num_crops - 1)
        total = total + set_loss / len(assign)
    return total / len(score_sets)


def random_setup(num_crops=6, b=4, d=8, ks=(10, 7), seed=0):
    """Embeddings on the unit sphere, normalised prototypes, scores = cosine similarities."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(num_crops * b, d, generator=g), dim=1)
    protos = [F.normalize(torch.randn(k, d, generator=g), dim=1) for k in ks]
    scores = [emb @ p.t() for p in protos]
    return emb, protos, scores


# ------------------------------------------------------------------------------------ values


def test_hand_computed_single_image():
    # With one image, Sinkhorn's column step makes every code uniform (1/K): the loss is the
    # mean of -mean_k log_softmax(other crop / T) over the two assignment crops.
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # crop 0, crop 1; B = 1, K = 2
    loss = SwAVLoss(num_crops=2, temperature=1.0)(scores)
    expected = 0.5 * (math.log(2.0) + (math.log(1.0 + math.e) - 0.5))
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_multicrop_two_prototype_sets_match_reference():
    _, _, scores = random_setup(num_crops=6, b=4)
    loss_fn = SwAVLoss(num_crops=6, crops_for_assign=(0, 1))
    loss = loss_fn(scores)
    expected = ref_loss(scores, 6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The mean over sets: each set on its own matches too, and the two differ.
    singles = [SwAVLoss(num_crops=6)(s).item() for s in scores]
    assert singles[0] != pytest.approx(singles[1], rel=1e-3)
    assert loss.item() == pytest.approx(sum(singles) / 2, rel=1e-6)


def test_single_tensor_equals_list_of_one():
    _, _, scores = random_setup(num_crops=3, b=5, ks=(6,))
    loss_fn = SwAVLoss(num_crops=3, crops_for_assign=(0,))
    assert loss_fn(scores[0]).item() == pytest.approx(loss_fn(scores).item(), rel=1e-7)
    assert loss_fn(scores[0]).item() == pytest.approx(
        ref_loss(scores, 3, assign=(0,)).item(), rel=1e-5
    )


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5])
def test_temperature(temperature):
    _, _, scores = random_setup(num_crops=4, b=6, ks=(9,), seed=1)
    loss = SwAVLoss(num_crops=4, temperature=temperature)(scores)
    assert loss.item() == pytest.approx(
        ref_loss(scores, 4, temperature=temperature).item(), rel=1e-5
    )


def test_temperature_changes_the_loss():
    _, _, scores = random_setup(num_crops=4, b=6, ks=(9,), seed=1)
    sharp = SwAVLoss(num_crops=4, temperature=0.1)(scores).item()
    soft = SwAVLoss(num_crops=4, temperature=1.0)(scores).item()
    # At T=1 cosine scores give nearly uniform predictions: close to log K.
    assert soft == pytest.approx(math.log(9), rel=0.05)
    assert abs(sharp - soft) > 0.05


def test_bfloat16_autocast_and_bf16_scores_use_float32_math():
    _, _, scores = random_setup(num_crops=4, b=6, ks=(9,), seed=2)
    loss_fn = SwAVLoss(num_crops=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss_fn(scores)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(loss_fn(scores).item(), rel=1e-6)
    bf16 = [s.bfloat16() for s in scores]
    expected = ref_loss([s.double() for s in bf16], 4)
    assert loss_fn(bf16).item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------- gradients


def test_gradient_flows_to_scores_not_through_codes():
    _, _, scores = random_setup(num_crops=4, b=5, ks=(8,), seed=3)
    x = scores[0].clone().requires_grad_()
    SwAVLoss(num_crops=4)(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    x64 = scores[0].double().requires_grad_()
    ref_loss([x64], 4).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)

    # Had the codes carried gradient, the result would be different: the test can tell.
    y64 = scores[0].double().requires_grad_()
    ref_loss([y64], 4, detach_codes=False).backward()
    assert not torch.allclose(x64.grad, y64.grad, rtol=1e-3, atol=1e-6)


def test_hard_assignment_for_the_first_iterations():
    _, _, scores = random_setup(num_crops=4, b=6, ks=(5,), seed=4)
    loss_fn = SwAVLoss(num_crops=4, temp_hard_assignment_iters=10)
    hard = ref_loss(scores, 4, hard=True).item()
    soft = ref_loss(scores, 4).item()
    assert hard != pytest.approx(soft, rel=1e-3)
    assert loss_fn(scores, iteration=0).item() == pytest.approx(hard, rel=1e-5)
    assert loss_fn(scores, iteration=9).item() == pytest.approx(hard, rel=1e-5)
    assert loss_fn(scores, iteration=10).item() == pytest.approx(soft, rel=1e-5)


# --------------------------------------------------------------------------------------- queue


def queue_loss(queue_length=8, start=0, num_crops=4, d=8):
    return SwAVLoss(
        num_crops=num_crops,
        crops_for_assign=(0, 1),
        queue_length=queue_length,
        queue_start_iter=start,
        embedding_dim=d,
    )


def test_queue_not_used_before_start_iter():
    emb, protos, scores = random_setup(num_crops=4, b=4, ks=(10, 7))
    loss_fn = queue_loss(start=5)
    for it in range(5):
        # No embeddings needed before the start; the loss is the plain one; nothing is stored.
        assert loss_fn(scores, iteration=it).item() == pytest.approx(
            ref_loss(scores, 4).item(), rel=1e-5
        )
        loss_fn(scores, iteration=it, embeddings=emb, prototypes=protos)
    assert loss_fn.num_filled == 0 and int(loss_fn.queue_filled) == 0
    assert torch.count_nonzero(loss_fn.queue) == 0
    with pytest.raises(ValueError, match="embeddings"):
        loss_fn(scores, iteration=5)
    loss_fn(scores, iteration=5, embeddings=emb, prototypes=protos)
    assert loss_fn.num_filled == 4


def test_queue_filled_rows_only_current_prototypes_and_order():
    b, d = 4, 8
    e1, p1, s1 = random_setup(num_crops=4, b=b, d=d, seed=10)
    e2, p2, s2 = random_setup(num_crops=4, b=b, d=d, seed=11)
    e3, p3, s3 = random_setup(num_crops=4, b=b, d=d, seed=12)
    loss_fn = queue_loss(queue_length=12)

    # Step 1: empty queue, the plain loss; then batch 1's crops 0 and 1 are stored.
    assert loss_fn(s1, 0, e1, p1).item() == pytest.approx(ref_loss(s1, 4).item(), rel=1e-5)
    assert loss_fn.num_filled == 4
    torch.testing.assert_close(loss_fn.queue[0, :4], e1[0:4])
    torch.testing.assert_close(loss_fn.queue[1, :4], e1[4:8])

    # Step 2: only the 4 filled rows join, scored with the prototypes of *this* step (p2).
    q_scores = [[e1[0:4] @ p.t(), e1[4:8] @ p.t()] for p in p2]
    expected = ref_loss(s2, 4, queue_scores=q_scores).item()
    stale = ref_loss(s2, 4, queue_scores=[[e1[0:4] @ p.t(), e1[4:8] @ p.t()] for p in p1]).item()
    all_rows = [[torch.cat([e1[0:4], torch.zeros(8, d)]) @ p.t()] * 2 for p in p2]
    with_empty_rows = ref_loss(s2, 4, queue_scores=all_rows).item()
    assert expected != pytest.approx(stale, rel=1e-4)
    assert expected != pytest.approx(with_empty_rows, rel=1e-4)
    assert expected != pytest.approx(ref_loss(s2, 4).item(), rel=1e-4)
    assert loss_fn(s2, 1, e2, p2).item() == pytest.approx(expected, rel=1e-5)

    # Newest first.
    assert loss_fn.num_filled == 8
    torch.testing.assert_close(loss_fn.queue[0, :8], torch.cat([e2[0:4], e1[0:4]]))
    torch.testing.assert_close(loss_fn.queue[1, :8], torch.cat([e2[4:8], e1[4:8]]))

    # Step 3 fills it; step 4 drops the oldest batch.
    loss_fn(s3, 2, e3, p3)
    assert loss_fn.num_filled == 12
    loss_fn(s1, 3, e1, p1)
    assert loss_fn.num_filled == 12
    torch.testing.assert_close(loss_fn.queue[0], torch.cat([e1[0:4], e3[0:4], e2[0:4]]))


def test_queue_shorter_than_batch_keeps_queue_length_rows():
    emb, protos, scores = random_setup(num_crops=4, b=4, seed=13)
    loss_fn = queue_loss(queue_length=3)
    loss_fn(scores, 0, emb, protos)
    assert loss_fn.num_filled == 3 and loss_fn.queue.shape == (2, 3, 8)
    torch.testing.assert_close(loss_fn.queue[0], emb[0:3])
    torch.testing.assert_close(loss_fn.queue[1], emb[4:7])


def test_queue_state_dict_round_trip():
    e1, p1, s1 = random_setup(num_crops=4, b=4, seed=20)
    e2, p2, s2 = random_setup(num_crops=4, b=4, seed=21)
    original = queue_loss(queue_length=12)
    original(s1, 0, e1, p1)
    original(s2, 1, e2, p2)
    state = original.state_dict()
    assert set(state) == {"queue", "queue_filled"}

    restored = queue_loss(queue_length=12)
    restored.load_state_dict(state)
    assert restored.num_filled == 8
    torch.testing.assert_close(restored.queue, original.queue)
    assert restored(s1, 2, e1, p1).item() == pytest.approx(original(s1, 2, e1, p1).item(), rel=1e-7)
    fresh = queue_loss(queue_length=12)
    assert fresh(s1, 2, e1, p1).item() != pytest.approx(restored(s1, 3, e1, p1).item(), rel=1e-4)


def test_queue_input_checks():
    emb, protos, scores = random_setup(num_crops=4, b=4)
    loss_fn = queue_loss()
    with pytest.raises(ValueError, match="prototypes"):
        loss_fn(scores, 0, emb, None)
    with pytest.raises(ValueError, match="prototype matrices"):
        loss_fn(scores, 0, emb, protos[:1])
    with pytest.raises(ValueError, match="embeddings must be"):
        loss_fn(scores, 0, emb[:8], protos)


def test_argument_checks():
    with pytest.raises(ValueError, match="num_crops"):
        SwAVLoss(num_crops=1)
    with pytest.raises(ValueError, match="crops_for_assign"):
        SwAVLoss(num_crops=2, crops_for_assign=(0, 2))
    with pytest.raises(ValueError, match="multiple of num_crops"):
        SwAVLoss(num_crops=3)(torch.randn(8, 5))


# ---------------------------------------------------------------------------------- non-finite


def test_non_finite_loss_dumps_and_raises(tmp_path):
    _, _, scores = random_setup(num_crops=4, b=4, ks=(6,))
    scores[0][3, 2] = float("nan")
    loss_fn = SwAVLoss(num_crops=4, output_dir=str(tmp_path / "run"))
    with pytest.raises(FloatingPointError, match="iteration 17") as info:
        loss_fn(scores, iteration=17)
    message = str(info.value)
    for hint in ("learning rate", "use_double_precision", "epsilon", "AMP"):
        assert hint in message
    dump = torch.load(tmp_path / "run" / "nan_dump_iter17.pt")
    assert dump["iteration"] == 17
    torch.testing.assert_close(dump["scores"][0], scores[0], equal_nan=True)
    assert len(dump["codes"]) == 1 and len(dump["codes"][0]) == 2
    assert dump["codes"][0][0].shape == (4, 6)


def test_non_finite_without_output_dir_still_raises(tmp_path):
    scores = torch.full((8, 5), float("inf"))
    with pytest.raises(FloatingPointError, match="iteration 3"):
        SwAVLoss(num_crops=2)(scores, iteration=3)
