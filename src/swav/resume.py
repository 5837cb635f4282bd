"""What a resumed run may change: its config against the one saved in the checkpoint.

Keys split three ways. Some only change how a run is watched or where it runs (logging, checkpoint
frequency, loader workers, the kNN monitor, precision, processes): a resume takes them as they
are. `OPTIMIZER.num_epochs` lengthens or shortens the run: accepted, and the cosine LR continues
from the current value (see `swav.optim.schedules.continue_cosine`). Everything else (batch size,
seed, data, model, head, loss, crops, schedule values) changes what the saved state means: the
resume stops before anything is written, unless `CHECKPOINT.RESUME_CHANGED` says to go on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from swav.config import ConfigError

logger = logging.getLogger("swav")

# Changing these does not change what the saved weights, optimizer state or queue mean.
SAFE_PREFIXES = (
    "LOG_FREQUENCY",
    "CHECKPOINT.",
    "DATA.NUM_DATALOADER_WORKERS",
    "DATA.PIN_MEMORY",
    "DATA.MAX_MISSING_FRACTION",
    "DATA.TEST.",
    "KNN_MONITOR.",
    "EVAL.",
    "MACHINE.",
    "DISTRIBUTED.",  # a new world size is handled by the loop: the queue restarts
    "MODEL.WEIGHTS_INIT.",
    "MODEL.AMP_PARAMS.",
    "MODEL.CHANNELS_LAST",
    "DATA.TRAIN.GPU_AUGMENT",  # the same ops on the same random numbers, in the loader or on the device
    "LOSS.swav_loss.output_dir",
)
# Computed from other keys: a change shows up in the key it comes from.
INFERRED = (
    "LOSS.swav_loss.num_crops",
    "LOSS.swav_loss.embedding_dim",
    "LOSS.swav_loss.num_prototypes",
    "LOSS.swav_loss.queue.local_queue_length",
    "LOSS.simclr_info_nce_loss.num_crops",
    "LOSS.simclr_info_nce_loss.embedding_dim",
    "LOSS.deepclusterv2_loss.num_crops",
    "LOSS.deepclusterv2_loss.memory_params.embedding_dim",
    "LOSS.sela_v2_loss.num_crops",
    "LOSS.sela_v2_loss.num_clusters",
    "LOSS.sela_v2_loss.memory_params.embedding_dim",
    "OPTIMIZER.param_schedulers.lr.auto_lr_scaling.scale_factor",
    "OPTIMIZER.param_schedulers.lr.scaled.",
)
NUM_EPOCHS = "OPTIMIZER.num_epochs"
QUEUE_LENGTH = "LOSS.swav_loss.queue.queue_length"  # rounded to the global batch, so it follows the world size
_ABSENT = object()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"A.B.C": leaf}: lists are leaves, compared whole."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return out


@dataclass
class ConfigChanges:
    unsafe: list[tuple[str, Any, Any]]  # (key, old, new): would mix two runs
    safe: list[tuple[str, Any, Any]]
    added: list[str]  # keys the checkpoint's (older) config did not have: their default applies
    num_epochs: tuple[int, int] | None  # (old, new) when the run's length changed

    @property
    def any(self) -> bool:
        return bool(self.unsafe or self.safe or self.num_epochs)


def compare_configs(old: Mapping, new: Mapping, world_size_changed: bool = False) -> ConfigChanges:
    """The differences between two resolved configs (the `config:` level, as nested dicts)."""
    before, after = flatten(old), flatten(new)
    changes = ConfigChanges(unsafe=[], safe=[], added=[], num_epochs=None)
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if a == b or key.startswith(INFERRED):
            continue
        if b is _ABSENT:  # a key this version no longer has
            continue
        if a is _ABSENT:
            changes.added.append(key)
        elif key == NUM_EPOCHS:
            changes.num_epochs = (int(a), int(b))
        elif key.startswith(SAFE_PREFIXES) or (world_size_changed and key == QUEUE_LENGTH):
            changes.safe.append((key, a, b))
        else:
            changes.unsafe.append((key, a, b))
    return changes


def saved_config(checkpoint_state: Mapping) -> dict:
    """The resolved config a checkpoint was written with ({} for a checkpoint without one)."""
    text = checkpoint_state.get("config")
    if not isinstance(text, str):
        return {}
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return tree.get("config", {}) if isinstance(tree, dict) else {}


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(changes: ConfigChanges, checkpoint_path: str, accept: bool) -> list[str]:
    """Raise ConfigError for changes that would mix two runs (unless `accept`); else the log lines."""
    if changes.unsafe and not accept:
        listing = "; ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, a, b in changes.unsafe)
        raise ConfigError(
            f"this run resumes {checkpoint_path}, which was trained with another config: {listing}. "
            "Resuming would mix the two runs. Rerun the old command to continue it, choose another "
            "config.CHECKPOINT.DIR to start a new run, or add config.CHECKPOINT.RESUME_CHANGED=true "
            "to resume with the new values anyway."
        )
    lines = [f"resume: {k} changed from {_fmt(a)} to {_fmt(b)}" for k, a, b in changes.safe]
    lines += [f"resume: {k} changed from {_fmt(a)} to {_fmt(b)} (accepted: CHECKPOINT.RESUME_CHANGED=true)"
              for k, a, b in changes.unsafe]
    if changes.added:
        lines.append(f"resume: the checkpoint's config predates {', '.join(changes.added)}: their values apply")
    if changes.num_epochs:
        old, new = changes.num_epochs
        lines.append(
            f"resume: OPTIMIZER.num_epochs changed from {old} to {new}; the LR schedule is recomputed "
            "from the current iteration on: a cosine from the current LR to the end value over the new length"
        )
    return lines
