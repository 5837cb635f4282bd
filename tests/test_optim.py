"""LARC against its formula, its optimizer interface, parameter groups and LR schedules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from swav.optim import LARC, constant_schedule, cosine_schedule, param_groups, step_schedule

# ------------------------------------------------------------------------------------- LARC


def larc_grad(w, g, lr, wd, trust, clip, eps=1e-8):
    """apex's LARC gradient for one parameter, float64, from the formula."""
    p_norm, g_norm = w.norm().item(), g.norm().item()
    if p_norm == 0 or g_norm == 0:
        return g.clone()
    a = trust * p_norm / (g_norm + wd * p_norm + eps)
    if clip:
        a = min(a / lr, 1.0)
    return (g + wd * w) * a


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64))
    w2 = nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64) * 0.1)
    grads = [
        [torch.randn(5, 3, generator=g, dtype=torch.float64) * s for s in (0.01, 3.0)],
        [torch.randn(4, generator=g, dtype=torch.float64) * s for s in (5.0, 0.02)],
    ]
    return [w1, w2], grads  # grads[param][step]


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_larc_matches_formula_over_two_momentum_steps(clip, weight_decay):
    lr, momentum, trust = 0.5, 0.9, 0.02
    params, grads = make_params()
    opt = LARC(
        torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
        trust_coefficient=trust,
        clip=clip,
    )
    expected = [p.detach().clone() for p in params]
    bufs = [None, None]
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = grads[i][step].clone()
            d = larc_grad(expected[i], grads[i][step], lr, weight_decay, trust, clip)
            bufs[i] = d if bufs[i] is None else momentum * bufs[i] + d
            expected[i] = expected[i] - lr * bufs[i]
        opt.step()
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["weight_decay"] == weight_decay  # restored after each step


def test_larc_clip_caps_the_effective_lr():
    # A tiny gradient on a large weight: the unclipped trust ratio exceeds 1 / lr.
    w = nn.Parameter(torch.full((3,), 10.0, dtype=torch.float64))
    lr, trust = 0.1, 0.01
    for clip, factor in ((False, trust * w.norm().item() / 1e-3), (True, 1.0)):
        p = nn.Parameter(w.detach().clone())
        p.grad = torch.tensor([1e-3, 0.0, 0.0], dtype=torch.float64)
        LARC(torch.optim.SGD([p], lr=lr), trust_coefficient=trust, clip=clip, eps=0.0).step()
        step = (w.detach() - p.detach())[0].item()
        assert step == pytest.approx(lr * 1e-3 * factor, rel=1e-9)


def test_larc_zero_norms_follow_apex():
    zero_w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    zero_w.grad = torch.ones(3, dtype=torch.float64)
    zero_g = nn.Parameter(torch.ones(3, dtype=torch.float64))
    zero_g.grad = torch.zeros(3, dtype=torch.float64)
    no_grad = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = LARC(torch.optim.SGD([zero_w, zero_g, no_grad], lr=0.1, weight_decay=0.5), clip=True)
    opt.step()
    # Plain gradient, no weight decay, no trust ratio; no gradient, no update at all.
    torch.testing.assert_close(zero_w.detach(), torch.full((3,), -0.1, dtype=torch.float64))
    torch.testing.assert_close(zero_g.detach(), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(no_grad.detach(), torch.ones(3, dtype=torch.float64))


def test_larc_clip_at_zero_lr_and_excluded_group():
    params, grads = make_params(1)
    for p, g in zip(params, grads, strict=True):
        p.grad = g[0].clone()
    before = [p.detach().clone() for p in params]
    opt = LARC(torch.optim.SGD(params, lr=0.0, weight_decay=0.1), clip=True)
    opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)

    # An excluded group is plain SGD with its own weight decay.
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    w.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
    opt = LARC(torch.optim.SGD([{"params": [w], "larc_exclude": True}], lr=0.1, weight_decay=0.5))
    opt.step()
    torch.testing.assert_close(
        w.detach(), torch.tensor([1 - 0.1 * 1.5, 1 - 0.1 * 2.5], dtype=torch.float64)
    )


def _train(opt, params, grads, steps):
    for s in range(steps):
        for i, p in enumerate(params):
            p.grad = grads[i][s % 2].clone()
        opt.step()


