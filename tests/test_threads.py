"""The CPU thread count chosen from measured step times (a busy neighbour core stalls OpenMP)."""

from __future__ import annotations

import pytest
import torch

from swav.threads import ThreadTuner, thread_options


class Machine:
    """Steps whose time depends on the thread count and on whether a neighbour is busy."""

    def __init__(self) -> None:
        self.now, self.threads, self.busy = 0.0, 2, False
        self.changes: list[int] = []

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.changes.append(n)

    def step_seconds(self) -> float:
        if self.busy:
            return {2: 0.040, 1: 0.015}[self.threads]  # two threads wait for the shared core
        return {2: 0.010, 1: 0.016}[self.threads]

    def run(self, tuner: ThreadTuner, steps: int) -> list[str]:
        notes = []
        for _ in range(steps):
            self.now += self.step_seconds()
            if note := tuner.step_done():
                notes.append(note)
        return notes


def _tuner(machine: Machine) -> ThreadTuner:
    return ThreadTuner([2, 1], window=8, recheck_every=100, set_threads=machine.set_threads,
                       clock=lambda: machine.now)


def test_an_idle_machine_keeps_every_thread():
    machine = Machine()
    notes = machine.run(_tuner(machine), 60)
    assert machine.threads == 2 and machine.changes == [1, 2]
    assert notes == ["CPU step time measured (2 threads 10 ms, 1 threads 16 ms); training with 2"]


def test_a_busy_neighbour_makes_it_train_with_one_thread_fewer():
    machine = Machine()
    machine.busy = True
    notes = machine.run(_tuner(machine), 60)
    assert machine.threads == 1
    assert notes == ["CPU step time measured (2 threads 40 ms, 1 threads 15 ms); training with 1"]


def test_a_neighbour_that_comes_and_goes_is_followed():
    machine = Machine()
    tuner = _tuner(machine)
    machine.run(tuner, 40)
    assert machine.threads == 2
    machine.busy = True  # the steps slow down 4x: a new trial at once, not after 100 steps
    notes = machine.run(tuner, 40)
    assert machine.threads == 1 and notes[-1].endswith("training with 1")
    machine.busy = False  # one thread is as fast as before: only the periodic trial finds out
    notes = machine.run(tuner, 60)
    assert machine.threads == 1 and not notes
    notes = machine.run(tuner, 80)
    assert machine.threads == 2 and notes[-1].endswith("training with 2")


def test_one_slow_step_does_not_start_a_trial():
    machine = Machine()
    tuner = _tuner(machine)
    machine.run(tuner, 40)
    changes = len(machine.changes)
    machine.now += 5.0  # a checkpoint write between two steps
    machine.run(tuner, 20)
    assert len(machine.changes) == changes


def test_what_is_tried():
    assert thread_options(1) == []
    assert thread_options(2) == [2, 1]
    assert thread_options(8) == [8, 7]
    with pytest.raises(ValueError, match="positive"):
        ThreadTuner([0])


def test_a_run_times_its_threads_and_gives_the_count_back(tmp_path):
    from test_train import tiny

    from swav.train import train

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(tiny(tmp_path, "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=96"))
        assert torch.get_num_threads() == 2
        log = (tmp_path / "log.txt").read_text()
        assert "CPU step time measured (2 threads" in log
        train(tiny(tmp_path / "fixed", "config.DATA.SYNTHETIC.NUM_IMAGES_TRAIN=96", "config.MACHINE.ADAPT_THREADS=false"))
        assert "CPU step time" not in (tmp_path / "fixed" / "log.txt").read_text()
    finally:
        torch.set_num_threads(before)
