"""The self-supervised model: a trunk that gives features and the head(s) that use them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def group_by_resolution(crops: Sequence[Tensor]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of consecutive crops that share their spatial size."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class SSLModel(nn.Module):
    """Multi-crop wrapper: ``trunk`` maps images to features, ``heads[0]`` maps features to an
    embedding and prototype scores."""

    def __init__(self, trunk: nn.Module, heads: nn.ModuleList) -> None:
        super().__init__()
        if len(heads) != 1:
            # Several heads (e.g. one per trunk stage) are a VISSL feature we do not use yet.
            raise ValueError(f"SSLModel supports exactly one head, got {len(heads)}")
        self.trunk = trunk
        self.heads = heads

    def forward(self, crops: Sequence[Tensor] | Tensor) -> tuple[Tensor, list[Tensor]]:
        """Embeddings ``[V*B, D]`` and scores ``[V*B, K_i]``, crop-major (all images' crop 0,
        then crop 1, ...).

        The trunk runs once per group of consecutive same-size crops, so BatchNorm statistics
        are per resolution and the large crops share one call; the head runs once on all.
        """
        if isinstance(crops, Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("SSLModel needs at least one crop")
        feats = []
        for start, end in group_by_resolution(crops):
            # torch.cat keeps channels_last when every input is channels_last.
            x = crops[start] if end - start == 1 else torch.cat(list(crops[start:end]))
            feats.append(self.trunk(x))
        feats = feats[0] if len(feats) == 1 else torch.cat(feats)
        return self.heads[0](feats)

    def normalize_prototypes(self) -> None:
        self.heads[0].normalize_prototypes()

    def prototype_weights(self) -> list[Tensor]:
        return self.heads[0].prototype_weights()
