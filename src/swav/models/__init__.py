"""Trunks, heads and the SSL model; ``build_model`` is the one place config becomes arguments."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from swav.models.heads import SwAVHead
from swav.models.resnet import RESNET_ARCHS, ResNet, resnet_num_features
from swav.models.ssl import SSLModel

__all__ = [
    "RESNET_ARCHS",
    "ResNet",
    "SSLModel",
    "SUPPORTED_HEADS",
    "SUPPORTED_TRUNKS",
    "SwAVHead",
    "build_head",
    "build_model",
    "build_trunk",
    "resnet_num_features",
    "trunk_num_features",
]

SUPPORTED_TRUNKS = ("resnet",)
SUPPORTED_HEADS = ("swav_head",)
_SWAV_HEAD_KEYS = ("dims", "use_bn", "num_clusters", "normalize_feats")


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain Python lists and dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _trunk_name(cfg: Any) -> str:
    name = str(cfg.MODEL.TRUNK.NAME).lower()
    if name == "regnet":
        raise NotImplementedError(
            "MODEL.TRUNK.NAME=regnet: RegNet trunks are not available yet; use 'resnet'"
        )
    if name not in SUPPORTED_TRUNKS:
        raise ValueError(
            f"MODEL.TRUNK.NAME={name!r} is not supported; supported trunks: {list(SUPPORTED_TRUNKS)}"
        )
    return name


def trunk_num_features(cfg: Any) -> int:
    """Width of the trunk's pooled output for this config, without building the trunk."""
    _trunk_name(cfg)
    r = cfg.MODEL.TRUNK.RESNETS
    return resnet_num_features(int(r.DEPTH), int(r.WIDTH_MULTIPLIER))


def build_trunk(cfg: Any) -> ResNet:
    _trunk_name(cfg)
    r = cfg.MODEL.TRUNK.RESNETS
    return ResNet(
        depth=int(r.DEPTH),
        width_multiplier=int(r.WIDTH_MULTIPLIER),
        groups=int(r.GROUPS),
        width_per_group=int(r.WIDTH_PER_GROUP),
        small_stem=bool(r.SMALL_STEM),
        zero_init_residual=bool(r.ZERO_INIT_RESIDUAL),
    )


def build_head(cfg: Any, in_features: int) -> SwAVHead:
    """The head from ``MODEL.HEAD.PARAMS`` = ``[["swav_head", {...}]]``, checked against the
    trunk width ``in_features``."""
    entries = _plain(cfg.MODEL.HEAD.PARAMS)
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
    unknown = sorted(set(params) - set(_SWAV_HEAD_KEYS))
    if unknown:
        raise ValueError(
            f"MODEL.HEAD.PARAMS: unknown {name} parameter(s) {unknown}; supported: {list(_SWAV_HEAD_KEYS)}"
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
        num_clusters=[int(k) for k in params.get("num_clusters", [3000])],
        normalize_feats=bool(params.get("normalize_feats", True)),
    )


def build_model(cfg: Any) -> SSLModel:
    """Trunk and head from a resolved config (``cfg.MODEL.TRUNK`` and ``cfg.MODEL.HEAD``)."""
    # Check the head against the trunk width before building either (wide trunks are slow to build).
    in_features = trunk_num_features(cfg)
    head = build_head(cfg, in_features)
    trunk = build_trunk(cfg)
    return SSLModel(trunk, nn.ModuleList([head]))
