from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # The models here are tiny: with 2 threads on a machine shared with other jobs, OpenMP
    # barriers make each forward pass ~25x slower (2 s instead of 0.08 s per evaluation).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
