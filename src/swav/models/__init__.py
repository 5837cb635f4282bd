"""Trunks, heads and the SSL model: ``build_model(cfg)`` reads the config, once, into plain
sections; everything below it takes plain arguments."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from swav.models.heads import SwAVHead
from swav.models.regnet import REGNET_ARCHS, RegNet, regnet_block_params, regnet_num_features
from swav.models.resnet import RESNET_ARCHS, ResNet, resnet_num_features
from swav.models.ssl import SSLModel

__all__ = [
    "REGNET_ARCHS",
    "RESNET_ARCHS",
    "REGNET_KEYS",
    "RegNet",
    "ResNet",
    "SSLModel",
    "SUPPORTED_HEADS",
    "SUPPORTED_TRUNKS",
    "SwAVHead",
    "build_model",
    "build_trunk",
    "head_from",
    "model_from",
    "trunk_from",
    "regnet_block_params",
    "regnet_kwargs",
    "regnet_num_features",
    "resnet_num_features",
    "trunk_width",
]

SUPPORTED_TRUNKS = ("resnet", "regnet")
SUPPORTED_HEADS = ("swav_head", "mlp")
# Head name -> the parameters it takes. `mlp` is the projection of swav_head without prototypes
# (methods that contrast embeddings directly, like SimCLR).
_HEAD_KEYS = {
    "swav_head": ("dims", "use_bn", "num_clusters", "normalize_feats"),
    "mlp": ("dims", "use_bn", "normalize_feats"),
}
# MODEL.TRUNK.REGNET keys that shape the architecture (stem_width is read separately).
REGNET_KEYS = (
    "depth",
    "w_0",
    "w_a",
    "w_m",
    "group_width",
    "bottleneck_multiplier",
    "se_ratio",
)


def _trunk_name(trunk: Mapping) -> str:
    name = str(trunk["NAME"]).lower()
    if name not in SUPPORTED_TRUNKS:
        raise ValueError(
            f"MODEL.TRUNK.NAME={name!r} is not supported; supported trunks: {list(SUPPORTED_TRUNKS)}"
        )
    return name


def regnet_kwargs(regnet: Mapping | None) -> dict[str, Any]:
    """A ``MODEL.TRUNK.REGNET`` section as arguments of ``regnet_block_params`` (unset keys left out)."""
    if regnet is None:
        raise ValueError("MODEL.TRUNK.NAME=regnet needs a MODEL.TRUNK.REGNET section")
    kwargs: dict[str, Any] = {"name": regnet.get("name") or None}
    for key in REGNET_KEYS:
        if regnet.get(key) is not None:
            kwargs[key] = regnet[key]
    return kwargs


def trunk_width(trunk: Mapping) -> int:
    """Width of the pooled output of the trunk a ``MODEL.TRUNK`` section describes, computed
    without building it."""
    if _trunk_name(trunk) == "regnet":
        return regnet_num_features(regnet_block_params(**regnet_kwargs(trunk.get("REGNET"))))
    r = trunk["RESNETS"]
    return resnet_num_features(int(r["DEPTH"]), float(r["WIDTH_MULTIPLIER"]))


def trunk_from(trunk: Mapping) -> ResNet | RegNet:
    """The trunk a ``MODEL.TRUNK`` section describes."""
    if _trunk_name(trunk) == "regnet":
        stem_width = trunk["REGNET"].get("stem_width")
        return RegNet(regnet_block_params(**regnet_kwargs(trunk["REGNET"])), stem_width=int(stem_width) if stem_width else 32)
    r = trunk["RESNETS"]
    return ResNet(
        depth=int(r["DEPTH"]),
        width_multiplier=float(r["WIDTH_MULTIPLIER"]),
        groups=int(r["GROUPS"]),
        width_per_group=int(r["WIDTH_PER_GROUP"]),
        small_stem=bool(r["SMALL_STEM"]),
        small_stem_stride=int(r.get("SMALL_STEM_STRIDE", 1)),
        zero_init_residual=bool(r["ZERO_INIT_RESIDUAL"]),
    )


def head_from(entries: Sequence, in_features: int) -> SwAVHead:
    """The head of ``MODEL.HEAD.PARAMS`` = ``[["swav_head", {...}]]`` or ``[["mlp", {...}]]``
    (the same projection, L2-normalised, without prototypes), checked against the trunk width
    ``in_features``."""
    if not isinstance(entries, (list, tuple)) or len(entries) != 1:
        raise ValueError(
            f"MODEL.HEAD.PARAMS must hold exactly one [name, params] entry, got {entries!r}"
        )
    entry = entries[0]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[1], dict):
        raise ValueError(f"MODEL.HEAD.PARAMS entries are [name, {{params}}], got {entry!r}")
    name, params = entry
    if name not in SUPPORTED_HEADS:
        raise ValueError(
            f"MODEL.HEAD.PARAMS: head {name!r} is not supported; supported heads: {list(SUPPORTED_HEADS)}"
        )
    unknown = sorted(set(params) - set(_HEAD_KEYS[name]))
    if unknown:
        raise ValueError(
            f"MODEL.HEAD.PARAMS: unknown {name} parameter(s) {unknown}; supported: {list(_HEAD_KEYS[name])}"
        )
    if not params.get("dims"):
        raise ValueError(f"MODEL.HEAD.PARAMS: {name} needs 'dims', e.g. [2048, 2048, 128]")
    dims = [int(d) for d in params["dims"]]
    if dims[0] != in_features:
        raise ValueError(
            f"MODEL.HEAD.PARAMS: {name} dims[0]={dims[0]} must equal the trunk's output width "
            f"{in_features}; set dims to [{in_features}, ...]"
        )
    return SwAVHead(
        dims=dims,
        use_bn=bool(params.get("use_bn", True)),
        num_clusters=[int(k) for k in params.get("num_clusters", [3000] if name == "swav_head" else [])],
        normalize_feats=bool(params.get("normalize_feats", True)),
    )


def model_from(model: Mapping) -> SSLModel:
    """Trunk and head of a ``MODEL`` section given as plain dicts and lists (``swav.build.build_model``
    makes them from a config)."""
    # Check the head against the trunk width before building either (wide trunks are slow to build).
    in_features = trunk_width(model["TRUNK"])
    head = head_from(model["HEAD"]["PARAMS"], in_features)
    return SSLModel(trunk_from(model["TRUNK"]), nn.ModuleList([head]))


def build_model(cfg: DictConfig) -> SSLModel:
    """The SSL model a resolved config's ``MODEL`` section describes: ``.trunk`` (features) and
    ``.heads`` (projection and prototypes), freshly initialised."""
    return model_from(OmegaConf.to_container(cfg.MODEL, resolve=True))


def build_trunk(cfg: DictConfig) -> ResNet | RegNet:
    """The trunk of a resolved config's ``MODEL.TRUNK``, freshly initialised."""
    return trunk_from(OmegaConf.to_container(cfg.MODEL.TRUNK, resolve=True))
