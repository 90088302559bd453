"""What the reader thread reads, in which order: the engine's units.

A unit is a range of one tensor's elements, read once for every plan that merges the tensor
(`soupkit.engine.pipeline.Unit`). How a plan handles a tensor decides the unit size:

- whole tensors (``WHOLE``): the method needs them (SLERP, DELLA, ...) or exact mode;
- elementwise (``ELEM``): any pieces; for one plan on file inputs the compute threads read each
  piece themselves (`Schedule._lazy`);
- stochastic elementwise (``BLOCK``): one RNG block per compute thread;
- with a pre-pass statistic (``STAT``, `soupkit.methods.Prepass`): the per-tensor pre-pass
  units first (unless one unit holds the whole tensor), then the merge units.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from soupkit.engine.pipeline import Unit, chunks
from soupkit.io.header import TensorInfo
from soupkit.methods._spec import MethodSpec
from soupkit.planning.plan import MergePlan, TensorJob

__all__ = ["BLOCK", "ELEM", "STAT", "WHOLE", "Schedule", "mode"]

WHOLE, ELEM, BLOCK, STAT = "whole", "elem", "block", "stat"


def mode(spec: MethodSpec, exact: bool) -> str:
    if exact or spec.streams_whole_tensors:
        return WHOLE
    if spec.prepass is not None:
        return STAT
    return BLOCK if spec.stochastic else ELEM


class Schedule:
    """The scheduling half of `soupkit.engine.core._Engine` (which sets these attributes)."""

    plans: Sequence[MergePlan]
    jobs: Sequence[TensorJob]
    modes: list[str]
    skips: Sequence[frozenset[str]]
    rng_block: int
    workers: int

    def _active(self, j: int) -> list[int]:
        return [k for k, p in enumerate(self.plans) if p.jobs[j].name not in self.skips[k]]

    def _tensor_passes(self, k: int, j: int) -> int:
        """Passes of plan k's per-tensor pre-pass over tensor j (0: none)."""
        job, decl = self.plans[k].jobs[j], self.plans[k].method.prepass
        if self.modes[k] != STAT or decl is None or job.params is None:
            return 0
        return decl.passes(job.params) if decl.scope(job.params) == "tensor" else 0

    def _lazy(self, infos: Sequence[TensorInfo | None], active: Sequence[int]) -> bool:
        """Whether the compute threads read a unit's pieces themselves: for one plan of a cheap
        elementwise method on file inputs. A piece is then read into a small per-thread buffer
        and converted while it is still in that core's cache, instead of a whole unit being
        copied out of the page cache by the reader thread and read back from memory by the
        main thread: the linear benchmark's pass went from 2.9 to 2.6 s, with a third less
        system CPU (benchmarks/README.md). Several plans share one read of each unit instead."""
        return (
            len(active) == 1
            and self.modes[active[0]] == ELEM
            and all(t is None or t.data is None for t in infos)
        )

    def schedule(self) -> Iterator[Unit]:
        for j, job in enumerate(self.jobs):
            active = self._active(j)
            if not active:
                yield Unit(j, "skip", 0, 0, ())
                continue
            if job.source is not None:
                for a, b in chunks(job.numel, self.plans[0].chunk_elems):
                    yield Unit(j, "copy", a, b, (job.source,), (b - a) * job.source.itemsize)
                continue
            bases = (self.plans[k].jobs[j].base for k in active)
            base = next((b for b in bases if b is not None), None)
            infos = (*job.inputs, base)
            per_elem = sum(t.itemsize for t in job.inputs) + (
                base.itemsize if base is not None else 0
            )
            modes = {self.modes[k] for k in active}
            if WHOLE in modes:
                step = max(job.numel, 1)
            elif BLOCK in modes:
                step = self.rng_block * self.workers  # one RNG block per compute thread
            else:
                step = self.plans[0].chunk_elems
            # a per-tensor pre-pass reads the tensor first, unless one unit holds all of it
            passes = max(self._tensor_passes(k, j) for k in active) if step < job.numel else 0
            lazy = self._lazy(infos, active)  # never for pre-pass units (not ELEM)
            for p in [*range(passes), -1]:
                for a, b in chunks(job.numel, step):
                    phase = "merge" if p < 0 else "prepass"
                    yield Unit(j, phase, a, b, infos, (b - a) * per_elem, lazy, step=max(p, 0))
