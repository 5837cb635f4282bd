"""SwAV head: MLP projection, L2-normalised embedding, and prototype scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwAVHead(nn.Module):
    """Projection MLP followed by one or more sets of prototypes.

    ``dims=[2048, 2048, 128]`` gives Linear(2048, 2048)-BN-ReLU-Linear(2048, 128); a single
    entry means no projection. Each entry of ``num_clusters`` adds a bias-free linear layer
    ``prototypes{i}`` (VISSL's names, so VISSL checkpoints load) whose rows are the prototypes;
    none gives the plain projection (the ``mlp`` head of methods without prototypes, like SimCLR).
    """

    def __init__(
        self,
        dims: Sequence[int],
        use_bn: bool = True,
        num_clusters: Sequence[int] = (3000,),
        normalize_feats: bool = True,
    ) -> None:
        super().__init__()
        dims = [int(d) for d in dims]
        if not dims:
            raise ValueError("dims must hold at least the input dimension")
        self.dims = dims
        self.normalize_feats = normalize_feats

        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.ReLU(inplace=True))
        self.projection_head = nn.Sequential(*layers) if layers else nn.Identity()

        self.num_clusters = [int(k) for k in num_clusters]
        for i, k in enumerate(self.num_clusters):
            self.add_module(f"prototypes{i}", nn.Linear(dims[-1], k, bias=False))

    def prototype_layers(self) -> list[nn.Linear]:
        return [getattr(self, f"prototypes{i}") for i in range(len(self.num_clusters))]

    def prototype_weights(self) -> list[Tensor]:
        """The prototype matrices ``[K_i, D]`` (parameters, not copies)."""
        return [layer.weight for layer in self.prototype_layers()]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise every prototype (row) in place; done before each forward pass."""
        for w in self.prototype_weights():
            w.copy_(F.normalize(w, dim=1, p=2))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Embedding ``[B, dims[-1]]`` and one score matrix ``[B, K_i]`` per prototype set."""
        z = self.projection_head(x)
        if self.normalize_feats:
            z = F.normalize(z, dim=1, p=2)
        return z, [layer(z) for layer in self.prototype_layers()]
