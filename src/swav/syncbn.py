"""Synchronised BatchNorm: statistics over the batches of several processes, on CPU and CUDA.

torch.nn.SyncBatchNorm refuses CPU tensors, so on a CPU every BatchNorm becomes CPUSyncBatchNorm,
which all-reduces its statistics itself (one differentiable all-reduce per call).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from swav.config import ConfigError
from swav.distributed import is_distributed


def sync_bn_groups(world: int, local_world: int, group_size: int) -> list[list[int]]:
    """Ranks whose BatchNorm statistics are shared: -1 = each node, 0 = all, N = consecutive groups of N."""
    if group_size == 0:
        size = world
    elif group_size == -1:
        size = local_world
    elif group_size > 0:
        size = group_size
    else:
        raise ConfigError(f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE={group_size}: use -1 (per node), 0 (all) or N > 0")
    if world % size:
        raise ConfigError(
            f"config.MODEL.SYNC_BN_CONFIG.GROUP_SIZE: groups of {size} do not divide {world} processes"
        )
    return [list(range(start, start + size)) for start in range(0, world, size)]


def sync_bn_process_group(group_size: int, local_world: int):
    """This rank's SyncBatchNorm group (every rank creates every group, in the same order)."""
    world, me = dist.get_world_size(), dist.get_rank()
    groups = sync_bn_groups(world, local_world, group_size)
    if len(groups) == 1:
        return None  # the default group: all processes
    mine = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: every process's output depends on every input, so the
    gradient of an input is the sum of the output gradients of all processes."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the batches of all processes in `process_group`, for CPU.

    `torch.nn.SyncBatchNorm` refuses CPU tensors. Each process sends its count, mean times count
    and centred sum of squares plus count times mean squared in one all-reduce; the all-reduce
    is differentiable, so autograd gives the exact gradient of BatchNorm over the union of the batches.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32)
        mean = xf.mean(dims)
        m2 = ((xf - mean.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
        # Parallel variance: sum_r [M2_r + n_r m_r^2] - N m^2, cancellation only among rank means.
        stats = _AllReduceSum.apply(torch.cat([count * mean, m2 + count * mean * mean, count]), self.process_group)
        c = self.num_features
        total = stats[-1]
        g_mean = stats[:c] / total
        g_var = (stats[c : 2 * c] / total - g_mean * g_mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = g_var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(g_mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, -1, *[1] * (x.dim() - 2))
        y = (xf - g_mean.view(shape)) * torch.rsqrt(g_var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group, device_type: str) -> nn.Module:
    """Every BatchNorm in `module` synchronised over `process_group` (torch's on CUDA, ours on CPU)."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group, device_type))
    return module
