"""DeepCluster-v2 (appendix D): pseudo-labels from spherical k-means on last epoch's embeddings,
and the k-means centroids as the (never trained) classification head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from swav.losses.clustering import PseudoLabelObjective
from swav.losses.kmeans import spherical_kmeans
from swav.losses.objective import EpochContext, StepOutputs


class DeepClusterV2Loss(PseudoLabelObjective):
    """At each epoch start, per head ``h``: k-means with ``num_clusters[h]`` clusters over the
    memory banks of all ranks (``kmeans_iters`` rounds); the centroids become that head's
    prototypes and the cluster ids the images' labels. Each step, every crop's embedding is scored
    against the centroids (cosine similarity) and classified into its image's cluster.

    The centroids are buffers of this loss, not parameters of the model: the optimizer never sees
    them, and they are saved with the bank in the checkpoint. The model's head therefore has no
    prototypes (``num_clusters: []``). Paper: 3 heads of 3000 clusters, temperature 0.1.
    """

    def __init__(
        self,
        num_crops: int,
        num_clusters: Sequence[int] = (3000, 3000, 3000),
        crops_for_mb: Sequence[int] = (0,),
        embedding_dim: int = 128,
        temperature: float = 0.1,
        kmeans_iters: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(num_crops, num_clusters, crops_for_mb, embedding_dim, temperature)
        if kmeans_iters < 1:
            raise ValueError(f"kmeans_iters={kmeans_iters} must be >= 1")
        self.kmeans_iters = int(kmeans_iters)
        self.seed = int(seed)
        for h, k in enumerate(self.num_clusters):
            self.register_buffer(f"centroids{h}", torch.zeros(k, self.embedding_dim))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kmeans_iters={self.kmeans_iters}"

    def centroids(self) -> list[Tensor]:
        return [getattr(self, f"centroids{h}") for h in range(len(self.num_clusters))]

    def kmeans_seed(self, epoch: int, head: int) -> int:
        # Another start per epoch and head, the same in an uninterrupted and a resumed run.
        return (self.seed * 100_003 + epoch) * 101 + head

    @torch.no_grad()
    def assign(self, epoch: int, context: EpochContext | None) -> Tensor:
        labels = []
        for h, (k, centroids) in enumerate(zip(self.num_clusters, self.centroids(), strict=True)):
            bank = self.bank[h % len(self.crops_for_mb)]
            found, assignments = spherical_kmeans(bank, k, self.kmeans_iters, seed=self.kmeans_seed(epoch, h))
            centroids.copy_(found)
            labels.append(assignments)
        return torch.stack(labels)

    def head_scores(self, outputs: StepOutputs) -> list[Tensor]:
        # Gradient flows into the embeddings only: the centroids are plain buffers.
        return [outputs.embeddings @ c.t() for c in self.centroids()]