def test_larc_state_dict_is_sgds_and_resumes_identically():
    kwargs = dict(lr=0.3, momentum=0.9, weight_decay=1e-4)
    params_a, grads = make_params(2)
    opt_a = LARC(torch.optim.SGD(params_a, **kwargs), trust_coefficient=0.01)
    _train(opt_a, params_a, grads, 2)
    state = copy.deepcopy(opt_a.state_dict())  # as from disk: torch shares buffers otherwise
    plain = torch.optim.SGD(make_params(2)[0], **kwargs)
    plain.load_state_dict(state)  # the same format as a plain SGD's
    assert state.keys() == plain.state_dict().keys()
    assert "momentum_buffer" in state["state"][0]

    params_b = [nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = LARC(
        torch.optim.SGD(params_b, lr=0.0, momentum=0.9, weight_decay=1e-4), trust_coefficient=0.01
    )
    opt_b.load_state_dict(state)
    assert opt_b.param_groups[0]["lr"] == 0.3
    _train(opt_a, params_a, grads, 2)
    _train(opt_b, params_b, grads, 2)
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_larc_is_optimizer_like():
    model = nn.Linear(3, 2)
    opt = LARC(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    for group in opt.param_groups:  # what an LR schedule does
        group["lr"] = 0.25
    assert opt.optim.param_groups[0]["lr"] == 0.25
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.state is opt.optim.state and len(opt.state) == 2
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "LARC" in repr(opt) and "SGD" in repr(opt)


def test_larc_with_grad_scaler_sees_unscaled_gradients():
    # With weight decay the LARC update depends on the gradient's scale, so a scaled gradient
    # reaching LARC would give a different step.
    x = torch.randn(4, 3)
    models = [nn.Linear(3, 2).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [LARC(torch.optim.SGD(m.parameters(), lr=0.5, weight_decay=0.1)) for m in models]
    models[0](x.double()).sum().backward()
    opts[0].step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(models[1](x.double()).sum()).backward()
    scaler.step(opts[1])
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- parameter groups


def test_param_groups():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=1e-6)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-6
    assert {id(p) for p in groups[0]["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    split = param_groups(model, weight_decay=1e-6, exclude_bias_and_norm=True)
    assert [g["weight_decay"] for g in split] == [1e-6, 0.0]
    assert split[0]["params"] == [model[0].weight]
    assert {id(p) for p in split[1]["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
    }
    torch.optim.SGD(split, lr=0.1)  # accepted as is


# ---------------------------------------------------------------------------------- schedules


def test_cosine_schedule_swav_8node_resnet():
    iters_per_epoch, epochs, warmup_epochs = 313, 400, 10
    total, warmup = iters_per_epoch * epochs, iters_per_epoch * warmup_epochs
    sched = cosine_schedule(4.8, 0.0048, total, warmup_iters=warmup, warmup_start_value=0.3)
    assert sched.dtype == np.float64 and sched.shape == (total,)
    assert sched[0] == 0.3
    assert sched[warmup] == pytest.approx(4.8, rel=1e-15)
    assert sched[-1] == pytest.approx(0.0048, rel=1e-12)
    assert np.all(np.diff(sched[: warmup + 1]) > 0)
    np.testing.assert_allclose(np.diff(sched[:warmup]), (4.8 - 0.3) / warmup)
    assert np.all(np.diff(sched[warmup:]) <= 0)
    mid = warmup + (total - warmup - 1) // 2
    assert sched[mid] == pytest.approx((4.8 + 0.0048) / 2, rel=1e-4)


def test_cosine_schedule_edges():
    np.testing.assert_allclose(cosine_schedule(1.0, 0.0, 3), [1.0, 0.5, 0.0], atol=1e-15)
    np.testing.assert_allclose(cosine_schedule(2.0, 1.0, 3, warmup_iters=2), [0.0, 1.0, 2.0])
    np.testing.assert_allclose(cosine_schedule(2.0, 1.0, 2, warmup_iters=2), [0.0, 1.0])
    assert cosine_schedule(1.0, 0.0, 0).shape == (0,)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 5, warmup_iters=6)


def test_step_and_constant_schedules():
    sched = step_schedule(0.1, 10, [3, 7], gamma=0.5)
    np.testing.assert_allclose(sched, [0.1] * 3 + [0.05] * 4 + [0.025] * 3)
    assert sched.dtype == np.float64
    np.testing.assert_allclose(step_schedule(1.0, 4, [], gamma=0.1), np.ones(4))
    const = constant_schedule(0.3, 5)
    assert const.dtype == np.float64 and np.all(const == 0.3) and const.shape == (5,)
