"""Exact top-k magnitude cuts from chunks: the statistic of TIES's and Breadcrumbs' trims.

Pure tensor code, chunk at a time (no I/O): the engine's pre-pass runner
(`soupkit.engine.prepass`) reads the deltas and hands their chunks to the accumulators here.

`soupkit.methods._ops.topk_cut` finds the cut that keeps the ``k`` largest ``|delta|`` of a
whole tensor with ``torch.kthvalue``: exact, but it needs the whole tensor in memory. `TopKSelect`
finds the *same* cut (same threshold, same tie quota, so the same surviving entries) from chunks
of the tensor, with a radix select over the bit patterns of ``|delta|`` (a non-negative float32
orders like its bit pattern read as an integer):

1. `TopKSelect.add_hi` histograms the top 16 bits of every chunk (``torch.bincount``);
   `TopKSelect.select_buckets` then picks, per k, the bucket that holds the k-th largest entry;
2. `TopKSelect.add_lo` histograms the low 16 bits of the entries inside those buckets;
   `TopKSelect.cut` then knows the k-th largest value exactly, and how many entries lie above
   it and equal to it.

NaN ranks above every number here, as in ``kthvalue``; to reproduce `topk_cut` exactly (it
counts ``above`` with ``>``, which NaN fails), the NaN entries are counted apart (the bucket of
+Inf, which also holds NaN bit patterns, is refined whenever it is not empty).

The pre-pass accumulators built on it (`TopKCounts`, `GlobalTopK`) are in
`soupkit.methods._cuts`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "BATCH_ENTRIES",
    "MagnitudeCut",
    "MagnitudeHist",
    "TopKSelect",
    "chunk_cut",
    "magnitude_bits",
    "magnitude_bits_",
    "select_bucket",
]

# The radix select counts bins per batch of this many entries (one int32 buffer per histogram).
BATCH_ENTRIES = 1 << 20

HI_BINS = 1 << 15  # top 16 bits of a non-negative float32 (the sign bit is 0)
LO_BINS = 1 << 16
_INF_BITS = 0x7F800000


@dataclass(frozen=True)
class MagnitudeCut:
    """Which entries of one model's task vector survive a magnitude trim, in one tensor.

    An entry survives when ``|delta| > threshold``; of the entries with ``|delta| == threshold``
    the first ``ties`` in flat (row-major) order survive, or all of them when ``ties`` is None.
    ``threshold = inf`` with ``ties = 0`` keeps nothing.
    """

    threshold: float
    ties: int | None = None


class MagnitudeHist(Protocol):
    """A chunk's ``|delta|`` bit patterns that count themselves into a histogram (a native
    kernel reading the stored dtypes: `soupkit.kernels.sparsify.magnitude_hist`), handed to
    `TopKSelect` instead of the patterns: the same counts."""

    def hist(self, out: torch.Tensor, bucket: int) -> None:
        """Add the patterns' top 16 bits (``bucket < 0``, `HI_BINS` bins) or the low 16 bits of
        those in top-16-bit bucket ``bucket`` (`LO_BINS` bins) to ``out`` (int64)."""
        ...


def magnitude_bits(delta: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """int32 bit patterns of ``|delta|`` (float32 ``delta``): the bits of ``delta`` with the
    sign bit cleared, which is what ``abs`` does (NaN included), in one pass. A new tensor, or
    with ``inplace`` a view of ``delta``'s memory (then overwritten)."""
    bits = delta.view(torch.int32)
    return bits.bitwise_and_(0x7FFFFFFF) if inplace else bits.bitwise_and(0x7FFFFFFF)


def magnitude_bits_(delta: torch.Tensor) -> torch.Tensor:
    """`magnitude_bits` in place: what a magnitude pre-pass observes of a delta chunk."""
    return magnitude_bits(delta, inplace=True)


def _lo_bins(start: int, bits: torch.Tensor, out: torch.Tensor) -> None:
    """The low 16 bits of the entries inside the bucket whose first pattern is ``start``, as
    bins 1..65536, without a boolean gather: entries below the bucket go to bin 0, entries
    above it to the last."""
    if start > 0:  # bits - (start - 1) cannot overflow: one pass fewer
        torch.sub(bits, start - 1, out=out).clamp_(0, LO_BINS + 1)
    else:
        torch.sub(bits, start, out=out).clamp_(-1, LO_BINS).add_(1)


