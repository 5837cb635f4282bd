"""Local worker processes: start them, pass on a stop signal, and stop them all when one fails."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

import torch.multiprocessing as mp

FAILURE_GRACE_SECONDS = 3.0


def run_spawned(worker: Callable[..., None], nprocs: int, args: tuple) -> None:
    """Start `nprocs` local workers and wait; the first one to fail takes the others down.

    A SIGTERM to this launcher (`kill`, a job scheduler) is passed on to the workers, which then
    save a checkpoint and exit, instead of leaving them orphaned.
    """
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")

    def forward(signum, frame) -> None:
        for pid in context.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        # When one worker dies the others cannot finish or save (saving gathers every rank's
        # state): they are told to stop after a few seconds and killed a few seconds later,
        # instead of torch's default of 30 s before the kill.
        while not context.join(grace_period=FAILURE_GRACE_SECONDS):
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
