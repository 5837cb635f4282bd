"""LARC (layer-wise adaptive rate control) around any torch optimizer, as apex implements it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LARC:
    """Rescale each parameter's gradient by its trust ratio, then let the inner optimizer step.

    For every parameter ``w`` with a gradient ``g`` in a group with weight decay ``wd`` and
    learning rate ``lr`` (apex's semantics, so the paper's LARC settings mean the same here)::

        a = trust_coefficient * |w| / (|g| + wd * |w| + eps)
        if clip: a = min(a / lr, 1)          # the effective LR becomes min(a * lr, lr)
        g = (g + wd * w) * a

    and the inner optimizer steps with its weight decay set to 0 (restored afterwards), since the
    decay is already in ``g``. As in apex, a parameter whose weight or gradient norm is zero is
    left alone: plain ``g`` and no weight decay. A group with ``"larc_exclude": True`` is left
    entirely to the inner optimizer (apex has no such flag: it adapts every group).

    Behaves like an optimizer: ``param_groups`` (LR schedules write ``group["lr"]``), ``state``,
    ``state_dict`` (the inner optimizer's, so it loads into a plain SGD too), ``zero_grad``, ``step``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        trust_coefficient: float = 0.001,
        clip: bool = False,
        eps: float = 1e-8,
    ) -> None:
        self.optim = optimizer
        self.trust_coefficient = float(trust_coefficient)
        self.clip = bool(clip)
        self.eps = float(eps)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optim.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optim.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, eps={self.eps},\n"
            f"{self.optim!r})"
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved: list[tuple[dict[str, Any], float]] = []
        try:
            for group in self.optim.param_groups:
                if group.get("larc_exclude", False):
                    continue
                weight_decay = group.get("weight_decay", 0.0)
                saved.append((group, weight_decay))
                group["weight_decay"] = 0.0
                self._adapt_gradients(group, weight_decay)
            self.optim.step()
        finally:
            for group, weight_decay in saved:
                group["weight_decay"] = weight_decay
        return loss

    def _adapt_gradients(self, group: dict[str, Any], weight_decay: float) -> None:
        params: list[nn.Parameter] = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        # One fused norm per list instead of two kernels per parameter.
        p_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = self.trust_coefficient * p_norm / (g_norm + weight_decay * p_norm + self.eps)
        if self.clip:
            lr = group["lr"]
            # lr == 0 (warm-up start): a / lr is inf, so min(., 1) is 1.
            ratio = (ratio / lr).clamp(max=1.0) if lr > 0 else torch.ones_like(ratio)
        adapt = (p_norm != 0) & (g_norm != 0)
        scale = torch.where(adapt, ratio, torch.ones_like(ratio))
        if weight_decay != 0:
            decay = torch.where(
                adapt, torch.full_like(ratio, weight_decay), torch.zeros_like(ratio)
            )
            torch._foreach_add_(grads, torch._foreach_mul(params, list(decay.unbind())))
        torch._foreach_mul_(grads, list(scale.unbind()))
