"""The CPU thread count of a training process, chosen from measured step times while it trains.

Two OpenMP threads meet at the end of every operation. When another process takes one of two
cores (a browser, a neighbour's job), the thread that shares its core with it runs only when the
scheduler gives it a slice, and the other waits for it at every operation: the quickstart then
trained at a quarter of its idle speed, where one thread on the free core keeps about half. So the
training process times a few steps with each thread count, keeps the faster, and looks again
every few hundred steps and whenever the steps get much slower.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class ThreadTuner:
    """Call `step_done()` after every training step; it sets the thread count.

    `options` are tried in order (the first is the starting count): `window` steps each, after
    one step to settle, and the option with the lowest median step time is kept. A new trial starts
    after `recheck_every` steps, or when a window's median is `slowdown` times the kept one.
    """

    def __init__(
        self,
        options: list[int],
        window: int = 8,
        recheck_every: int = 500,
        slowdown: float = 1.4,
        warmup: int = 3,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not options or min(options) < 1:
            raise ValueError(f"thread counts must be positive, got {options}")
        self.options = list(dict.fromkeys(options))
        self.window, self.recheck_every, self.slowdown = window, recheck_every, slowdown
        self._set_threads, self._clock = set_threads, clock
        self.current = self.options[0]
        self._last: float | None = None
        self._skip = warmup
        self._times: list[float] = []
        self._to_try: list[int] | None = None  # None: not trying, keeping `current`
        self._medians: dict[int, float] = {}
        self._kept: int | None = None
        self._kept_median = 0.0
        self._since_choice = 0
        self._start_trial()

    def _start_trial(self) -> None:
        self._to_try = list(self.options)
        self._medians = {}
        self._use(self._to_try.pop(0))

    def _use(self, threads: int) -> None:
        if threads != self.current:
            self._set_threads(threads)
            self.current = threads
            self._skip = max(self._skip, 1)  # the first step after a change pays for the change
        self._times = []

    def step_done(self) -> str | None:
        """Note the end of a step; returns a line for the log when a trial has just chosen."""
        now = self._clock()
        last, self._last = self._last, now
        if last is None:
            return None
        if self._skip:
            self._skip -= 1
            return None
        self._times.append(now - last)
        if len(self._times) < self.window:
            return None
        median = statistics.median(self._times)  # a checkpoint or a log write is one slow step
        self._times = []
        if self._to_try is not None:
            return self._trial_window(median)
        self._since_choice += self.window
        if self._since_choice >= self.recheck_every or median > self._kept_median * self.slowdown:
            self._start_trial()
        return None

    def _trial_window(self, median: float) -> str | None:
        self._medians[self.current] = median
        if self._to_try:
            self._use(self._to_try.pop(0))
            return None
        best = min(self._medians, key=self._medians.__getitem__)
        first, changed = self._kept is None, best != self._kept
        self._use(best)
        self._to_try, self._kept, self._kept_median, self._since_choice = None, best, self._medians[best], 0
        if not (first or changed):
            return None
        timings = ", ".join(f"{n} threads {1000 * t:.0f} ms" for n, t in self._medians.items())
        return f"CPU step time measured ({timings}); training with {best}"


def thread_options(threads: int) -> list[int]:
    """What to try: all threads, and one fewer (the core a neighbour takes); [] for one thread."""
    return [threads, threads - 1] if threads > 1 else []
