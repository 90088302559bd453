"""Fixtures of the ecosystem tests (helpers in eco_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .eco_helpers import llama_state, write_llama


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # tiny tensors on a shared 2-core machine: OpenMP barriers cost more than they save
    torch.set_num_threads(1)


@pytest.fixture
def llamas(tmp_path: Path) -> list[Path]:
    """Three independent tiny 4-layer Llamas (float32); the first carries a tokenizer."""
    return [write_llama(tmp_path / f"m{i}", llama_state(i), tokenizer=(i == 0)) for i in range(3)]
