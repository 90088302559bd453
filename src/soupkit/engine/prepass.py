"""The pre-pass runner: reads the deltas a method's `Prepass` declaration asks for.

A method that needs a whole-tensor (or whole-model) statistic before it can stream declares a
`soupkit.methods.Prepass`; this module runs any such declaration, knowing nothing of the method:

- ``scope == "global"`` (`global_stats`): before the merge pass, every tensor in scope (name
  order, `soupkit.planning.prepass.global_prepass_jobs`) is read chunk by chunk, once per pass the
  accumulator wants, the chunks shared between the compute threads; the result is each tensor's
  statistic;
- ``scope == "tensor"`` (`accumulate`, driven by `soupkit.engine.core`): the engine's pipeline
  reads the tensor's units once per pass before merging it (or counts the unit in hand when it
  holds the whole tensor); the pieces of a unit are shared between the compute threads, each
  accumulating into its own `fork`, added back with `join`.

The deltas are formed exactly as the merge pass forms them (the recipe's ``dtype`` first, then
``theta_i - theta_0`` in float32), so a statistic describes the numbers the method then sees.
The pure math (what is accumulated, how it is finalised) lives with the method in
`soupkit.methods`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soupkit.engine import native
from soupkit.engine.compute import Helpers, Workspace
from soupkit.engine.pipeline import chunks
from soupkit.io.header import TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.kernels import sparsify
from soupkit.methods import Prepass
from soupkit.methods._spec import Accumulator, TensorStat
from soupkit.methods._topk import magnitude_bits_
from soupkit.planning.plan import MergePlan, TensorJob
from soupkit.planning.prepass import global_prepass_jobs

__all__ = ["accumulate", "global_stats", "observe_into"]

Deltas = Callable[[Sequence[int]], dict[int, torch.Tensor]]


def observe_into(
    accs: Sequence[tuple[Prepass, Accumulator]],
    step: int,
    part: int,
    deltas: Deltas,
    raw: Callable[[int], sparsify.NativeMagnitude] | None = None,
) -> None:
    """Hand one chunk to every accumulator: ``deltas(models)`` gives those models' float32
    deltas for the chunk (scratch: `Prepass.observe` may overwrite them). Accumulators with the
    same ``observe`` share one computation of it, per model. With ``raw`` (model -> its chunk in
    the stored dtypes, for a native count), magnitude patterns are counted without forming them."""
    for observe in dict.fromkeys(d.observe for d, _ in accs):
        group = [a for d, a in accs if d.observe is observe]
        models = sorted({i for a in group for i in a.models})
        observed: dict[int, Any]
        if raw is not None and observe is magnitude_bits_:
            observed = {i: raw(i) for i in models}
        else:
            observed = {i: observe(d) for i, d in deltas(models).items()}
        for a in group:
            a.add(step, part, observed)


def _deltas(space: Workspace, raws: Sequence[torch.Tensor | None], s: int, e: int) -> Deltas:
    def load(models: Sequence[int]) -> dict[int, torch.Tensor]:
        xs, base = space.inputs(raws, s, e, True)
        assert base is not None
        return {i: xs[i].sub_(base) for i in models}  # xs: the workspace's scratch

    return load


def accumulate(
    accs: Sequence[tuple[Prepass, Accumulator]],
    step: int,
    raws: Sequence[torch.Tensor | None],
    n: int,
    *,
    pieces: int,
    threads: int,
    split: Callable[[Sequence[tuple[int, int]], Callable[[int, int, int], None], int], None],
    spaces: Sequence[Workspace],
    last: bool,
    native: bool = False,
    forks: dict[int, list[Accumulator]] | None = None,
) -> None:
    """Pass ``step`` over elements [0, n) of one unit (raw inputs, then the base), for every
    accumulator that wants it; ``last``: the unit ends the tensor, so the pass ends too.

    The pieces (``pieces`` elements) are shared between up to ``threads`` threads by ``split``;
    thread t converts into ``spaces[t]`` and accumulates into its own fork. ``native``: the
    stored dtypes convert straight to the deltas' float32 (no recipe ``dtype`` rounding them;
    the caller checks), so magnitude histograms may be counted by the native kernel.
    ``forks``: the helper threads' forks, kept from unit to unit of the pass (by accumulator) and
    added back when it ends, instead of new forks per unit (a fork's empty histograms cost page
    faults comparable to counting a unit: 1.3 s of TIES's pass on the benchmark).
    """
    want = [(d, a) for d, a in accs if a.wants(step)]
    kept = forks if forks is not None else {}
    if want:
        ranges = list(chunks(n, pieces))
        threads = min(threads, len(ranges))
        for _, a in want:
            have = kept.setdefault(id(a), [])
            have.extend(a.fork() for _ in range(len(have), threads - 1))
        parts = [want] + [[(d, kept[id(a)][t - 1]) for d, a in want] for t in range(1, threads)]

        *xr, br = raws
        present = [r for r in xr if r is not None]  # indexed as the float32 deltas are

        def piece(s: int, e: int, t: int) -> None:
            raw = None
            if native and br is not None:
                b = br[s:e]

                def raw(i: int) -> sparsify.NativeMagnitude:
                    return sparsify.NativeMagnitude(present[i][s:e], b)

            observe_into(parts[t], step, 0, _deltas(spaces[t], raws, s, e), raw)

        split(ranges, piece, threads)
    if forks is None or last:  # the pass ends: its forks are added back
        for _, a in want:
            for forked in kept.pop(id(a), []):
                a.join(forked)
    if last:
        for _, a in want:
            a.end_pass(step)


def _f32(
    reader: TensorReader, cast: torch.dtype | None, info: TensorInfo, a: int, b: int
) -> torch.Tensor:
    raw = reader.read(info, a, b)
    if cast is not None and raw.dtype != cast:
        raw = raw.to(cast)
    return raw.to(torch.float32)


def _file_deltas(
    reader: TensorReader, cast: torch.dtype | None, job: TensorJob, a: int, b: int
) -> Deltas:
    def load(models: Sequence[int]) -> dict[int, torch.Tensor]:
        assert job.base is not None
        base = _f32(reader, cast, job.base, a, b)
        # a new tensor per delta: an in-memory float32 input is the caller's own
        return {i: _f32(reader, cast, job.inputs[i], a, b) - base for i in models}

    return load


@dataclass(frozen=True)
class _Chunk:
    """Elements [a, b) of tensor ``job``, the ``part``-th in the global scope; ``native``: its
    magnitudes are counted by the native kernel from the stored dtypes."""

    part: int
    job: TensorJob
    a: int
    b: int
    native: bool


def _count_chunk(
    decl: Prepass,
    forks: Sequence[Accumulator],
    step: int,
    tasks: Sequence[_Chunk],
    reader: TensorReader,
    cast: torch.dtype | None,
    s: int,
    e: int,
    t: int,
) -> None:
    """Pass ``step`` of a global pre-pass over chunk ``tasks[s]``, on thread t (into its fork)."""
    c = tasks[s]
    raw = None
    if c.native:
        assert c.job.base is not None
        base = reader.read(c.job.base, c.a, c.b)

        def raw(i: int) -> sparsify.NativeMagnitude:
            return sparsify.NativeMagnitude(reader.read(c.job.inputs[i], c.a, c.b), base)

    deltas = _file_deltas(reader, cast, c.job, c.a, c.b)
    observe_into([(decl, forks[t])], step, c.part, deltas, raw)


def global_stats(plan: MergePlan, reader: TensorReader, threads: int = 1) -> dict[str, TensorStat]:
    """Run ``plan``'s global pre-pass: each tensor in scope's statistic (empty: none in scope).

    The chunks of a pass are shared between ``threads`` threads, each reading its chunks and
    counting into its own fork of the accumulator (added back with ``join``: integer counts,
    the same in any order). Where the plan's pieces run on a native kernel (the stored dtypes
    convert straight to the deltas' float32), magnitude patterns are counted natively from the
    stored dtypes (`soupkit.kernels.sparsify.magnitude_hist`), as the per-tensor pre-pass does.

    Args:
        plan: the merge plan (exact mode never streams, so it has no pre-pass).
        reader: an open `TensorReader`.
        threads: threads that read and count the chunks.
    """
    decl = plan.method.prepass
    chosen = global_prepass_jobs(plan.method, plan.jobs)
    if decl is None or not chosen or plan.config.compute == "exact":
        return {}
    params = chosen[0].params  # the declaration's check made them agree
    acc = decl.start(params, sum(j.numel for j in chosen))
    cast = getattr(torch, plan.config.dtype) if plan.config.dtype else None
    index = {id(j): n for n, j in enumerate(plan.jobs)}
    counted = [native.sparse_kernel(plan, index[id(j)], cast) is not None for j in chosen]
    tasks = [
        _Chunk(part, job, a, b, counted[part])
        for part, job in enumerate(chosen)
        for a, b in chunks(job.numel, plan.chunk_elems)
    ]
    threads = max(1, min(threads, len(tasks)))
    helpers = Helpers(threads)
    try:
        for step in range(decl.passes(params)):
            if not acc.wants(step):
                continue
            forks = [acc] + [acc.fork() for _ in range(1, threads)]
            each = functools.partial(_count_chunk, decl, forks, step, tasks, reader, cast)
            helpers.split([(n, n + 1) for n in range(len(tasks))], each, threads)
            for fork in forks[1:]:
                acc.join(fork)
            acc.end_pass(step)
    finally:
        helpers.shutdown()
    return {j.name: acc.result(part) for part, j in enumerate(chosen)}
