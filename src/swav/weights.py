"""Trunk weights in and out: our checkpoints, exported trunks, torchvision, official SwAV, VISSL.

Every format reduces to one plain state dict with torchvision's ResNet names (``conv1.weight``,
``layer1.0.bn1.running_mean``, ...), which is what :class:`swav.models.ResNet` uses:

- our training checkpoints (``checkpoint.torch``, ``model_final_checkpoint.torch``): ``model``
  holds ``trunk.*`` and ``heads.*``; the heads are dropped;
- an exported trunk (``swav export``) or a torchvision ResNet state dict (``fc.*`` dropped);
- the official SwAV release: keys prefixed ``module.``, ``projection_head.*`` and
  ``prototypes*`` dropped; a ``state_dict`` wrapper is looked into;
- VISSL: ``classy_state_dict -> base_model -> model -> trunk`` with ``_feature_blocks.<name>``.

Files are read with ``torch.load(weights_only=True)``: tensors, containers, numbers and strings.
A pickle that needs any other Python object is refused unless the caller passes
``trust_pickle=True``, because unpickling can run arbitrary code from the file.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swav.checkpoint import refused_object

logger = logging.getLogger("swav")

# Wrappers that hold the state dict, looked into in this order.
_WRAPPERS = ("model", "state_dict", "model_state_dict", "classy_state_dict", "base_model", "trunk")
# Prefixes added by DistributedDataParallel, our SSL model and VISSL's trunk.
_PREFIXES = ("module.", "trunk.", "_feature_blocks.")
# Everything that is not the trunk: classifiers, SSL heads, prototypes.
_DROPPED = ("fc.", "heads.", "projection_head.", "prototypes")
_OPTIONAL = ("num_batches_tracked",)  # BN counters: absent from old checkpoints, unused in eval


class UntrustedPickleError(ValueError):
    """A weights file whose pickle builds Python objects other than tensors and containers.

    A ValueError, so the commands report it as one line like any other unusable weights file.
    """


def _refusal(path: Path, error: Exception) -> UntrustedPickleError:
    return UntrustedPickleError(
        f"refusing to load {path}: it holds pickled Python objects besides tensors"
        f"{refused_object(error)}, and unpickling them could run any code from the file on this "
        "machine. If it is a legacy checkpoint from a source you trust, opt in with "
        "config.MODEL.WEIGHTS_INIT.TRUST_PICKLE=true (evaluation commands) or swav export "
        "--trust-pickle; better, export it once to a plain state dict or .safetensors and use that"
    )


def load_file(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` on the CPU, tensors and plain containers only.

    A file whose pickle needs other Python objects is refused (UntrustedPickleError): unpickling
    them can run arbitrary code. ``trust_pickle=True`` loads such a file with full unpickling,
    with a warning; plain files load the safe way either way.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not refused_object(e):  # bytes that are no pickle at all, not an object refused
            raise ValueError(f"{path} is not a torch weights file (or it is damaged)") from None
        if not trust_pickle:
            raise _refusal(path, e) from None
        logger.warning(
            "%s holds pickled Python objects besides tensors%s; loading it with full unpickling "
            "because it is trusted, which can run any code from the file on this machine",
            path, refused_object(e),
        )
        return torch.load(path, map_location="cpu", weights_only=False)


def _tensors(d: Mapping) -> dict[str, Tensor]:
    return {str(k): v for k, v in d.items() if isinstance(v, Tensor)}


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def trunk_state_dict(obj: Any) -> tuple[dict[str, Tensor], str]:
    """``(state dict with torchvision ResNet names, name of the format found)`` from a loaded file."""
    fmt = None
    if isinstance(obj, Mapping):
        if "format_version" in obj and "model" in obj:
            fmt = "swav checkpoint"
        elif "classy_state_dict" in obj:
            fmt = "VISSL checkpoint"
    node, seen = obj, []
    # Walk down the wrappers until a level holds tensors.
    while isinstance(node, Mapping) and not _tensors(node):
        inner = next((w for w in _WRAPPERS if isinstance(node.get(w), Mapping)), None)
        if inner is None:
            break
        seen.append(inner)
        node = node[inner]
    if not isinstance(node, Mapping) or not _tensors(node):
        where = " -> ".join(seen) or "the top level"
        keys = list(node)[:8] if isinstance(node, Mapping) else type(node).__name__
        raise ValueError(f"no state dict found (looked under {where}; keys there: {keys})")
    raw = _tensors(node)
    state, dropped = {}, []
    for key, value in raw.items():
        name = _strip(key)
        if name.startswith(_DROPPED):
            dropped.append(name)
        else:
            state[name] = value
    if fmt is None:
        if any(k.startswith("module.") for k in raw) and any(
            k.startswith(("projection_head.", "prototypes")) for k in dropped
        ):
            fmt = "official SwAV release"
        elif any(k.startswith("fc.") for k in dropped):
            fmt = "torchvision state dict"
        else:
            fmt = "trunk state dict"
    return state, fmt


def _trunk_hint(obj: Any) -> str:
    """The trunk section of the config saved in our checkpoints, to say what to set."""
    if not (isinstance(obj, Mapping) and isinstance(obj.get("config"), str)):
        return ""
    import yaml

    try:
        trunk = yaml.safe_load(obj["config"])["config"]["MODEL"]["TRUNK"]
    except (yaml.YAMLError, KeyError, TypeError):
        return ""
    sets = [f"config.MODEL.TRUNK.RESNETS.{k}={v}" for k, v in trunk.get("RESNETS", {}).items()]
    return " The file was trained with: " + " ".join(sets) + "."


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_trunk_weights(trunk: nn.Module, path: str | Path, *, trust_pickle: bool = False) -> dict:
    """Load ``path`` (any format of this module) into ``trunk``, strictly.

    Returns ``{"format": ..., "tensors": n}``. Raises ValueError naming the missing, unexpected
    and wrongly shaped keys when the file does not fit the trunk, and UntrustedPickleError (a
    ValueError) for a pickle that needs arbitrary objects unless ``trust_pickle`` (see load_file).
    """
    obj = load_file(path, trust_pickle=trust_pickle)
    try:
        state, fmt = trunk_state_dict(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_listing(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} shapes differ (file vs trunk): {_listing(wrong, 4)}")
        raise ValueError(
            f"{path} ({fmt}) does not fit this trunk: {'; '.join(parts)}. Check "
            "config.MODEL.TRUNK (DEPTH, WIDTH_MULTIPLIER, SMALL_STEM) against the weights."
            + _trunk_hint(obj)
        )
    for k, v in expected.items():
        if k not in state:  # an optional BN counter
            state[k] = v
    trunk.load_state_dict(state, strict=True)
    logger.info("loaded %d trunk tensors from %s (%s)", len(state), path, fmt)
    return {"format": fmt, "tensors": len(state)}


def export_trunk(
    checkpoint_path: str | Path, output_path: str | Path, *, trust_pickle: bool = False
) -> dict:
    """Write the trunk of any supported file as a plain state dict with torchvision names.

    ``.torch`` / ``.pth`` / ``.pt`` (torch.save). The result loads into torchvision with
    ``m = torchvision.models.resnet50(); m.fc = torch.nn.Identity(); m.load_state_dict(sd)``
    (for a trunk trained with ``SMALL_STEM`` the stem differs from torchvision's).
    ``.safetensors``: the same tensors in the safetensors format (no pickled code; loads with
    ``safetensors.torch.load_file``). ``trust_pickle``: as in load_file, for the input only.
    """
    output_path = Path(output_path).expanduser()
    if output_path.suffix not in (".torch", ".pth", ".pt", ".safetensors"):
        raise ValueError(f"{output_path}: use a .torch, .pth, .pt or .safetensors file name")
    state, fmt = trunk_state_dict(load_file(checkpoint_path, trust_pickle=trust_pickle))
    # contiguous + clone: no channels-last strides and no shared storage with the optimizer state.
    state = {k: v.detach().contiguous().clone() for k, v in sorted(state.items())}
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output_path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(output_path))
    else:
        torch.save(state, output_path)
    logger.info("exported %d trunk tensors from %s (%s) to %s", len(state), checkpoint_path, fmt, output_path)
    return {"format": fmt, "tensors": len(state), "output": str(output_path)}
