"""SeLa-v2 (appendix D): pseudo-labels from Sinkhorn-Knopp over last epoch's embeddings of the
whole dataset against the learned prototypes, then a classification loss, as in SwAV's training.

There is no reference implementation: appendix D describes the method in a few lines. Where it is
silent, this is our reading (the README lists each choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from swav.losses.clustering import PseudoLabelObjective
from swav.losses.collectives import row_counts
from swav.losses.objective import EpochContext, StepOutputs
from swav.losses.sinkhorn import sinkhorn

# Bank rows scored against the prototypes per matrix product while the score buffer is filled.
_ROWS_PER_PRODUCT = 1 << 14


@torch.no_grad()
def sinkhorn_labels(bank: Tensor, prototypes: Tensor, epsilon: float = 0.05, num_iters: int = 3) -> Tensor:
    """``[N]`` labels: the argmax of the Sinkhorn codes of ``bank [N, D]`` against ``prototypes
    [K, D]`` (both L2-normalised). With a process group, ``bank`` is this rank's rows and the
    equal partition is over the rows of all ranks (``sinkhorn`` all-reduces its sums).

    Memory: the one ``[N, K]`` float32 score buffer is filled in blocks of rows and then worked
    on in place by ``sinkhorn(..., overwrite=True)``, so the peak is ``4 N K`` bytes plus vectors
    of ``N`` and ``K`` (and the bank itself, ``4 N D`` bytes per crop). For ImageNet-1k on 64
    ranks (1.28 M images, 20,018 per rank) and 3000 prototypes per head: 20,018 x 3000 x 4 B =
    240 MB per rank, one head at a time (the three heads run one after another).

    Every rank must hold as many rows (``sinkhorn`` takes the total as rows x ranks), which the
    banks do: each rank trains on as many images per epoch.
    """
    counts = row_counts(bank.shape[0], bank.device)
    if len(set(counts)) > 1:
        raise ValueError(f"the ranks hold {counts} bank rows: Sinkhorn over all of them needs as many on each")
    scores = bank.new_empty(bank.shape[0], prototypes.shape[0], dtype=torch.float32)
    weights = prototypes.float().t()
    for start in range(0, bank.shape[0], _ROWS_PER_PRODUCT):
        part = bank[start : start + _ROWS_PER_PRODUCT].float()
        torch.mm(part, weights, out=scores[start : start + part.shape[0]])
    return sinkhorn(scores, epsilon, num_iters, overwrite=True).argmax(dim=1)


class SeLaV2Loss(PseudoLabelObjective):
    """At each epoch start, per head ``h``: the memory banks of all ranks are scored against the
    head's current prototypes (L2-normalised, as the steps use them), ``sinkhorn`` with
    ``epsilon`` and ``num_iters`` spreads the images evenly over the prototypes, and each image's
    label is its argmax. Each step, every crop is classified into its image's label from the
    model's prototype scores; the prototypes are the model's and are learned by SGD, as in SwAV.
    """

    def __init__(
        self,
        num_crops: int,
        num_clusters: Sequence[int] = (3000, 3000, 3000),
        crops_for_mb: Sequence[int] = (0,),
        embedding_dim: int = 128,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        num_iters: int = 3,
    ) -> None:
        super().__init__(num_crops, num_clusters, crops_for_mb, embedding_dim, temperature)
        if epsilon <= 0 or num_iters < 1:
            raise ValueError(f"epsilon={epsilon} must be positive and num_iters={num_iters} >= 1")
        self.epsilon = float(epsilon)
        self.num_iters = int(num_iters)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, epsilon={self.epsilon}, num_iters={self.num_iters}"

    @torch.no_grad()
    def assign(self, epoch: int, context: EpochContext | None) -> Tensor:
        if context is None:
            raise RuntimeError("SeLaV2Loss.start_epoch needs the EpochContext: the labels come from the prototypes")
        prototypes = context.prototypes()
        shapes = [tuple(p.shape) for p in prototypes]
        if shapes != [(k, self.embedding_dim) for k in self.num_clusters]:
            raise ValueError(
                f"the model's prototypes are {shapes}, but sela_v2_loss has heads of {list(self.num_clusters)} "
                f"clusters of dimension {self.embedding_dim}"
            )
        labels = []
        for h, weights in enumerate(prototypes):
            bank = self.bank[h % len(self.crops_for_mb)]
            labels.append(sinkhorn_labels(bank, F.normalize(weights.float(), dim=1), self.epsilon, self.num_iters))
        return torch.stack(labels)

    def head_scores(self, outputs: StepOutputs) -> list[Tensor]:
        return outputs.scores
