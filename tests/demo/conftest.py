from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# `demo/` lives at the repository root and is not installed: make it importable.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    # build_ingredients pins torch's thread count; other tests must not inherit it.
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
