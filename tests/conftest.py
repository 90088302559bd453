"""Shared fixtures: tiny checkpoints written to tmp_path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from toymodels import tiny_state, write_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# soupkit's caches (input hashes, scores) go to a folder of this run, never the user's
os.environ["SOUPKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="soupkit-test-cache-")

# Hypothesis: every run (CI's included) tests the same examples, derived from each test's name
# and source, so a property test cannot pass today and fail tomorrow on a draw nobody chose; and
# no example is timed (the default 200 ms deadline, and the 1 s "too slow" check on generating
# the first examples, fail on a loaded 2-core machine, not on soupkit). Tests that bound a time
# assert it themselves. `HYPOTHESIS_PROFILE=long` draws new random examples on each run (the
# fuzzers and the kill test also run longer then: SECURITY.md).
settings.register_profile(
    "soupkit",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("long", settings.get_profile("soupkit"), derandomize=False)
settings.load_profile("long" if os.environ.get("HYPOTHESIS_PROFILE") == "long" else "soupkit")


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    """Three tiny float32 models in folders."""
    return [write_model(tmp_path / f"m{i}", tiny_state(i)) for i in range(3)]


@pytest.fixture
def bf16_models(tmp_path: Path) -> list[Path]:
    return [write_model(tmp_path / f"b{i}", tiny_state(10 + i, torch.bfloat16)) for i in range(3)]
