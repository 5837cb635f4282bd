"""Checkpoints: one dict of state dicts plus position and config, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.torch"
FINAL_NAME = "model_final_checkpoint.torch"
FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`.

    A process killed mid-write leaves the previous checkpoint intact: os.replace is atomic
    on POSIX and Windows when source and target are on the same file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict:
    """Load a training checkpoint on the CPU; a damaged file gets a message that says what to do."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise RuntimeError(
            f"cannot read checkpoint {path}: {e}. Delete or move it to start over, or set "
            "config.CHECKPOINT.AUTO_RESUME=false with another config.CHECKPOINT.DIR."
        ) from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise RuntimeError(f"{path} is not a swav training checkpoint (format {FORMAT_VERSION})")
    return state
