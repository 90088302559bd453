"""Shared fixtures: tiny checkpoints written to tmp_path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from toymodels import tiny_state, write_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# soupkit's caches (input hashes, scores) go to a folder of this run, never the user's
os.environ["SOUPKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="soupkit-test-cache-")


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    """Three tiny float32 models in folders."""
    return [write_model(tmp_path / f"m{i}", tiny_state(i)) for i in range(3)]


@pytest.fixture
def bf16_models(tmp_path: Path) -> list[Path]:
    return [write_model(tmp_path / f"b{i}", tiny_state(10 + i, torch.bfloat16)) for i in range(3)]
