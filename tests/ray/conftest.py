"""Fixtures of the backend tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _restore_sigterm() -> Iterator[None]:
    # ray.init installs a SIGTERM handler (sys.exit) that ray.shutdown leaves in place: put
    # back what the module found, so the tests that run later see the handler they would see
    # had no Ray test run before them (tests/hostile/test_faults.py checks the CLI's handling)
    before = signal.getsignal(signal.SIGTERM)
    yield
    if before is not None:  # None: set outside Python, cannot be put back
        signal.signal(signal.SIGTERM, before)


@pytest.fixture(autouse=True)
def _small_threads() -> Iterator[None]:
    # The machine is shared: tiny models gain nothing from many threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
