"""Suite-wide test settings."""

from __future__ import annotations

import faulthandler

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tests run tiny tensors, where a second OpenMP thread costs more hand-off than it saves;
    # on a shared 2-core machine two spinning threads made whole files about 4x slower (measured
    # under load 8). Processes the tests start choose their own threads.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_unconfigure(config):
    # A process that hangs at interpreter exit (a child it joins forever, a thread that never
    # ends) would otherwise hold a CI run until its overall timeout: after two minutes print
    # where every thread is and exit with an error.
    faulthandler.dump_traceback_later(120, exit=True)
