"""Checkpoints and the run folder: what a training state holds, atomic writes, the previous
checkpoint kept, safe loads, the lock.

A run folder belongs to one `swav train` at a time (an OS lock that dies with the process), holds
the latest training state (`checkpoint.torch`) and the one before it (`checkpoint.prev.torch`), and
never a checkpoint whose weights are not finite.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; the folder is then not guarded
    fcntl = None

logger = logging.getLogger("swav")

CHECKPOINT_NAME = "checkpoint.torch"
PREV_NAME = "checkpoint.prev.torch"
FINAL_NAME = "model_final_checkpoint.torch"
LOCK_NAME = ".swav_train.lock"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says what to do."""


class RunFolderBusy(CheckpointError):
    """Another `swav train` holds the run folder."""


class DamagedCheckpoint(CheckpointError):
    """The file is truncated, damaged or not ours (as opposed to refused for safety)."""


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def to_cpu(obj: Any) -> Any:
    """`obj` with every tensor in its dicts, lists and tuples on the CPU; other values as they are.

    A checkpoint of CUDA tensors needs a GPU (or `map_location`) to load at all: copied to the
    CPU, it loads with a plain `torch.load` anywhere, and a run resumes on any device.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()  # no copy for a CPU tensor
    if isinstance(obj, Mapping):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # a state dict's module versions, read by load_state_dict
        return out
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj


def training_state(core: torch.nn.Module, optimizer: torch.optim.Optimizer, objective_states: list[dict], *,
                   world_size: int, scaler: torch.amp.GradScaler | None, iteration: int, epoch: int,
                   position: int, train_seconds: float, lr_restart: tuple[int, float] | None,
                   config_yaml: str) -> dict:
    """The training state a run resumes from (`checkpoint.torch`).

    `core` is the model without its DistributedDataParallel wrapper, so the weights load in any
    number of processes. `objective_states` holds every rank's objective state in rank order
    (each rank's queue is its own); `loss` repeats rank 0's, for readers that expect a single
    state (a checkpoint without `loss_per_rank` resumes from it). `position` counts the samples
    of `epoch` each rank has consumed; `train_seconds` the training time so far, across resumes.
    Every tensor is on the CPU.
    """
    objective_states = to_cpu(objective_states)
    return {
        "format_version": FORMAT_VERSION,
        "model": to_cpu(core.state_dict()),
        "optimizer": to_cpu(optimizer.state_dict()),
        "loss": objective_states[0],
        "loss_per_rank": objective_states,
        "world_size": world_size,
        "scaler": to_cpu(scaler.state_dict()) if scaler is not None else None,
        "iteration": iteration,
        "epoch": epoch,
        "position": position,
        "train_seconds": train_seconds,
        "lr_restart": list(lr_restart) if lr_restart else None,
        "config": config_yaml,
    }


def final_state(core: torch.nn.Module, iteration: int, config_yaml: str) -> dict:
    """The trained model (`model_final_checkpoint.torch`): weights on the CPU, iteration and config."""
    return {"format_version": FORMAT_VERSION, "model": to_cpu(core.state_dict()),
            "iteration": iteration, "config": config_yaml}


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint dict: what the file will need, roughly."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _disk_full_message(path: Path, obj: Any) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return (
        f"cannot write {path}: the disk is full (or over its quota) in {path.parent}: the checkpoint "
        f"needs about {_state_bytes(obj) / 1e6:.0f} MB, {free}. The previous checkpoint is intact; "
        "free some space and rerun the same command to resume from it."
    )


def save_atomic(obj: Any, path: str | Path, keep_previous: bool = False) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`.

    A process killed mid-write leaves the previous checkpoint intact: os.replace is atomic on
    POSIX and Windows when source and target are on the same file system. With `keep_previous`
    the file being replaced becomes ``checkpoint.prev.torch`` first (a hard link, so `path` never
    goes missing). The file gets the permissions of the umask, like any file the user writes,
    so a group folder stays shared. A full disk raises CheckpointError with the sizes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files.
        os.chmod(tmp, 0o666 & ~_umask())
        if keep_previous and path.exists():
            _rotate(path, path.with_name(PREV_NAME))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch's zip writer reports a failed write as a RuntimeError about file positions: the
        # writer kept the OSError underneath.
        cause = e if isinstance(e, OSError) else getattr(writer, "error", None)
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise CheckpointError(_disk_full_message(path, obj)) from None
        raise


class _Writer:
    """A binary file for torch.save that remembers the OSError of a failed write."""

    def __init__(self, f) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self._f.flush()


def _rotate(path: Path, prev: Path) -> None:
    """`path` becomes `prev`, atomically, while `path` itself stays in place."""
    link = prev.with_name(f".{prev.name}.link.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links: a copy costs a write, not the guarantee
        shutil.copyfile(path, link)
    os.replace(link, prev)


def non_finite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [
        name
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def check_finite(model_state: Mapping[str, torch.Tensor], losses: Iterable[float], iteration: int) -> None:
    """Refuse to save diverged weights: the previous checkpoint is worth more than a NaN one."""
    bad = non_finite_tensors(model_state)
    bad_loss = [x for x in losses if not math.isfinite(x)]
    if not bad and not bad_loss:
        return
    what = []
    if bad:
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        what.append(f"{len(bad)} weight tensors are not finite ({', '.join(bad[:4])}{more})")
    if bad_loss:
        what.append(f"the loss is {bad_loss[0]}")
    raise FloatingPointError(
        f"training diverged by iteration {iteration}: {'; '.join(what)}. Not saving it: the last "
        "good checkpoint stays. Rerunning the same command resumes from there and will diverge "
        "again; lower the learning rate, lengthen the warm-up or disable AMP first."
    )


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def load(path: str | Path) -> dict:
    """Load a training checkpoint on the CPU, refusing anything but tensors and plain values."""
    path = Path(path)
    try:
        # weights_only: tensors, dicts, lists, numbers and strings only. Our checkpoints hold
        # nothing else, and a pickle that builds any other object could run code on this machine.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not refused_object(e):  # not an object refused, just bytes that are no pickle
            raise DamagedCheckpoint(f"cannot read checkpoint {path}: not a torch checkpoint") from None
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects besides tensors, and "
            "unpickling them could run code from the file; swav checkpoints never do, so this "
            f"file was not written by swav train{refused_object(e)}"
        ) from None
    except Exception as e:  # noqa: BLE001 - a truncated or damaged file means the same to the user
        raise DamagedCheckpoint(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise DamagedCheckpoint(f"{path} is not a swav training checkpoint (format {FORMAT_VERSION})")
    return state



def load_latest(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest readable training state of a run folder, falling back to the previous one.

    A truncated or damaged latest checkpoint (a full disk, a copy cut short) costs one
    checkpoint interval, not the run. A file refused for safety is never skipped silently.
    """
    latest, prev = run_dir / CHECKPOINT_NAME, run_dir / PREV_NAME
    if not latest.exists():
        if prev.exists():
            logger.warning("%s is missing; resuming from %s", latest, prev.name)
            return load(prev), prev
        return None
    try:
        return load(latest), latest
    except DamagedCheckpoint as e:
        if not prev.exists():
            raise DamagedCheckpoint(
                f"{e}. No {PREV_NAME} to fall back to: move the file away to start over, or set "
                "config.CHECKPOINT.AUTO_RESUME=false with another config.CHECKPOINT.DIR."
            ) from None
        try:
            state = load(prev)
        except DamagedCheckpoint as e2:
            raise DamagedCheckpoint(
                f"{e}; the previous one is damaged too ({e2}). Move both away to start over."
            ) from None
        logger.warning("%s cannot be read (%s); resuming from %s, iteration %d",
                       latest.name, str(e).split(": ", 1)[-1][:200], prev.name, state.get("iteration", -1))
        return state, prev


# ----------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------


def refused_object(error: Exception) -> str:
    """What torch's safe unpickler stopped at (``argparse.Namespace``, ``posix.system``...), as a
    parenthesis for messages; "" when the error is no refusal (the bytes are no pickle at all)."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return f" (the first one refused: {found.group(1)})" if found else ""


class RunFolderLock:
    """An exclusive OS lock on a run folder, held while one `swav train` uses it.

    POSIX record locks (fcntl.lockf) are released by the kernel when the process dies, so a
    kill -9 leaves no stale lock, and they are not inherited by forked loader workers. The file
    records who holds it, for the message the second run prints.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        if fcntl is None:
            logger.warning("no file locks on this platform: make sure no other run uses %s", self.run_dir)
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunFolderBusy(
                f"another swav train ({holder}) is using {self.run_dir}; wait for it to finish, stop it, "
                "or choose another config.CHECKPOINT.DIR"
            ) from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete what interrupted writes left behind (each one a checkpoint's size); call under the lock."""
    ours = (CHECKPOINT_NAME, PREV_NAME, FINAL_NAME)
    stale = [p for p in run_dir.glob(".*.tmp") if p.is_file() and p.name[1:].startswith(ours)]
    if not stale:
        return
    size = sum(p.stat().st_size for p in stale)
    for p in stale:
        p.unlink(missing_ok=True)
    logger.info("removed %d temporary files of interrupted writes from %s (%.1f MB)", len(stale), run_dir, size / 1e6)
