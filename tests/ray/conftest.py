"""Fixtures of the backend tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _small_threads() -> Iterator[None]:
    # The machine is shared: tiny models gain nothing from many threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
