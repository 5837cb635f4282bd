"""SimCLR's contrastive loss extended to several crops per image (SwAV appendix A.8).

Every crop is an anchor; the other crops of its image are its positives, the crops of every other
image in the global batch its negatives. With several processes the embeddings of all of them are
gathered (with gradient), so one step sees the same negatives as one process with the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from swav.losses.collectives import is_distributed, rank_and_world
from swav.losses.objective import Objective, StepOutputs, check_finite_loss


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: the tensors of every rank, stacked ``[world, *shape]``. Backward: this rank's
    slice of the gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # Each rank's loss uses every rank's rows (as negatives, and its own anchors' positives),
        # so the gradient of this rank's rows is the sum of what the losses of all ranks send
        # back to them: a plain slice of the local gradient would drop the other ranks' terms.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """``[world, *x.shape]``: ``x`` of every rank (the same shape on each), in rank order.

    Gradients flow: backward gives each rank the gradient of its own ``x`` summed over all ranks'
    losses. Without a process group: ``x[None]``.
    """
    if not is_distributed():
        return x.unsqueeze(0)
    return _AllGatherWithGrad.apply(x, group)


def global_crop_major(gathered: Tensor, num_crops: int) -> Tensor:
    """Per-rank crop-major rows ``[world, num_crops * B, D]`` -> the global batch
    ``[num_crops * world * B, D]``, crop-major too: crop 0 of rank 0's images, of rank 1's, ...,
    then crop 1. One process with the ranks' images concatenated in rank order has these rows."""
    world, rows, dim = gathered.shape
    per_crop = gathered.view(world, num_crops, rows // num_crops, dim).transpose(0, 1)
    return per_crop.reshape(world * rows, dim)


def rank_rows(num_crops: int, batch: int, world: int, rank: int, device=None) -> Tensor:
    """The rows of rank ``rank``'s images in the global crop-major batch, crop by crop."""
    crop_start = torch.arange(num_crops, device=device).unsqueeze(1) * world * batch
    return (crop_start + rank * batch + torch.arange(batch, device=device)).reshape(-1)


def multicrop_info_nce(
    z: Tensor, num_crops: int, temperature: float, anchors: Tensor | None = None
) -> Tensor:
    """SimCLR's InfoNCE with several positives per anchor, as a scalar.

    ``z``: L2-normalised embeddings ``[num_crops * B, D]`` stacked crop-major (row ``c * B + b``
    is crop ``c`` of image ``b``). For anchor ``i`` the positives are the other ``num_crops - 1``
    crops of its image, the negatives every crop of every other image; the loss is the mean over
    anchors and their positives ``p`` of
    ``-log(exp(z_i.z_p/T) / (exp(z_i.z_p/T) + sum_n exp(z_i.z_n/T)))``: the other positives are
    not in the denominator. ``anchors``: the rows whose terms are averaged (default: all), which
    is how each process takes its own share of the global batch.

    Runs in float32 at least (float64 stays float64), outside autocast.
    """
    if z.ndim != 2 or num_crops < 2 or z.shape[0] % num_crops:
        raise ValueError(
            f"embeddings must be [num_crops * B, D] with num_crops >= 2 (the other crops are the "
            f"positives); got {tuple(z.shape)} for num_crops={num_crops}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    rows = z.shape[0]
    batch = rows // num_crops
    if batch < 2:
        raise ValueError("the batch needs at least 2 images: the negatives are the other images' crops")
    if anchors is None:
        anchors = torch.arange(rows, device=z.device)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        logits = z[anchors] @ z.t() / temperature  # [A, N]
        image = torch.arange(rows, device=z.device) % batch
        anchor_image = image[anchors]
        # Same image: the anchor itself and its positives, none of them a negative.
        same = anchor_image.unsqueeze(1) == image.unsqueeze(0)
        negatives = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1)  # [A]
        shifts = torch.arange(1, num_crops, device=z.device)
        positive_crops = (anchors.unsqueeze(1) // batch + shifts) % num_crops  # [A, M - 1]
        positives = logits.gather(1, positive_crops * batch + anchor_image.unsqueeze(1))
        # -log(e^p / (e^p + e^n)) = log(1 + e^(n - p)) = softplus(n - p), with n the negatives'
        # log-sum-exp: no exponential of a large logit is ever formed.
        return F.softplus(negatives.unsqueeze(1) - positives).mean()


class SimCLRLoss(Objective):
    """SimCLR with multi-crop: ``multicrop_info_nce`` over the global batch.

    Each process computes the terms of its own images' crops as anchors against the rows of all
    processes (the [local, global] similarity block, not the [global, global] matrix), so its
    loss is its share's mean. The loop logs the mean over processes, the global loss; and with the
    gather's summed backward, DistributedDataParallel's average of the gradients is the gradient
    of the global loss: two processes of batch B step like one process of batch 2B.

    ``embedding_dim`` is only checked against the embeddings, so that a head of another width
    fails with a clear message.
    """

    def __init__(self, num_crops: int, temperature: float = 0.1, embedding_dim: int = 128) -> None:
        super().__init__()
        if num_crops < 2:
            raise ValueError(f"num_crops={num_crops}: the other crops of an image are its positives, so at least 2")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be positive")
        self.num_crops = int(num_crops)
        self.temperature = float(temperature)
        self.embedding_dim = int(embedding_dim)

    def extra_repr(self) -> str:
        return f"num_crops={self.num_crops}, temperature={self.temperature}, embedding_dim={self.embedding_dim}"

    def step(self, outputs: StepOutputs, iteration: int) -> Tensor:
        return check_finite_loss(self(outputs.embeddings), "SimCLR", iteration, outputs.check_finite)

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scalar loss of this process's anchors; ``embeddings`` ``[num_crops * B, D]`` crop-major."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must be [num_crops * B, {self.embedding_dim}], got {tuple(embeddings.shape)}"
            )
        if embeddings.shape[0] % self.num_crops:
            raise ValueError(f"{embeddings.shape[0]} rows are not a multiple of num_crops={self.num_crops}")
        if not is_distributed():
            return multicrop_info_nce(embeddings, self.num_crops, self.temperature)
        rank, world = rank_and_world()
        # Gathered with gradient: the other processes' crops are negatives whose gradient must
        # reach the process that computed them.
        z = global_crop_major(gather_with_grad(embeddings), self.num_crops)
        batch = embeddings.shape[0] // self.num_crops
        anchors = rank_rows(self.num_crops, batch, world, rank, device=embeddings.device)
        return multicrop_info_nce(z, self.num_crops, self.temperature, anchors)

    def collapse_level(self) -> float | None:
        # Embeddings that all agree give ln(N - M + 1) (N crops in the global batch, M per image),
        # which this module cannot know before the first batch, and the loop's warning advises on
        # prototypes and codes, which SimCLR has none of.
        return None
