"""The engine proper: one pass over the plans' tensors, read -> float32 method -> cast -> write.

`_Engine` runs one plan or several plans that read the same tensors (a sweep), each tensor in
*units*: a chunk of every input, read once for all plans by the reader thread
(`soupkit.engine.pipeline`). How a plan handles a tensor depends on its method:

- whole tensors (``WHOLE``): the method needs them (SLERP, DELLA, ...) or exact mode;
- elementwise (``ELEM``): any pieces; for one plan on file inputs the compute threads read each
  piece themselves (`soupkit.engine.schedule.Schedule._lazy`);
- stochastic elementwise (``BLOCK``): RNG blocks, each drawing from the tensor's counter-based
  generator (`soupkit.methods.CounterRNG`: key from (recipe seed, tensor name), offset the
  block's first element), so the draws depend on neither blocks nor threads;
- with a pre-pass statistic (``STAT``, `soupkit.methods.Prepass`): the statistic first (a global
  one from `soupkit.engine.prepass.global_stats`, a per-tensor one from pre-pass units of the
  tensor), then pieces in flat order, each given its part of the statistic.

The pieces of a unit are shared between the compute threads (`Helpers.split` in
`soupkit.engine.compute`); every piece is computed exactly as it would be alone, so output
bytes depend neither on threads nor on chunking. `_Engine._call` is the one place a method's
torch function is called on a piece; an elementwise piece whose method has a native kernel
(`soupkit.kernels.for_method`: one fused pass from the stored dtypes to the output dtype, the
same bytes) runs that instead (`_Engine._kernel_piece`); so do the RNG blocks, whole tensors and
statistic pieces of the sparsifying methods that `soupkit.engine.native.sparse_kernel` finds a
kernel for (`_Engine._sparse_piece`, `_Engine._whole`).
"""

from __future__ import annotations

import functools
import queue
from collections.abc import Callable, Mapping, Sequence

import torch

from soupkit import kernels
from soupkit._util import interrupts as _interrupts
from soupkit.engine import native, prepass
from soupkit.engine.compute import Helpers, Workspace, exact_inputs, tensor_seed
from soupkit.engine.nonfinite import Loader, all_finite, nonfinite_error
from soupkit.engine.pipeline import (
    END,
    POLL,
    Budget,
    BufferPool,
    Failure,
    ReadAhead,
    Unit,
    WriteBehind,
    chunks,
)
from soupkit.engine.schedule import BLOCK, ELEM, STAT, WHOLE, Schedule, mode
from soupkit.engine.sinks import Sink
from soupkit.errors import MethodInputError, shown
from soupkit.io.header import DTYPES
from soupkit.io.reader import TensorReader
from soupkit.methods._philox import CounterRNG
from soupkit.methods._spec import Accumulator, CountedStat, TensorStat
from soupkit.planning.plan import MergePlan, TensorJob


