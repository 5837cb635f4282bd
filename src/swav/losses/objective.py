"""What the training loop needs of a method: one small interface every objective implements.

The loop does not know which method runs. Each step it hands the objective the model's outputs for
the batch (embeddings, prototype scores, the prototypes themselves) with the images' dataset
indices, and gets a scalar loss back. Per-rank state (SwAV's queue; a memory bank) lives in the
objective's buffers, so it is saved with the checkpoint through ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class StepOutputs:
    """The model's outputs for one batch, float32, crops stacked crop-major (crop 0 of every image,
    then crop 1, ...)."""

    embeddings: Tensor  # [num_crops * B, D], L2-normalised, with gradient
    scores: list[Tensor]  # per prototype head: [num_crops * B, K_j], with gradient
    prototypes: list[Tensor]  # per head: [K_j, D], detached
    indices: Tensor | None = None  # [B] dataset index of each image (methods with per-image targets)


class Objective(nn.Module):
    """A method's loss. Subclasses implement ``step``; the rest has defaults that do nothing."""

    def step(self, outputs: StepOutputs, iteration: int) -> Tensor:
        """The scalar loss of one batch; its gradient trains the model."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch: where methods with an assignment phase compute their targets."""

    def collapse_level(self) -> float | None:
        """The loss value that means nothing was learned (uniform predictions), or None: the
        training log warns when the loss stays there."""
        return None
