"""Exact global magnitude cuts for ``trim_scope: global`` (TIES), by streaming radix select.

The TIES paper keeps the top-k entries of each model's *whole* task vector. For a model larger
than RAM, this pre-pass finds, for each model i, the exact ``k_i``-th largest ``|delta_i|``
over every tensor that asks for a global trim (``k_i = int(density_i * N)``, N = their total
number of entries) without ever concatenating tensors:

1. A non-negative float32's bit pattern, read as an integer, orders exactly like its value.
   Pass 1 histograms the top 16 bits of ``|delta_i|`` over every chunk of every tensor and
   picks the bucket that holds the k-th largest entry.
2. Pass 2 histograms the low 16 bits of the entries in that bucket: the k-th largest value
   follows exactly (a radix select in two digits of 16 bits).
3. Only if more entries tie at that value than are needed (and the value is not 0), pass 3
   counts the tied entries per tensor, so that the tie rule below can be applied per tensor.

Ties at the threshold are resolved deterministically: exactly k entries survive; of the
entries equal to the threshold, those of the tensor whose name sorts first survive first, and
within a tensor those with the lower flat index. The cut of each tensor (`MagnitudeCut`) is
known before the merge pass, so the merge pass stays order-independent.

Memory: two histograms per model (32 768 and 65 536 bins) plus one chunk of inputs. Cost: two
(rarely three) extra reads of the inputs. The deltas are formed exactly as the merge pass forms
them (same cast, ``theta_i - theta_0`` in float32), so the cut applies to the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from soupkit.engine.tensor_trim import select_bucket as _select
from soupkit.io.header import TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.methods import MagnitudeCut, MethodSpec

if TYPE_CHECKING:  # plan imports this module for `check_global_trim`
    from soupkit.planning.plan import MergePlan, TensorJob

__all__ = [
    "GlobalTrim",
    "check_global_trim",
    "compute_cuts",
    "global_trim_jobs",
    "global_trim_notes",
]

_HI_BINS = 1 << 15  # top 16 bits of a non-negative float32 (the sign bit is 0)
_LO_BINS = 1 << 16


@dataclass(frozen=True)
class GlobalTrim:
    """The global cut of one model: threshold, survivors in total, and the tie quota."""

    k: int
    total: int
    threshold: float
    above: int
    tied: int

    @property
    def tie_quota(self) -> int:
        """How many entries equal to the threshold survive (over all tensors)."""
        return self.k - self.above


def global_trim_jobs(spec: MethodSpec, jobs: Sequence[TensorJob]) -> list[TensorJob]:
    """The merged tensors whose resolved parameters ask for a global trim, sorted by name."""
    if spec.global_trim is None:
        return []
    chosen = [j for j in jobs if j.params is not None and spec.global_trim(j.params) is not None]
    return sorted(chosen, key=lambda j: j.name)


def check_global_trim(spec: MethodSpec, jobs: Sequence[TensorJob]) -> list[str]:
    """Problems with a global trim (densities that differ between tensors), for the planner."""
    chosen = global_trim_jobs(spec, jobs)
    if not chosen or spec.global_trim is None:
        return []
    first = chosen[0]
    ref = spec.global_trim(first.params)  # type: ignore[arg-type]
    for j in chosen[1:]:
        got = spec.global_trim(j.params)  # type: ignore[arg-type]
        if got != ref:
            return [
                f"trim_scope: global trims each model's whole task vector to one density, "
                f"but tensor {first.name!r} has density {list(ref or ())} and {j.name!r} has "
                f"{list(got or ())}\n    hint: use trim_scope: per_tensor for per-tensor "
                "densities (filters, gradients), or one density per model"
            ]
    return []


def global_trim_notes(spec: MethodSpec, jobs: Sequence[TensorJob]) -> list[str]:
    """What ``soupkit plan`` should say about a global trim (its extra reads)."""
    chosen = global_trim_jobs(spec, jobs)
    if not chosen:
        return []
    return [
        f"trim_scope: global: a pre-pass reads the {len(chosen)} trimmed tensors of every model "
        "two more times (three if many entries tie at a threshold) to find each model's exact "
        "global magnitude threshold"
    ]


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    # clear the sign bit: abs() of a NaN may keep it, and bincount refuses negative values
    return magnitude.view(torch.int32) & 0x7FFFFFFF


class _Deltas:
    """Streams ``|theta_i - theta_0|`` chunk by chunk, exactly as the merge pass forms it."""

    def __init__(self, reader: TensorReader, cast_to: torch.dtype | None, chunk: int) -> None:
        self.reader, self.cast_to, self.chunk = reader, cast_to, chunk

    def _f32(self, info: TensorInfo, a: int, b: int) -> torch.Tensor:
        raw = self.reader.read(info, a, b)
        if self.cast_to is not None and raw.dtype != self.cast_to:
            raw = raw.to(self.cast_to)
        return raw.to(torch.float32)

    def each(self, job: TensorJob, fn: Callable[[int, torch.Tensor], None]) -> None:
        """Call ``fn(model_index, bits of |delta| as int32)`` for every chunk of ``job``."""
        assert job.base is not None
        for a in range(0, job.numel, self.chunk):
            b = min(job.numel, a + self.chunk)
            base = self._f32(job.base, a, b)
            for i, info in enumerate(job.inputs):
                fn(i, _bits((self._f32(info, a, b) - base).abs_()))


def compute_cuts(
    plan: MergePlan,
    reader: TensorReader,
    *,
    stats: dict[int, GlobalTrim] | None = None,
) -> dict[str, tuple[MagnitudeCut | None, ...]]:
    """Run the pre-pass for ``plan``: each globally trimmed tensor's cut, one per model.

    Args:
        plan: the merge plan (its method declares ``global_trim``).
        reader: an open `TensorReader`.
        stats: if given, filled with each trimmed model's `GlobalTrim` (for reports and tests).

    Returns:
        Tensor name -> per-model cuts (None for a model that keeps everything). Empty when no
        tensor asks for a global trim.
    """
    spec = plan.method
    chosen = global_trim_jobs(spec, plan.jobs)
    if not chosen or spec.global_trim is None:
        return {}
    densities = spec.global_trim(chosen[0].params)  # type: ignore[arg-type]
    assert densities is not None
    cast = getattr(torch, plan.config.dtype) if plan.config.dtype else None
    deltas = _Deltas(reader, cast, plan.chunk_elems)
    total = sum(j.numel for j in chosen)
    n_models = len(densities)
    ks = [int(d * total) for d in densities]
    active = [i for i in range(n_models) if densities[i] < 1 and 0 < ks[i] < total]

    result: dict[int, GlobalTrim] = {}
    if active:
        hi = [torch.zeros(_HI_BINS, dtype=torch.int64) for _ in range(n_models)]

        def pass1(i: int, bits: torch.Tensor) -> None:
            if i in active:
                hi[i] += torch.bincount(bits >> 16, minlength=_HI_BINS)

        for job in chosen:
            deltas.each(job, pass1)
        buckets = {i: _select(hi[i], ks[i]) for i in active}

        lo = [torch.zeros(_LO_BINS, dtype=torch.int64) for _ in range(n_models)]

        def pass2(i: int, bits: torch.Tensor) -> None:
            if i in active:
                inside = bits[(bits >> 16) == buckets[i][0]]
                lo[i] += torch.bincount(inside & 0xFFFF, minlength=_LO_BINS)

        for job in chosen:
            deltas.each(job, pass2)
        for i in active:
            bucket, above_hi = buckets[i]
            low, above_lo = _select(lo[i], ks[i] - above_hi)
            pattern = torch.tensor([(bucket << 16) | low], dtype=torch.int32)
            threshold = float(pattern.view(torch.float32))
            result[i] = GlobalTrim(ks[i], total, threshold, above_hi + above_lo, int(lo[i][low]))

    # Pass 3 only where surplus ties at a nonzero threshold make the per-tensor quota matter.
    need_counts = [i for i, g in result.items() if g.tie_quota < g.tied and g.threshold != 0.0]
    tied_in: dict[tuple[int, str], int] = {}
    if need_counts:
        patterns = {
            i: int(torch.tensor([result[i].threshold], dtype=torch.float32).view(torch.int32))
            for i in need_counts
        }
        current: list[str] = [""]

        def pass3(i: int, bits: torch.Tensor) -> None:
            if i in patterns:
                key = (i, current[0])
                tied_in[key] = tied_in.get(key, 0) + int((bits == patterns[i]).sum())

        for job in chosen:
            current[0] = job.name
            deltas.each(job, pass3)

    cuts: dict[str, list[MagnitudeCut | None]] = {j.name: [None] * n_models for j in chosen}
    for i in range(n_models):
        if densities[i] >= 1 or ks[i] >= total:
            continue
        if ks[i] <= 0:
            for j in chosen:
                cuts[j.name][i] = MagnitudeCut(float("inf"), 0)
            continue
        g = result[i]
        if i not in need_counts:
            for j in chosen:
                cuts[j.name][i] = MagnitudeCut(g.threshold, None)
            continue
        remaining = g.tie_quota
        for j in chosen:  # name order: earlier tensors take their ties first
            quota = min(tied_in.get((i, j.name), 0), remaining)
            remaining -= quota
            cuts[j.name][i] = MagnitudeCut(g.threshold, quota)
    if stats is not None:
        stats.update(result)
    return {name: tuple(c) for name, c in cuts.items()}
