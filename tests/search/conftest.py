"""Fixtures of the search tests: the toy problem and a tracker of tensor bytes read and alive."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from soupkit.io.reader import TensorReader


@dataclass
class LiveReads:
    """Bytes of tensors read from checkpoints that are still referenced, and the peak of that."""

    live: int = 0
    peak: int = 0
    reads: int = 0


@pytest.fixture
def live_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveReads]:
    """Track every tensor `TensorReader.read` returns until it (and every view of it) is freed.

    Each read is cloned into a tensor of its own and watched with `weakref.finalize`; views
    (``reshape``) and no-op casts keep that tensor alive, so ``peak`` is the most checkpoint data
    the code under test ever held at once.
    """
    stats = LiveReads()
    original = TensorReader.read

    def gone(n: int) -> None:
        stats.live -= n

    def read(self: TensorReader, info, start=0, stop=None, out=None):  # type: ignore[no-untyped-def]
        t = original(self, info, start, stop, out).clone()
        n = t.numel() * t.element_size()
        stats.live += n
        stats.reads += 1
        stats.peak = max(stats.peak, stats.live)
        weakref.finalize(t, gone, n)
        return t

    monkeypatch.setattr(TensorReader, "read", read)
    yield stats


@pytest.fixture(autouse=True)
def _small_threads() -> Iterator[None]:
    # The machine is shared: tiny models gain nothing from many threads.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
