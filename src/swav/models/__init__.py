"""Trunks, heads and the SSL model; ``build_model`` is the one place config becomes arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
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
    "build_head",
    "build_model",
    "build_trunk",
    "regnet_block_params",
    "regnet_kwargs",
    "regnet_num_features",
    "resnet_num_features",
    "trunk_num_features",
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


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain Python lists and dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _get(section: Any, key: str, default: Any = None) -> Any:
    """``section[key]`` for dicts (as ``swav.config.infer`` passes them), attribute otherwise."""
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)


def _trunk_section(cfg: Any) -> Any:
    return _get(_get(cfg, "MODEL"), "TRUNK")


def _trunk_name(cfg: Any) -> str:
    name = str(_get(_trunk_section(cfg), "NAME")).lower()
    if name not in SUPPORTED_TRUNKS:
        raise ValueError(
            f"MODEL.TRUNK.NAME={name!r} is not supported; supported trunks: {list(SUPPORTED_TRUNKS)}"
        )
    return name


def regnet_kwargs(cfg: Any) -> dict[str, Any]:
    """``MODEL.TRUNK.REGNET`` as arguments of ``regnet_block_params`` (unset keys left out)."""
    section = _get(_trunk_section(cfg), "REGNET")
    if section is None:
        raise ValueError("MODEL.TRUNK.NAME=regnet needs a MODEL.TRUNK.REGNET section")
    kwargs: dict[str, Any] = {"name": _get(section, "name") or None}
    for key in REGNET_KEYS:
        value = _get(section, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


def trunk_num_features(cfg: Any) -> int:
    """Width of the trunk's pooled output for this config, computed without building the trunk."""
    trunk = _trunk_section(cfg)
    if _trunk_name(cfg) == "regnet":
        return regnet_num_features(regnet_block_params(**regnet_kwargs(cfg)))
    r = _get(trunk, "RESNETS")
    return resnet_num_features(int(_get(r, "DEPTH")), float(_get(r, "WIDTH_MULTIPLIER")))


def build_trunk(cfg: Any) -> ResNet | RegNet:
    trunk = _trunk_section(cfg)
    if _trunk_name(cfg) == "regnet":
        stem_width = _get(_get(trunk, "REGNET"), "stem_width")
        return RegNet(
            regnet_block_params(**regnet_kwargs(cfg)),
            stem_width=int(stem_width) if stem_width else 32,
        )
    r = _get(trunk, "RESNETS")
    return ResNet(
        depth=int(_get(r, "DEPTH")),
        width_multiplier=float(_get(r, "WIDTH_MULTIPLIER")),
        groups=int(_get(r, "GROUPS")),
        width_per_group=int(_get(r, "WIDTH_PER_GROUP")),
        small_stem=bool(_get(r, "SMALL_STEM")),
        small_stem_stride=int(_get(r, "SMALL_STEM_STRIDE", 1)),
        zero_init_residual=bool(_get(r, "ZERO_INIT_RESIDUAL")),
    )


def build_head(cfg: Any, in_features: int) -> SwAVHead:
    """The head from ``MODEL.HEAD.PARAMS`` = ``[["swav_head", {...}]]`` or ``[["mlp", {...}]]``
    (the same projection, L2-normalised, without prototypes), checked against the trunk width
    ``in_features``."""
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


def build_model(cfg: Any) -> SSLModel:
    """Trunk and head from a resolved config (``cfg.MODEL.TRUNK`` and ``cfg.MODEL.HEAD``)."""
    # Check the head against the trunk width before building either (wide trunks are slow to build).
    in_features = trunk_num_features(cfg)
    head = build_head(cfg, in_features)
    trunk = build_trunk(cfg)
    return SSLModel(trunk, nn.ModuleList([head]))