def select_bucket(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest entry, and how many entries lie in higher buckets."""
    from_top = torch.flip(hist, [0]).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype)))
    bucket = hist.numel() - 1 - j
    return bucket, int(from_top[j]) - int(hist[bucket])


class TopKSelect:
    """The exact top-``k`` magnitude cut of one tensor (``numel`` entries), from its chunks.

    Usage: `add_hi` for every chunk, `select_buckets`, `add_lo` for every chunk, then `cut`.
    Several ``k`` share the passes.

    Args:
        numel: entries of the whole tensor.
        ks: the numbers of entries to keep, each ``0 < k < numel``.
    """

    def __init__(self, numel: int, ks: tuple[int, ...]) -> None:
        self.numel = numel
        self.ks = ks
        self.hi = torch.zeros(HI_BINS, dtype=torch.int64)
        self.buckets: dict[int, tuple[int, int]] = {}
        self.lo: dict[int, torch.Tensor] = {}
        # Bin indices are computed per chunk (cache-sized) and counted in batches: a bincount
        # costs a whole histogram of memory traffic whatever its input size, which would
        # dominate on small chunks. One batch buffer per histogram (-1: the top-16-bit one).
        self._batches: dict[int, list[Any]] = {}

    def fork(self) -> TopKSelect:
        """An empty counter for the same pass, for another thread; add it back with `join`
        (integer counts: the same totals in any order)."""
        part = TopKSelect(self.numel, self.ks)
        part.buckets = self.buckets
        part.lo = {b: torch.zeros_like(h) for b, h in self.lo.items()}
        return part

    def join(self, part: TopKSelect) -> None:
        """Add the counts of a `fork` (which is spent afterwards)."""
        part._flush()
        self.hi += part.hi
        for b, h in part.lo.items():
            self.lo[b] += h

    def add_hi(self, bits: torch.Tensor | MagnitudeHist) -> None:
        """Count a chunk's bit patterns (from `magnitude_bits`) by their top 16 bits."""
        if not isinstance(bits, torch.Tensor):
            bits.hist(self.hi, -1)
            return
        self._add(-1, bits, lambda src, dst: torch.bitwise_right_shift(src, 16, out=dst))

    def select_buckets(self) -> None:
        self._flush()
        self._batches.clear()
        self.buckets = {k: select_bucket(self.hi, k) for k in self.ks}
        refine = {b for b, _ in self.buckets.values()}
        if int(self.hi[_INF_BITS >> 16]):  # +Inf shares its bucket with NaN patterns
            refine.add(_INF_BITS >> 16)
        self.lo = {b: torch.zeros(LO_BINS, dtype=torch.int64) for b in sorted(refine)}

    def add_lo(self, bits: torch.Tensor | MagnitudeHist) -> None:
        """Count a chunk's entries inside the selected buckets (after `select_buckets`)."""
        for b in self.lo:
            if not isinstance(bits, torch.Tensor):
                bits.hist(self.lo[b], b)
                continue
            self._add(b, bits, functools.partial(_lo_bins, b << 16))

    def _add(
        self, key: int, bits: torch.Tensor, bins: Callable[[torch.Tensor, torch.Tensor], object]
    ) -> None:
        """Queue the bin indices of ``bits`` for histogram ``key``: ``bins(bits, out)`` writes
        them straight into the batch buffer (no temporary, no copy)."""
        m = bits.numel()
        batch = self._batches.setdefault(key, [torch.empty(BATCH_ENTRIES, dtype=torch.int32), 0])
        if batch[1] + m > BATCH_ENTRIES:
            self._count(key, batch[0][: batch[1]])
            batch[1] = 0
        if m > BATCH_ENTRIES:
            idx = torch.empty(m, dtype=torch.int32)
            bins(bits.reshape(-1), idx)
            self._count(key, idx)
            return
        bins(bits.reshape(-1), batch[0][batch[1] : batch[1] + m])
        batch[1] += m

    def _count(self, key: int, idx: torch.Tensor) -> None:
        if key < 0:
            self.hi += torch.bincount(idx, minlength=HI_BINS)
        else:
            self.lo[key] += torch.bincount(idx, minlength=LO_BINS + 2)[1 : LO_BINS + 1]

    def _flush(self) -> None:
        for key, batch in self._batches.items():
            if batch[1]:
                self._count(key, batch[0][: batch[1]])
                batch[1] = 0

    @property
    def _nan(self) -> int:
        """Entries whose magnitude is NaN (bit pattern above +Inf)."""
        top = _INF_BITS >> 16
        n = int(self.hi[top + 1 :].sum())
        if top in self.lo:  # the bucket of +Inf also holds NaN patterns 0x7F800001..
            n += int(self.lo[top][1:].sum())
        return n

    def cut(self, k: int) -> MagnitudeCut:
        """The cut that keeps ``k`` entries, exactly as `soupkit.methods._ops.topk_cut` gives it."""
        self._flush()
        bucket, above_hi = self.buckets[k]
        lo = self.lo[bucket]
        low, above_lo = select_bucket(lo, k - above_hi)
        pattern = (bucket << 16) | low
        equal = int(lo[low])
        above = above_hi + above_lo
        if pattern > _INF_BITS:  # the k-th largest is NaN: kthvalue's threshold is NaN
            return MagnitudeCut(math.nan, k)
        need = k - (above - self._nan)  # topk_cut counts `above` with `>`, which NaN fails
        threshold = float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32))
        return MagnitudeCut(threshold, None if need == equal else need)


def chunk_cut(
    cut: MagnitudeCut | None, equal_in_chunk: int, quota_left: int
) -> tuple[MagnitudeCut | None, int]:
    """The part of a tensor's cut that applies to its next chunk, and the tie quota left after it.

    Chunks must come in flat order. ``equal_in_chunk`` is how many entries of the chunk equal
    the threshold (only needed when ``cut.ties`` is a number).
    """
    if cut is None or cut.ties is None or cut.threshold != cut.threshold:  # NaN threshold: no ties
        return cut, quota_left
    take = min(equal_in_chunk, quota_left)
    # every tied entry of the chunk survives: that is the ``>=`` rule (ties None), which the
    # methods apply without the running count the boundary chunk needs
    ties = None if 0 < take == equal_in_chunk else take
    return MagnitudeCut(cut.threshold, ties), quota_left - take
