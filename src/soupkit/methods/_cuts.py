"""Magnitude-cut pre-passes: the accumulators and statistic of TIES's and Breadcrumbs' trims.

Pure tensor code, chunk at a time, on the radix select of `soupkit.methods._topk`:

- `TopKCounts` (scope: one tensor): each model's exact top-k cuts of the tensor (one or more k
  per model: TIES keeps the top k, Breadcrumbs a band between two cuts);
- `GlobalTopK` (scope: every tensor that asks for it): each model's k-th largest ``|delta_i|``
  over all of them (TIES ``trim_scope: global``), and, only when more entries tie at it than
  are needed, a third pass that counts the tied entries per tensor. Ties at the threshold go to
  the tensor that comes first (the engine hands tensors in name order), then to the lower flat
  index, so exactly ``k`` entries survive;
- `TensorCuts`: once a tensor's cuts are known a trim is elementwise; `TensorCuts.piece` gives
  the cuts of each next piece (flat order), spreading each cut's tie quota over the pieces
  (`soupkit.methods._topk.chunk_cut`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from soupkit.methods._topk import (
    HI_BINS,
    LO_BINS,
    MagnitudeCut,
    MagnitudeHist,
    TopKSelect,
    chunk_cut,
    select_bucket,
)

__all__ = ["GlobalTopK", "TensorCuts", "TopKCounts"]

Cuts = tuple["MagnitudeCut | None", ...]


class TensorCuts:
    """The cuts of one tensor, per model (one or more per model), handed out piece by piece.

    `piece` must see the tensor's pieces in flat order: each cut's tie quota is spent from the
    first piece on, so the pieces together keep exactly the entries the whole-tensor cut keeps.
    """

    def __init__(self, cuts: Sequence[Cuts]) -> None:
        self.cuts = [tuple(c) for c in cuts]
        self.quota = [
            [c.ties if c is not None and c.ties is not None else 0 for c in cc] for cc in cuts
        ]

    def piece(self, xs: Sequence[torch.Tensor], base: torch.Tensor | None) -> list[Cuts]:
        """The cuts of the next piece, from its model tensors ``xs`` and ``base`` (unchanged;
        float32, or their stored dtype, which converts to float32 exactly: a native kernel's
        caller need not convert the piece)."""
        return self.piece_counted(self.count(xs, base))

    def count(
        self,
        xs: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        equal: Callable[[torch.Tensor, torch.Tensor, float], int] | None = None,
    ) -> dict[tuple[int, int], int]:
        """What `piece_counted` needs of a piece: per (model, cut) whose tie quota is not spent
        yet, how many entries of the piece have ``|x - base|`` equal to the threshold. Changes
        nothing, so the pieces of a tensor may be counted on several threads, in any order,
        before they are handed out. ``equal(x, base, t)`` counts (default: torch on float32
        copies; a native kernel counts from the stored dtypes, the same number)."""
        counts: dict[tuple[int, int], int] = {}
        magnitude: dict[int, torch.Tensor] = {}
        for i, cc in enumerate(self.cuts):
            for j, c in enumerate(cc):
                if c is None or c.ties is None or c.threshold != c.threshold:
                    continue
                if self.quota[i][j] <= 0:
                    continue
                assert base is not None
                if equal is not None:
                    counts[(i, j)] = equal(xs[i], base, c.threshold)
                    continue
                if i not in magnitude:
                    magnitude[i] = (xs[i].float() - base.float()).abs_()
                counts[(i, j)] = int((magnitude[i] == c.threshold).sum())
        return counts

    def piece_counted(self, counts: Mapping[tuple[int, int], int]) -> list[Cuts]:
        """The cuts of the next piece (flat order) from its `count`: each tie quota is spent
        here, in the order the pieces are handed out."""
        out: list[Cuts] = []
        for i, cc in enumerate(self.cuts):
            row: list[MagnitudeCut | None] = []
            for j, c in enumerate(cc):
                pc, self.quota[i][j] = chunk_cut(c, counts.get((i, j), 0), self.quota[i][j])
                row.append(pc)
            out.append(tuple(row))
        return out


class TopKCounts:
    """Pre-pass accumulator (scope: one tensor): the exact top-k cuts of each model's deltas.

    Args:
        numel: entries of the tensor.
        ks: per model, the numbers of entries to keep (``k >= numel``: no cut; ``k <= 0``:
            nothing kept).
    """

    def __init__(self, numel: int, ks: Sequence[tuple[int, ...]]) -> None:
        self.numel = numel
        self.ks = [tuple(k) for k in ks]
        self.select = {
            i: TopKSelect(numel, tuple(k for k in kk if 0 < k < numel))
            for i, kk in enumerate(self.ks)
            if any(0 < k < numel for k in kk)
        }

    @property
    def models(self) -> tuple[int, ...]:
        return tuple(self.select)

    def wants(self, step: int) -> bool:
        return step < 2 and bool(self.select)

    def add(self, step: int, part: int, observed: Mapping[int, torch.Tensor]) -> None:
        for i, sel in self.select.items():
            sel.add_hi(observed[i]) if step == 0 else sel.add_lo(observed[i])

    def end_pass(self, step: int) -> None:
        if step == 0:
            for sel in self.select.values():
                sel.select_buckets()

    def fork(self) -> TopKCounts:
        part = TopKCounts.__new__(TopKCounts)
        part.numel, part.ks = self.numel, self.ks
        part.select = {i: sel.fork() for i, sel in self.select.items()}
        return part

    def join(self, part: TopKCounts) -> None:
        for i, sel in self.select.items():
            sel.join(part.select[i])

    def _cut(self, i: int, k: int) -> MagnitudeCut | None:
        if k >= self.numel:
            return None
        if k <= 0:
            return MagnitudeCut(math.inf, 0)
        return self.select[i].cut(k)

    def result(self, part: int) -> TensorCuts:
        return TensorCuts([tuple(self._cut(i, k) for k in kk) for i, kk in enumerate(self.ks)])


class GlobalTopK:
    """Pre-pass accumulator (scope: every tensor that asks for it, in name order): each model's
    exact global top-``k`` cut, as per-tensor cuts (`TensorCuts`, one cut per model).

    Pass 0 histograms the top 16 bits, pass 1 the low 16 bits inside the chosen bucket; pass 2
    (only where surplus ties at a nonzero threshold make the per-tensor quota matter) counts the
    tied entries per tensor ("part").

    Args:
        total: entries of all tensors in scope.
        ks: per model, how many entries survive (``k >= total``: no cut).
    """

    def __init__(self, total: int, ks: Sequence[int]) -> None:
        self.total = total
        self.ks = list(ks)
        self.active = [i for i, k in enumerate(ks) if 0 < k < total]
        self.hi = {i: torch.zeros(HI_BINS, dtype=torch.int64) for i in self.active}
        self.lo = {i: torch.zeros(LO_BINS, dtype=torch.int64) for i in self.active}
        self.buckets: dict[int, tuple[int, int]] = {}
        # per model: threshold, entries above it, entries tied at it (after pass 1)
        self.found: dict[int, tuple[float, int, int]] = {}
        self.patterns: dict[int, int] = {}  # models whose ties are counted per part (pass 2)
        self.tied: dict[tuple[int, int], int] = {}
        self._cuts: list[list[MagnitudeCut | None]] = []
        self._left: dict[int, int] = {}

    @property
    def models(self) -> tuple[int, ...]:
        return tuple(self.active)

    def wants(self, step: int) -> bool:
        return bool(self.active) and (step < 2 or (step == 2 and bool(self.patterns)))

    def add(self, step: int, part: int, observed: Mapping[int, torch.Tensor]) -> None:
        for i in self.active:
            bits = observed[i]
            if not isinstance(bits, torch.Tensor):  # patterns that count themselves natively
                self._add_counted(step, part, i, bits)
                continue
            if step == 0:
                self.hi[i] += torch.bincount(bits >> 16, minlength=HI_BINS)
            elif step == 1:
                inside = bits[(bits >> 16) == self.buckets[i][0]]
                self.lo[i] += torch.bincount(inside & 0xFFFF, minlength=LO_BINS)
            elif i in self.patterns:
                key = (i, part)
                self.tied[key] = self.tied.get(key, 0) + int((bits == self.patterns[i]).sum())

    def _add_counted(self, step: int, part: int, i: int, bits: MagnitudeHist) -> None:
        """`add` of model i's chunk given as a `MagnitudeHist`: the same counts."""
        if step == 0:
            bits.hist(self.hi[i], -1)
        elif step == 1:
            bits.hist(self.lo[i], self.buckets[i][0])
        elif i in self.patterns:  # the tied pattern's count: its bin in its bucket's histogram
            pattern = self.patterns[i]
            lo = torch.zeros(LO_BINS, dtype=torch.int64)
            bits.hist(lo, pattern >> 16)
            key = (i, part)
            self.tied[key] = self.tied.get(key, 0) + int(lo[pattern & 0xFFFF])

    def end_pass(self, step: int) -> None:
        if step == 0:
            self.buckets = {i: select_bucket(self.hi[i], self.ks[i]) for i in self.active}
        elif step == 1:
            for i in self.active:
                bucket, above_hi = self.buckets[i]
                low, above_lo = select_bucket(self.lo[i], self.ks[i] - above_hi)
                pattern = torch.tensor([(bucket << 16) | low], dtype=torch.int32)
                threshold = float(pattern.view(torch.float32))
                self.found[i] = (threshold, above_hi + above_lo, int(self.lo[i][low]))
            # surplus ties at a nonzero threshold: count them per tensor (pass 2)
            self.patterns = {
                i: int(torch.tensor([t], dtype=torch.float32).view(torch.int32))
                for i, (t, above, tied) in self.found.items()
                if self.ks[i] - above < tied and t != 0.0
            }

    def fork(self) -> GlobalTopK:
        part = GlobalTopK(self.total, self.ks)
        part.buckets, part.patterns = self.buckets, self.patterns
        return part

    def join(self, part: GlobalTopK) -> None:
        for i in self.active:
            self.hi[i] += part.hi[i]
            self.lo[i] += part.lo[i]
        for key, n in part.tied.items():
            self.tied[key] = self.tied.get(key, 0) + n

    def result(self, part: int) -> TensorCuts:
        """The cuts of tensor ``part`` (asked for in order: the tie quotas go to earlier parts
        first)."""
        if not self._cuts:
            self._left = {i: self.ks[i] - above for i, (_, above, _) in self.found.items()}
        while len(self._cuts) <= part:
            p = len(self._cuts)
            row: list[MagnitudeCut | None] = []
            for i, k in enumerate(self.ks):
                if k >= self.total:
                    row.append(None)
                elif k <= 0:
                    row.append(MagnitudeCut(math.inf, 0))
                elif i not in self.patterns:
                    row.append(MagnitudeCut(self.found[i][0], None))
                else:
                    quota = min(self.tied.get((i, p), 0), self._left[i])
                    self._left[i] -= quota
                    row.append(MagnitudeCut(self.found[i][0], quota))
            self._cuts.append(row)
        return TensorCuts([(c,) for c in self._cuts[part]])
