"""Default compute-thread counts (soupkit.planning.sizes)."""

from __future__ import annotations

import pytest

from soupkit.planning import sizes as _sizes


@pytest.mark.parametrize(
    ("cpus", "compute", "stream"), [(1, 1, 1), (2, 2, 1), (3, 3, 2), (8, 4, 4), (64, 4, 4)]
)
def test_thread_defaults(
    monkeypatch: pytest.MonkeyPatch, cpus: int, compute: int, stream: int
) -> None:
    monkeypatch.setattr(_sizes, "_cpus", lambda: cpus)
    assert (_sizes.compute_threads(), _sizes.stream_threads()) == (compute, stream)