class _Engine(Schedule):
    """One pass of ``plans`` (same inputs) into ``sinks``; `run` it once.

    Args:
        global_stats: per plan, the statistics of its global pre-pass (tensor name -> stat).
        compute_elems: elements per compute piece; rng_block: elements per RNG block.
        workers: threads for RNG blocks; stream_workers: threads for cheap elementwise pieces
            and pre-pass counting.
    """

    def __init__(
        self,
        plans: Sequence[MergePlan],
        sinks: Sequence[Sink],
        reader: TensorReader,
        diag: TensorReader,
        *,
        progress: Callable[[int], None] | None,
        allow_nonfinite: bool,
        skips: Sequence[frozenset[str]],
        global_stats: Sequence[Mapping[str, TensorStat]],
        compute_elems: int,
        rng_block: int,
        workers: int = 1,
        stream_workers: int = 1,
    ) -> None:
        self.plans, self.sinks, self.reader = plans, sinks, reader
        self.jobs = plans[0].jobs
        self.progress = progress
        self.allow_nonfinite = allow_nonfinite
        self.skips = skips
        self.global_stats = global_stats
        self.cast = getattr(torch, plans[0].config.dtype) if plans[0].config.dtype else None
        self.diag = Loader(diag, self.cast)  # re-reads inputs to explain NaN / Inf
        self.compute_elems, self.rng_block = compute_elems, rng_block
        # exact mode (compute: exact): whole tensors in the recipe's dtype, mergekit's arithmetic
        self.exact = [p.config.compute == "exact" for p in plans]
        self.modes = [mode(p.method, ex) for p, ex in zip(plans, self.exact)]
        # Pieces of a unit are split between `workers` threads (RNG blocks) or `stream_workers`
        # threads (cheap elementwise pieces, pre-pass counting); see Helpers.split.
        self.workers = max(workers, stream_workers)
        self.stream_workers = stream_workers
        blocks = BLOCK in self.modes
        # per compute thread: float32 buffers (kept up to a piece or an RNG block), read buffers
        keep = max(compute_elems, rng_block if blocks else 0)
        self.spaces = [Workspace(keep, self.cast) for _ in range(self.workers)]
        # per (plan, tensor): a per-tensor pre-pass being accumulated, then its statistic
        self.accs: dict[tuple[int, int], Accumulator] = {}
        self.stats: dict[tuple[int, int], TensorStat] = {}
        # the helper threads' forks of the pre-pass accumulators, kept for a pass's units
        self.forks: dict[int, list[Accumulator]] = {}
        # per (plan, tensor): the native kernel of an elementwise piece, or None (torch)
        self.kernel_fns: dict[tuple[int, int], kernels.PieceKernel | None] = {}
        # per (plan, tensor): the native kernel of a sparsifying method, or None (torch)
        self.sparse_fns: dict[tuple[int, int], native.SparseKernel | None] = {}
        self.read = 0
        self.written = [0] * len(plans)
        self.skipped = [0] * len(plans)
        self.nonfinite: list[dict[str, None]] = [{} for _ in plans]
        # buffers: two units in flight (the one computed, the one read ahead)
        unit = max(plans[0].chunk_elems, rng_block * self.workers if blocks else 0)
        infos = [[t for t in (*j.inputs, j.base, j.source) if t is not None] for j in self.jobs]
        itemsize = max([t.itemsize for ts in infos for t in ts] + [1])
        per_elem = max([sum(t.itemsize for t in ts) for ts in infos] + [1])
        out_size = max([DTYPES[j.out_dtype][1] for p in plans for j in p.jobs] + [1])
        keep_in = 2 * (max([len(j.inputs) for j in self.jobs] + [0]) + 1)
        self.out_pool = BufferPool(unit * out_size, keep=4)
        self.ahead = ReadAhead(
            self.schedule(),
            reader,
            BufferPool(unit * itemsize, keep_in),
            Budget(2 * unit * per_elem),
        )
        self.writer = WriteBehind(self.out_pool)
        self.helpers = Helpers(self.workers)

    def _call(
        self,
        k: int,
        job: TensorJob,
        xs: list[torch.Tensor],
        base: torch.Tensor | None,
        rng: CounterRNG | torch.Generator | None,
        stat: object,
        n: int,
        shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """The method on one piece (or whole tensor): the one place a method's function runs."""
        spec = self.plans[k].method
        if shape is not None:
            xs = [x.view(shape) for x in xs]
            base = base.view(shape) if base is not None else None
        assert job.params is not None
        try:
            out = spec.call(xs, job.params, base=base, rng=rng, stat=stat, exact=self.exact[k])
        except MethodInputError as e:
            raise MethodInputError(f"tensor {job.name!r}: {e}") from None
        want = tuple(shape) if shape is not None else (n,)
        if tuple(out.shape) != want:
            raise RuntimeError(
                f"method {spec.name!r} returned shape {list(out.shape)} for "
                f"tensor {shown(job.name, quote=True)}, expected {list(want)}"
            )
        return out.reshape(-1)

    def _emit(
        self, k: int, job: TensorJob, out: torch.Tensor, a: int, b: int, dest: torch.Tensor
    ) -> None:
        """Cast the float32 result for elements [a, b) of ``job`` into ``dest``; check for NaN / Inf.

        A NaN or Inf in the float32 result stays one after the cast, so checking the cast
        output alone catches both cases; the float32 result is only looked at to say which.
        """
        dest.copy_(out)
        if all_finite(dest):
            return
        if not self.allow_nonfinite:
            plan = self.plans[k]
            if not all_finite(out):
                raise nonfinite_error(plan, job, self.diag, a, b, out)
            raise nonfinite_error(plan, job, self.diag, a, b, out, dest)
        self.nonfinite[k][job.name] = None

    def _read_piece(self, u: Unit, s: int, e: int, t: int) -> list[torch.Tensor | None]:
        """Elements [u.a + s, u.a + e) of every input of a lazy unit, read on thread t."""
        return self.spaces[t].read(self.reader, u.infos, u.a + s, u.a + e, self.compute_elems)

    def _kernel_for(self, k: int, j: int) -> kernels.PieceKernel | None:
        """Plan k's native kernel for tensor j's elementwise pieces, decided once per tensor."""
        key = (k, j)
        if key not in self.kernel_fns:
            self.kernel_fns[key] = (
                native.piece_kernel(self.plans[k], j, self.cast)
                if self.modes[k] == ELEM and not self.exact[k]
                else None
            )
        return self.kernel_fns[key]

    def _sparse_for(self, k: int, j: int) -> native.SparseKernel | None:
        """Plan k's native kernel for tensor j of a sparsifying method, decided once per tensor."""
        key = (k, j)
        if key not in self.sparse_fns:
            self.sparse_fns[key] = (
                native.sparse_kernel(self.plans[k], j, self.cast)
                if self.modes[k] != ELEM and not self.exact[k]
                else None
            )
        return self.sparse_fns[key]

    def _rng(self, k: int, job: TensorJob, start: int) -> CounterRNG:
        """The random source of plan k's tensor ``job`` from its element ``start`` on."""
        return CounterRNG(tensor_seed(self.plans[k].config.seed, job.name), start)

    def _sparse_piece(
        self,
        u: Unit,
        k: int,
        fn: native.SparseKernel,
        dest: torch.Tensor,
        s: int,
        e: int,
        stat: TensorStat | None,
        part: object = None,
    ) -> bool:
        """Elements [s, e) of unit ``u`` for plan k by a sparsifying kernel: an RNG block, or a
        piece given its cuts by ``stat`` (``part``: the cuts, handed out already). False
        (nothing consumed): the torch path computes it."""
        job = self.plans[k].jobs[u.j]
        *xr, br = [None if r is None else r[s:e] for r in u.raws]
        xs = [r for r in xr if r is not None]
        if br is None or not all(x.is_contiguous() for x in (*xs, br)):
            return False
        if stat is not None:
            out = fn.cut_piece(xs, br, stat.piece(xs, br) if part is None else part)
            assert out is not None, f"{fn.name}: a statistic but no cut kernel"
        elif self.modes[k] == BLOCK:
            out = fn.merge(xs, br, self._rng(k, job, u.a + s), whole=False)
        else:
            return False
        self._emit(k, job, out, u.a + s, u.a + e, dest[s:e])
        return True

    def _kernel_piece(
        self, u: Unit, k: int, fn: kernels.PieceKernel, dest: torch.Tensor, s: int, e: int, t: int
    ) -> bool:
        """Elements [s, e) of unit ``u`` for plan k by its native kernel, on thread t. False
        when the torch path must (re)compute the piece: an input is not contiguous, or the piece
        holds NaN / Inf that is an error (the torch path then diagnoses it)."""
        job = self.plans[k].jobs[u.j]
        raws = (
            self._read_piece(u, s, e, t)
            if u.lazy
            else [None if r is None else r[s:e] for r in u.raws]
        )
        *xr, br = raws
        xs = [r for r in xr if r is not None]
        base = br if job.base is not None else None
        if not all(x.is_contiguous() for x in xs) or (
            base is not None and not base.is_contiguous()
        ):
            return False
        if fn(dest[s:e], xs, base) == 0:
            return True
        if self.allow_nonfinite:
            self.nonfinite[k][job.name] = None
            return True
        return False

    def _piece(
        self,
        u: Unit,
        k: int,
        dest: torch.Tensor,
        s: int,
        e: int,
        t: int,
        stat: TensorStat | None = None,
        part: object = None,
    ) -> None:
        """Elements [s, e) of unit ``u`` for plan k, on thread t: an elementwise piece, an RNG
        block with its own generator, or a piece of a pre-pass method given its statistic
        (``part``: the piece's part of it, handed out already; None: ``stat`` hands it out)."""
        plan = self.plans[k]
        job = plan.jobs[u.j]
        fn = self.kernel_fns.get((k, u.j)) if stat is None else None
        if fn is not None and self._kernel_piece(u, k, fn, dest, s, e, t):
            return
        sparse = self.sparse_fns.get((k, u.j))
        if sparse is not None and self._sparse_piece(u, k, sparse, dest, s, e, stat, part):
            return
        if u.lazy:
            xs, base = self.spaces[t].inputs(
                self._read_piece(u, s, e, t), 0, e - s, job.base is not None
            )
        else:
            xs, base = self.spaces[t].inputs(u.raws, s, e, job.base is not None)
        rng = self._rng(k, job, u.a + s) if self.modes[k] == BLOCK else None
        if part is None and stat is not None:
            part = stat.piece(xs, base)
        out = self._call(k, job, xs, base, rng, part, e - s)
        self._emit(k, job, out, u.a + s, u.a + e, dest[s:e])

    def _sparse_whole(self, u: Unit, k: int, fn: native.SparseKernel, dest: torch.Tensor) -> bool:
        """The whole tensor of unit ``u`` for plan k by a sparsifying kernel (DELLA); False:
        an input is not contiguous, the torch path computes it."""
        plan, n = self.plans[k], u.b - u.a
        job = plan.jobs[u.j]
        *xr, br = u.raws
        xs = [r[:n] for r in xr if r is not None]
        if br is None or not all(x.is_contiguous() for x in (*xs, br)):
            return False
        rng = self._rng(k, job, 0) if plan.method.stochastic else None
        self._emit(k, job, fn.merge(xs, br[:n], rng, whole=True), u.a, u.b, dest)
        return True

    def _whole(self, u: Unit, k: int, dest: torch.Tensor) -> None:
        """The whole tensor of unit ``u`` for plan k, in one call (exact mode: in its dtype)."""
        plan, n = self.plans[k], u.b - u.a
        job = plan.jobs[u.j]
        fn = self._sparse_for(k, u.j)
        if fn is not None and self._sparse_whole(u, k, fn, dest):
            return
        if self.exact[k]:
            xs, base = exact_inputs(u.raws, n, job.base is not None, self.cast)
        else:
            xs, base = self.spaces[0].inputs(u.raws, 0, n, job.base is not None)
        rng: CounterRNG | torch.Generator | None = None
        if plan.method.stochastic and self.exact[k]:  # mergekit's arithmetic draws from torch
            rng = torch.Generator().manual_seed(tensor_seed(plan.config.seed, job.name))
        elif plan.method.stochastic:
            rng = self._rng(k, job, 0)
        out = self._call(k, job, xs, base, rng, None, n, job.shape)
        self._emit(k, job, out, u.a, u.b, dest)

    def _prepass(self, u: Unit, active: Sequence[int], last: bool) -> None:
        """Pass ``u.step`` of the per-tensor pre-passes over unit ``u`` (``last``: it ends the
        tensor), for every plan that has one; after a plan's last pass, its statistic."""
        accs = []
        for k in active:
            passes, key = self._tensor_passes(k, u.j), (k, u.j)
            if u.step >= passes or key in self.stats:
                continue
            decl, job = self.plans[k].method.prepass, self.plans[k].jobs[u.j]
            assert decl is not None and job.params is not None
            if key not in self.accs:
                self.accs[key] = decl.start(job.params, job.numel)
            accs.append((k, decl, self.accs[key]))
        # the magnitude counts run natively where every plan's pieces do (same deltas); they
        # are compute-bound then (about 1 ns per entry and model), so every compute thread counts
        native = bool(accs) and all(self._sparse_for(k, u.j) is not None for k, _, _ in accs)
        threads = self.workers if native else self.stream_workers
        prepass.accumulate(
            [(d, a) for _, d, a in accs],
            u.step,
            u.raws,
            u.b - u.a,
            pieces=self.compute_elems,
            threads=threads if self.helpers.pool is not None else 1,
            split=self.helpers.split,
            spaces=self.spaces,
            last=last,
            native=native,
            forks=self.forks,
        )
        for k, _, acc in accs:
            if last and u.step == self._tensor_passes(k, u.j) - 1:
                self.stats[(k, u.j)] = acc.result(0)
                del self.accs[(k, u.j)]

    def _stat(self, k: int, u: Unit) -> TensorStat | None:
        """Plan k's statistic for the tensor of unit ``u``: global, from its pre-pass units, or
        counted now from ``u`` (which then holds the whole tensor); None: the method needs none."""
        job = self.plans[k].jobs[u.j]
        if job.name in self.global_stats[k]:
            return self.global_stats[k][job.name]
        passes = self._tensor_passes(k, u.j)
        if passes and (k, u.j) not in self.stats:
            for step in range(passes):
                self._prepass(
                    Unit(u.j, "prepass", u.a, u.b, u.infos, step=step, raws=u.raws), [k], True
                )
        return self.stats.get((k, u.j))

    def _counted_parts(
        self, u: Unit, k: int, stat: TensorStat, ranges: Sequence[tuple[int, int]]
    ) -> dict[int, object] | None:
        """Plan k's statistic's part of every piece of unit ``u`` (by first element), so that
        the pieces then run on every compute thread: the compute threads count the pieces
        (`soupkit.methods._spec.CountedStat.count`, natively from the stored dtypes: the tie
        quota of a piece depends only on the counts of the pieces before it), then this thread
        hands the parts out in flat order. None: the pieces run in order on this thread (one thread, no
        native kernel, or a statistic that cannot be counted ahead)."""
        fn = self._sparse_for(k, u.j)
        if fn is None or self.helpers.pool is None or not isinstance(stat, CountedStat):
            return None
        *xr, br = u.raws
        xs = [r for r in xr if r is not None]
        if br is None or not all(r.is_contiguous() for r in (*xs, br)):
            return None
        counts: dict[int, object] = {}

        def count(s: int, e: int, t: int) -> None:
            counts[s] = stat.count([x[s:e] for x in xs], br[s:e], fn.count_equal)

        self.helpers.split(ranges, count, self.workers)
        return {s: stat.piece_counted(counts[s]) for s, _ in ranges}

    def _counted_piece(
        self,
        u: Unit,
        k: int,
        dest: torch.Tensor,
        stat: TensorStat,
        parts: Mapping[int, object],
        s: int,
        e: int,
        t: int,
    ) -> None:
        """`_piece` of a statistic's piece whose part `_counted_parts` handed out already."""
        self._piece(u, k, dest, s, e, t, stat, parts[s])

    def _merge(self, u: Unit, active: Sequence[int]) -> None:
        n = u.b - u.a
        for k in active:
            job = self.plans[k].jobs[u.j]
            mode, out_dtype = self.modes[k], DTYPES[job.out_dtype][0]
            buf = self.out_pool.get(n * out_dtype.itemsize)
            dest = buf[: n * out_dtype.itemsize].view(out_dtype)
            stat = self._stat(k, u) if mode == STAT else None
            if mode == WHOLE:
                self._whole(u, k, dest)
            elif stat is not None:  # pieces in flat order: the statistic is handed out in order
                ranges = list(chunks(n, self.compute_elems))
                parts = self._counted_parts(u, k, stat, ranges)
                if parts is None:
                    for s, e in ranges:
                        self._piece(u, k, dest, s, e, 0, stat)
                else:
                    piece = functools.partial(self._counted_piece, u, k, dest, stat, parts)
                    self.helpers.split(ranges, piece, self.workers)  # compute-bound: every thread
            else:
                block = mode == BLOCK
                if mode == ELEM:
                    self._kernel_for(k, u.j)  # decided here, once, before the threads share it
                else:
                    self._sparse_for(k, u.j)
                size = self.rng_block if block else self.compute_elems
                piece = functools.partial(self._piece, u, k, dest)
                self.helpers.split(
                    list(chunks(n, size)), piece, self.workers if block else self.stream_workers
                )
            self.writer.write(self.sinks[k], job, dest, u.a, buf)
            if u.b == job.numel:
                self.stats.pop((k, u.j), None)
                self.kernel_fns.pop((k, u.j), None)
                self.sparse_fns.pop((k, u.j), None)

    def _copy(self, u: Unit, active: Sequence[int]) -> None:
        raw = u.raws[0]
        assert raw is not None
        for k in active:
            job = self.plans[k].jobs[u.j]
            dt = DTYPES[job.out_dtype][0]
            buf = self.out_pool.get((u.b - u.a) * dt.itemsize)
            dest = buf[: (u.b - u.a) * dt.itemsize].view(dt)
            dest.copy_(raw if raw.dtype == dt else raw.to(dt))
            self.writer.write(self.sinks[k], job, dest, u.a, buf)

    # ------------------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Run the pass; raises the first error of any thread (the others are stopped)."""
        self.ahead.start()
        self.writer.start()
        try:
            while True:
                _interrupts.check()  # a SIGINT / SIGTERM held by run_plans arrives here, locks free
                try:
                    item = self.ahead.queue.get(timeout=POLL)
                except queue.Empty:
                    continue
                if item is END:
                    break
                if isinstance(item, Failure):
                    raise item.exc
                assert isinstance(item, Unit)
                try:
                    self._unit(item)
                finally:
                    self.ahead.done(item)
            self.writer.close()
        finally:
            self.helpers.shutdown()
            self.ahead.close()
            self.writer.cancel()

    def _unit(self, u: Unit) -> None:
        job0 = self.jobs[u.j]
        last = u.b == job0.numel
        if u.phase == "prepass":
            self._prepass(u, self._active(u.j), last)
            return  # pre-pass reads count as progress only once, with the merge pass
        if u.phase == "skip":
            n = (
                job0.source.nbytes
                if job0.source is not None
                else sum(t.nbytes for t in job0.inputs) + (job0.base.nbytes if job0.base else 0)
            )
        else:
            (self._copy if u.phase == "copy" else self._merge)(u, self._active(u.j))
            n = u.nbytes
            self.read += n
        if self.progress:
            self.progress(n)
        if u.phase == "skip" or last:
            for k, p in enumerate(self.plans):  # tensor j is finished (or skipped) in every plan
                job = p.jobs[u.j]
                self.written[k] += job.numel * DTYPES[job.out_dtype][1]
                self.skipped[k] += job.name in self.skips[k]
