"""Fixtures of the ecosystem tests (helpers in eco_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from .eco_helpers import llama_state, write_llama


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny tensors on a shared 2-core machine: OpenMP barriers cost more than they save; the
    # count is restored after each test, so the tests that run later (other folders, in any
    # order) do not inherit it
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llamas(tmp_path: Path) -> list[Path]:
    """Three independent tiny 4-layer Llamas (float32); the first carries a tokenizer."""
    return [write_llama(tmp_path / f"m{i}", llama_state(i), tokenizer=(i == 0)) for i in range(3)]
