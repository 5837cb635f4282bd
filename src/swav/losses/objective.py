"""What the training loop needs of a method: one small interface every objective implements.

The loop does not know which method runs. Each step it hands the objective the model's outputs for
the batch (embeddings, prototype scores, the prototypes themselves) with the images' dataset
indices, and gets a scalar loss back. Per-rank state (SwAV's queue; a memory bank) lives in the
objective's buffers, so it is saved with the checkpoint through ``state_dict``. Before each epoch
the loop calls ``start_epoch`` with an ``EpochContext``: what an assignment phase may ask of the
model there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class StepOutputs:
    """The model's outputs for one batch, float32, crops stacked crop-major (crop 0 of every image,
    then crop 1, ...)."""

    embeddings: Tensor  # [num_crops * B, D], L2-normalised, with gradient
    scores: list[Tensor]  # per prototype head: [num_crops * B, K_j], with gradient
    prototypes: list[Tensor]  # per head: [K_j, D], detached
    indices: Tensor | None = None  # [B] dataset index of each image (methods with per-image targets)
    # Whether the objective reads its loss to stop at the first non-finite one. Reading a GPU tensor
    # waits for the step's kernels, so on a GPU the training loop checks once per logging window instead.
    check_finite: bool = True


@dataclass
class EpochContext:
    """The model, as far as an assignment phase at the start of an epoch needs it.

    ``embed(crops)`` runs this rank's images of the epoch (all of them, in the epoch's order, whole
    batches, as the steps will see them) through the model without gradient and returns
    ``(indices [N], embeddings [len(crops), N, D])``: L2-normalised float32 embeddings of the
    given crops. It costs a pass over the data, so objectives call it only when they must.
    ``prototypes()`` are the model's prototype matrices ``[K_j, D]``, detached, as they are now.
    """

    embed: Callable[[Sequence[int]], tuple[Tensor, Tensor]]
    prototypes: Callable[[], list[Tensor]]


class Objective(nn.Module):
    """A method's loss. Subclasses implement ``step``; the rest has defaults that do nothing."""

    def step(self, outputs: StepOutputs, iteration: int) -> Tensor:
        """The scalar loss of one batch; its gradient trains the model."""
        raise NotImplementedError

    def start_epoch(self, epoch: int, context: EpochContext | None = None) -> None:
        """Called before each epoch (also the epoch a run resumes in): where methods with an
        assignment phase compute their targets."""

    def collapse_level(self) -> float | None:
        """The loss value that means nothing was learned (uniform predictions), or None: the
        training log warns when the loss stays there."""
        return None


NON_FINITE_ADVICE = (
    "Try: a lower learning rate (or a longer warm-up); check the data for NaN/inf images; disable AMP "
    "(config.MODEL.AMP_PARAMS.USE_AMP=false)."
)


def check_finite_loss(loss: Tensor, method: str, iteration: int, check: bool = True) -> Tensor:
    """Stop at the first non-finite loss with what to try (when `check`: it is a host sync)."""
    if check and not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"{method} loss is {loss.item()} at iteration {iteration}. {NON_FINITE_ADVICE}")
    return loss
