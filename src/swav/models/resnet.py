"""ResNet / ResNeXt / wide ResNet trunk with torchvision parameter names and no classifier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

# depth -> (block, blocks per stage); the variants are data, not classes.
RESNET_ARCHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

STAGE_NAMES = ("conv1", "res2", "res3", "res4", "res5")


def stem_channels(width_multiplier: float) -> int:
    """Channels of the stem, ``64 * width_multiplier``, which must be a whole number."""
    channels = 64 * width_multiplier
    if width_multiplier <= 0 or channels != round(channels):
        raise ValueError(
            f"width_multiplier must be positive and make 64 * width_multiplier a whole number "
            f"(for instance 0.25, 0.5, 1, 2), got {width_multiplier}"
        )
    return round(channels)


def resnet_num_features(depth: int, width_multiplier: float = 1) -> int:
    """Width of the pooled trunk output, e.g. 2048 for R50, 4096 for R50-w2, 512 for R18."""
    if depth not in RESNET_ARCHS:
        raise ValueError(
            f"ResNet depth {depth} is not supported; choose one of {sorted(RESNET_ARCHS)}"
        )
    block, _ = RESNET_ARCHS[depth]
    return stem_channels(width_multiplier) * 8 * block.expansion


class ResNet(nn.Module):
    """ResNet trunk returning globally average-pooled features.

    ``width_multiplier`` scales every width (stem and all stages) as in the SwAV paper's
    R50-w2/w4/w5 (a fraction such as 0.5 gives a narrower trunk, cheaper on a CPU); ``groups``/``width_per_group`` give ResNeXt (32 and 4 for ResNeXt-50 32x4d).
    ``small_stem`` replaces the 7x7/2 convolution and max-pool with one 3x3 convolution of stride
    ``small_stem_stride``, for 32-px images: stride 1 keeps the full resolution, stride 2 halves
    every map (a quarter of the cost, twice the ImageNet stem's resolution). Parameter names equal torchvision's, minus ``fc``.
    """

    def __init__(
        self,
        depth: int = 50,
        width_multiplier: float = 1,
        groups: int = 1,
        width_per_group: int = 64,
        small_stem: bool = False,
        zero_init_residual: bool = False,
        small_stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if depth not in RESNET_ARCHS:
            raise ValueError(
                f"ResNet depth {depth} is not supported; choose one of {sorted(RESNET_ARCHS)}"
            )
        block, layers = RESNET_ARCHS[depth]
        if block is BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError(
                f"ResNet-{depth} uses basic blocks, which support only groups=1 and "
                f"width_per_group=64 (got {groups} and {width_per_group}); use depth >= 50 for ResNeXt"
            )
        if small_stem_stride not in (1, 2):
            raise ValueError(f"small_stem_stride must be 1 or 2, got {small_stem_stride}")
        if small_stem_stride != 1 and not small_stem:
            raise ValueError("small_stem_stride applies to the small stem only: set small_stem=True")
        self.depth = depth
        self.groups = groups
        self.width_per_group = width_per_group

        stem_width = stem_channels(width_multiplier)
        if small_stem:
            self.conv1 = nn.Conv2d(
                3, stem_width, kernel_size=3, stride=small_stem_stride, padding=1, bias=False
            )
        else:
            self.conv1 = nn.Conv2d(3, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        # Identity keeps the module tree (and state dict) identical with either stem.
        self.maxpool = (
            nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )

        self._inplanes = stem_width
        self.layer1 = self._make_layer(block, stem_width, layers[0], stride=1)
        self.layer2 = self._make_layer(block, stem_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, stem_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, stem_width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features: int = self._inplanes
        del self._inplanes

        self._init_weights(zero_init_residual)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self._inplanes != out_channels:
            downsample = nn.Sequential(
                conv1x1(self._inplanes, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        kwargs = {"groups": self.groups, "base_width": self.width_per_group}
        stage = [block(self._inplanes, planes, stride, downsample, **kwargs)]
        self._inplanes = out_channels
        stage += [block(out_channels, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual block then starts as the identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_stages(self, x: Tensor, names: Sequence[str] = ("res5",)) -> dict[str, Tensor]:
        """Unpooled feature maps of the named stages (``conv1`` is after the stem ReLU, before
        the max-pool; ``res2``..``res5`` are the outputs of ``layer1``..``layer4``)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in STAGE_NAMES]
        if unknown or not names:
            raise ValueError(f"unknown stage names {unknown}; choose from {list(STAGE_NAMES)}")
        last = max(STAGE_NAMES.index(n) for n in names)
        out: dict[str, Tensor] = {}
        x = self.relu(self.bn1(self.conv1(x)))
        if "conv1" in names:
            out["conv1"] = x
        x = self.maxpool(x)
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        # Stop after the deepest stage asked for; nothing downstream modifies these maps in place.
        for name, layer in zip(STAGE_NAMES[1 : last + 1], layers, strict=False):
            x = layer(x)
            if name in names:
                out[name] = x
        return {n: out[n] for n in names}

    def forward(self, x: Tensor) -> Tensor:
        """Global average pooled features ``[B, num_features]``."""
        x = self.forward_stages(x, ("res5",))["res5"]
        return torch.flatten(self.avgpool(x), 1)
