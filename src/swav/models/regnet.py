"""RegNet trunk (Radosavovic et al. 2020) from torchvision's building blocks, without classifier.

A RegNet is given by name (``regnet_y_400mf``, ``regnet_y_16gf``, ``regnet_y_128gf``, ...: the
parameters torchvision uses for that name) or by its generating parameters ``depth, w_0, w_a,
w_m, group_width`` (plus ``bottleneck_multiplier`` and ``se_ratio``; RegNetY: 1.0 and 0.25).
The SwAV guide's RegNetY-256GF is ``depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373``:
10444 output channels. Parameter names equal torchvision's, minus ``fc``, so weights move both ways.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.regnet import AnyStage, BlockParams, ResBottleneckBlock, SimpleStemIN

# name -> generating parameters; the variants are data (torchvision's values for these names).
REGNET_ARCHS: dict[str, dict[str, float]] = {
    "regnet_y_400mf": dict(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, se_ratio=0.25),
    "regnet_y_800mf": dict(depth=14, w_0=56, w_a=38.84, w_m=2.4, group_width=16, se_ratio=0.25),
    "regnet_y_1_6gf": dict(depth=27, w_0=48, w_a=20.71, w_m=2.65, group_width=24, se_ratio=0.25),
    "regnet_y_3_2gf": dict(depth=21, w_0=80, w_a=42.63, w_m=2.66, group_width=24, se_ratio=0.25),
    "regnet_y_8gf": dict(depth=17, w_0=192, w_a=76.82, w_m=2.19, group_width=56, se_ratio=0.25),
    "regnet_y_16gf": dict(depth=18, w_0=200, w_a=106.23, w_m=2.48, group_width=112, se_ratio=0.25),
    "regnet_y_32gf": dict(depth=20, w_0=232, w_a=115.89, w_m=2.53, group_width=232, se_ratio=0.25),
    "regnet_y_128gf": dict(depth=27, w_0=456, w_a=160.83, w_m=2.52, group_width=264, se_ratio=0.25),
    # Not in torchvision: the SwAV guide's RegNetY-256GF (SEER).
    "regnet_y_256gf": dict(depth=27, w_0=640, w_a=230.83, w_m=2.53, group_width=373, se_ratio=0.25),
    "regnet_x_400mf": dict(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16, se_ratio=0.0),
    "regnet_x_800mf": dict(depth=16, w_0=56, w_a=35.73, w_m=2.28, group_width=16, se_ratio=0.0),
    "regnet_x_1_6gf": dict(depth=18, w_0=80, w_a=34.01, w_m=2.25, group_width=24, se_ratio=0.0),
    "regnet_x_3_2gf": dict(depth=25, w_0=88, w_a=26.31, w_m=2.25, group_width=48, se_ratio=0.0),
    "regnet_x_8gf": dict(depth=23, w_0=80, w_a=49.56, w_m=2.88, group_width=120, se_ratio=0.0),
    "regnet_x_16gf": dict(depth=22, w_0=216, w_a=55.59, w_m=2.1, group_width=128, se_ratio=0.0),
    "regnet_x_32gf": dict(depth=23, w_0=320, w_a=69.86, w_m=2.0, group_width=168, se_ratio=0.0),
}

PARAM_KEYS = ("depth", "w_0", "w_a", "w_m", "group_width")
DEFAULT_BOTTLENECK_MULTIPLIER = 1.0
DEFAULT_SE_RATIO = 0.25  # RegNetY; 0 gives RegNetX
DEFAULT_STEM_WIDTH = 32


def regnet_block_params(
    name: str | None = None,
    depth: int | None = None,
    w_0: int | None = None,
    w_a: float | None = None,
    w_m: float | None = None,
    group_width: int | None = None,
    bottleneck_multiplier: float | None = None,
    se_ratio: float | None = None,
) -> BlockParams:
    """Per-stage depths and widths (torchvision's ``BlockParams``) for a name or parameters.

    Give either ``name`` alone or all of ``depth, w_0, w_a, w_m, group_width``; unset
    ``bottleneck_multiplier`` and ``se_ratio`` default to RegNetY's 1.0 and 0.25.
    Pure arithmetic: nothing is allocated, so it sizes a 1.3-billion-parameter trunk instantly.
    """
    explicit = {
        "depth": depth,
        "w_0": w_0,
        "w_a": w_a,
        "w_m": w_m,
        "group_width": group_width,
        "bottleneck_multiplier": bottleneck_multiplier,
        "se_ratio": se_ratio,
    }
    params = _generating_params(name, {k: v for k, v in explicit.items() if v is not None})
    depth, w_0 = int(params["depth"]), int(params["w_0"])
    w_a, w_m = float(params["w_a"]), float(params["w_m"])
    group_width = int(params["group_width"])
    bottleneck = float(params.get("bottleneck_multiplier", DEFAULT_BOTTLENECK_MULTIPLIER))
    se = float(params.get("se_ratio", DEFAULT_SE_RATIO))
    if depth < 1 or group_width < 1 or bottleneck <= 0 or se < 0:
        raise ValueError(
            f"RegNet needs depth >= 1, group_width >= 1, bottleneck_multiplier > 0 and "
            f"se_ratio >= 0; got {depth}, {group_width}, {bottleneck}, {se}"
        )
    # torchvision's own check, spelt out so the message says which value is wrong.
    if w_a < 0 or w_0 <= 0 or w_m <= 1 or w_0 % 8 != 0:
        raise ValueError(
            f"RegNet needs w_0 > 0 and a multiple of 8, w_a >= 0 and w_m > 1; "
            f"got w_0={w_0}, w_a={w_a}, w_m={w_m}"
        )
    # torchvision does this arithmetic with small CPU tensors; pin them to the CPU so that
    # building under `with torch.device("meta")` (shapes only, for big trunks) still works.
    with torch.device("cpu"):
        return BlockParams.from_init_params(
            depth=depth,
            w_0=w_0,
            w_a=w_a,
            w_m=w_m,
            group_width=group_width,
            bottleneck_multiplier=bottleneck,
            se_ratio=se or None,  # torchvision adds the SE module only for a truthy ratio
        )


def _generating_params(name: str | None, given: dict[str, float]) -> dict[str, float]:
    """The generating parameters of the RegNet `name`, or `given` when they are complete."""
    if name:
        if name not in REGNET_ARCHS:
            raise ValueError(f"unknown RegNet name {name!r}; choose one of {sorted(REGNET_ARCHS)}")
        if given:
            raise ValueError(
                f"RegNet {name!r} is fully defined by its name; do not also set {sorted(given)}"
            )
        return dict(REGNET_ARCHS[name])
    missing = [k for k in PARAM_KEYS if k not in given]
    if missing:
        raise ValueError(
            f"a RegNet needs a name (e.g. regnet_y_400mf) or all of {list(PARAM_KEYS)}; "
            f"missing {missing}"
        )
    return given


def regnet_num_features(block_params: BlockParams) -> int:
    """Width of the pooled trunk output: the last stage's width (10444 for RegNetY-256GF)."""
    return int(block_params.widths[-1])


class RegNet(nn.Module):
    """RegNet trunk returning globally average-pooled features ``[B, num_features]``.

    ``stem`` (3x3/2 conv, BN, ReLU) then ``trunk_output.block1..blockN`` (each stage halves the
    resolution), as torchvision builds it. Stages are called ``conv1`` (the stem) and
    ``res2``.. ``res{N+1}``, the names ResNet uses, so evaluation code can treat both alike.
    """

    def __init__(
        self,
        block_params: BlockParams,
        stem_width: int = DEFAULT_STEM_WIDTH,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        self.stem = SimpleStemIN(3, stem_width, norm, nn.ReLU)
        stages = []
        width = stem_width
        for i, (width_out, stride, depth, group_width, bottleneck) in enumerate(
            block_params._get_expanded_params()
        ):
            stage = AnyStage(
                width,
                width_out,
                stride,
                depth,
                ResBottleneckBlock,
                norm,
                nn.ReLU,
                group_width,
                bottleneck,
                block_params.se_ratio,
                stage_index=i + 1,
            )
            stages.append((f"block{i + 1}", stage))
            width = width_out
        self.trunk_output = nn.Sequential(OrderedDict(stages))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features: int = width
        self.stage_names: tuple[str, ...] = ("conv1",) + tuple(
            f"res{i + 2}" for i in range(len(stages))
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's RegNet init: normal with std sqrt(2 / fan_out), BN to identity. The SE
        # convolutions have biases; torchvision leaves them at PyTorch's default, and so do we.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor, names: Sequence[str] = ("res5",)) -> dict[str, Tensor]:
        """Unpooled feature maps of the named stages (``conv1`` = stem output)."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.stage_names]
        if unknown or not names:
            raise ValueError(f"unknown stage names {unknown}; choose from {list(self.stage_names)}")
        last = max(self.stage_names.index(n) for n in names)
        out: dict[str, Tensor] = {}
        x = self.stem(x)
        if "conv1" in names:
            out["conv1"] = x
        for name, stage in zip(self.stage_names[1 : last + 1], self.trunk_output, strict=False):
            x = stage(x)
            if name in names:
                out[name] = x
        return {n: out[n] for n in names}

    def forward(self, x: Tensor) -> Tensor:
        """Global average pooled features ``[B, num_features]``."""
        x = self.trunk_output(self.stem(x))
        return torch.flatten(self.avgpool(x), 1)
