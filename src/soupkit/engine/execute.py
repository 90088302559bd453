"""The streaming loop: for each planned tensor, read -> float32 method -> cast -> write.

One engine, `run_plans`, runs one plan or several plans that read the same tensors (a sweep)
in a single pass; `run_plan` is `run_plans` with one plan.

Memory is bounded by the plan: elementwise methods run on chunks of ``plan.chunk_elems``
elements (the inputs of one chunk plus one output chunk, and the next chunk read ahead);
methods whose only whole-tensor step is a magnitude trim (TIES) get each model's exact cut from
a streaming pre-pass (`soupkit.engine.tensor_trim`) and then run on chunks too; other methods get
whole tensors (the inputs of one tensor plus one output). Randomness comes only from a
`torch.Generator` seeded from (recipe seed, tensor name[, block]), so output bytes never depend
on chunking, order or threads.

Outputs go to a `Sink`: `FileSink` writes planned shards at their offsets; `MemorySink` fills
in-memory tensors (the Python API's in-memory forms). Both see exactly the same tensors, so a
streamed merge and an in-memory merge agree bit for bit.

Non-finite values: every merged piece is checked after the cast to the output dtype with
`all_finite`: one ``sum`` (NaN and Inf always propagate into a sum) and an exact ``isfinite``
only if the sum is not finite. NaN and Inf in the float32 result survive the cast, so this one
check catches them as well as values that overflow the output dtype; the float32 result is
examined only after a failed check, to say which of the two happened. When a check fires, the inputs of that chunk are re-read to name the model that
holds NaN / Inf; a `NonFiniteError` stops the run unless ``allow_nonfinite``.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from soupkit._util import interrupts as _interrupts
from soupkit.engine.global_trim import compute_cuts
from soupkit.engine.tensor_trim import TopKSelect, chunk_cut, magnitude_bits
from soupkit.errors import MethodInputError, NonFiniteError, UsageError, shown
from soupkit.io.header import DTYPES, FileStamp, TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.io.writer import Journal, ShardWriter, write_index
from soupkit.methods import MagnitudeCut, MethodSpec
from soupkit.planning.plan import MergePlan, TensorJob
from soupkit.planning.sizes import COMPUTE_ELEMS, RNG_BLOCK
from soupkit.planning.sizes import compute_threads as _sizes_compute_threads
from soupkit.planning.sizes import stream_threads as _sizes_stream_threads

__all__ = [
    "COMPUTE_ELEMS",
    "FileSink",
    "MemorySink",
    "RNG_BLOCK",
    "RunStats",
    "Sink",
    "all_finite",
    "check_shared_inputs",
    "run_plan",
    "run_plans",
    "tensor_seed",
]


def tensor_seed(seed: int, name: str, block: int | None = None) -> int:
    """A 63-bit seed derived from the recipe seed, the tensor name and (optionally) a block."""
    key = f"{seed}\x00{name}" + (f"\x00{block}" if block is not None else "")
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & (
        (1 << 63) - 1
    )


class Sink(Protocol):
    """Where output tensors go: ``write`` receives a flat chunk in the output dtype."""

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None: ...


class FileSink:
    """Writes the plan's shards into ``folder`` (header first, tensors at their offsets).

    Each shard is closed and hashed (sha256) as soon as its last byte is written; with a
    ``journal`` it is then recorded there, so an interrupted run can resume after it.

    Args:
        plan: the plan.
        folder: where the shards go.
        done: shards already finished and verified (filename -> sha256): not written again.
        journal: where to record each shard as it finishes (resumable runs).
    """

    def __init__(
        self,
        plan: MergePlan,
        folder: Path,
        *,
        done: Mapping[str, str] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.folder = folder
        self.plan = plan
        self.journal = journal
        self.hashes: dict[str, str] = dict(done or {})
        self._done = frozenset(self.hashes)
        self._writers: list[ShardWriter] = []
        self._of: dict[str, ShardWriter] = {}
        try:
            for layout in plan.shards:
                if layout.filename in self.hashes:
                    continue
                w = ShardWriter(folder, layout)
                self._writers.append(w)
                for t in layout.tensors:
                    self._of[t.name] = w
                if w.complete:  # a shard of empty tensors only
                    self._finish(w)
        except BaseException:
            self.abort()
            raise

    @property
    def skip(self) -> frozenset[str]:
        """Names of the tensors that live in already finished shards."""
        return frozenset(
            t.name for s in self.plan.shards if s.filename in self._done for t in s.tensors
        )

    def _finish(self, w: ShardWriter) -> None:
        self.hashes[w.layout.filename] = w.close()
        if self.journal is not None:
            self.journal.record(w.layout, self.hashes[w.layout.filename])

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None:
        w = self._of[job.name]
        w.write(job.name, data, element_offset)
        if w.complete:
            self._finish(w)

    def close(self) -> None:
        for w in self._writers:
            if w.layout.filename not in self.hashes:
                self._finish(w)
        write_index(self.folder, self.plan.shards)

    def abort(self) -> None:
        for w in self._writers:
            w.abort()


class MemorySink:
    """Collects the outputs as in-memory tensors (name -> tensor of the planned shape)."""

    def __init__(self, plan: MergePlan) -> None:
        self.tensors: dict[str, torch.Tensor] = {
            j.name: torch.empty(j.shape, dtype=DTYPES[j.out_dtype][0]) for j in plan.jobs
        }

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None:
        flat = self.tensors[job.name].view(-1)
        flat[element_offset : element_offset + data.numel()] = data


@dataclass(frozen=True)
class RunStats:
    """What a run did.

    Attributes:
        seconds: wall time of the tensor loop.
        bytes_read: tensor bytes read.
        bytes_written: tensor bytes produced (including those of resumed shards).
        tensors: output tensors.
        nonfinite: tensors written with NaN / Inf (only with ``allow_nonfinite``).
        skipped: tensors not computed because a resumed run had already finished their shard.
    """

    seconds: float
    bytes_read: int
    bytes_written: int
    tensors: int
    nonfinite: tuple[str, ...] = ()
    skipped: int = 0


def all_finite(x: torch.Tensor) -> bool:
    """True when no element of ``x`` is NaN or +-Inf (cheap: one reduction, no allocation).

    A sum propagates every NaN and Inf, so a finite sum proves all elements finite. A sum that
    is not finite may only have overflowed, so then an exact ``isfinite`` decides.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return True
    try:
        s = x.sum(dtype=torch.float32) if x.dtype != torch.float64 else x.sum()
    except (RuntimeError, TypeError):  # dtypes without a sum kernel (float8)
        return bool(torch.isfinite(x.float()).all())
    if bool(torch.isfinite(s)):
        return True
    return bool(torch.isfinite(x).all())


def _count_nonfinite(x: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a float tensor."""
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = x.float()
    return int(torch.isnan(x).sum()), int(torch.isinf(x).sum())


def _nonfinite_error(
    plan: MergePlan,
    job: TensorJob,
    load: _Loader,
    a: int,
    b: int,
    out: torch.Tensor,
    cast_out: torch.Tensor | None = None,
) -> NonFiniteError:
    """Explain NaN / Inf in the output chunk [a, b) of ``job``: which input holds them, or why.

    ``out`` is the float32 result; ``cast_out`` the result in the output dtype when it is the
    cast that overflowed.
    """
    nan, inf = _count_nonfinite(out if cast_out is None else cast_out)
    where = f"elements {a:,}..{b:,} of " if (a, b) != (0, job.numel) else ""
    what = (
        f"{nan:,} NaN and {inf:,} Inf"
        if nan and inf
        else (f"{nan:,} NaN" if nan else f"{inf:,} Inf")
    )
    allow = "or pass --allow-nonfinite (allow_nonfinite=True) to write them anyway"
    if cast_out is not None:
        big = float(out.abs().max())
        limit = float(torch.finfo(DTYPES[job.out_dtype][0]).max)
        return NonFiniteError(
            f"tensor {shown(job.name, quote=True)}: {what} in {where}the output after the cast to {job.out_dtype}: "
            f"the merged values are finite in float32 but reach {big:.6g}, beyond the largest "
            f"{job.out_dtype} value {limit:.6g}\n"
            f"hint: set `out_dtype: bfloat16` or `float32` in the recipe, {allow}"
        )
    labels = [m.label for m in plan.models]
    culprits: list[str] = []
    named = list(zip(labels, job.inputs)) + (
        [(f"base {plan.base.label}" if plan.base else "base", job.base)]
        if job.base is not None
        else []
    )
    for label, info in named:
        raw = load.reader.read(info, a, b)
        n_nan, n_inf = _count_nonfinite(raw)
        if n_nan or n_inf:
            culprits.append(f"{label} holds {n_nan:,} NaN and {n_inf:,} Inf there")
            continue
        if load.cast_to is not None and raw.dtype != load.cast_to:
            c_nan, c_inf = _count_nonfinite(raw.to(load.cast_to))
            if c_nan or c_inf:
                culprits.append(
                    f"{label} overflows the recipe's dtype {str(load.cast_to).removeprefix('torch.')} "
                    f"({c_inf:,} values become Inf)"
                )
    if culprits:
        return NonFiniteError(
            f"tensor {shown(job.name, quote=True)}: {what} in {where}the merged output, from the inputs:\n"
            + "\n".join(f"  - {c}" for c in culprits)
            + f"\nhint: the input checkpoint is broken (diverged training, a bad conversion); leave "
            f"that model out, {allow}"
        )
    return NonFiniteError(
        f"tensor {shown(job.name, quote=True)}: method {plan.method.name!r} produced {what} in {where}the output "
        "although every input is finite there (float32 overflow or a division by zero, e.g. "
        "weights that sum to 0 or an extreme rescale)\n"
        f"hint: check the method's parameters for this tensor, {allow}"
    )


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    if n == 0:
        yield 0, 0
        return
    for a in range(0, n, size):
        yield a, min(n, a + size)


class _Loader:
    """Reads ranges as float32 (through the recipe's `dtype` first, if set): the diagnostics' reader."""

    def __init__(self, reader: TensorReader, cast_to: torch.dtype | None) -> None:
        self.reader = reader
        self.cast_to = cast_to

    def f32(self, info: TensorInfo, a: int, b: int) -> torch.Tensor:
        raw = self.reader.read(info, a, b)
        if self.cast_to is not None and raw.dtype != self.cast_to:
            raw = raw.to(self.cast_to)
        # Methods own (and may overwrite) the tensors they get: never hand them a user's tensor.
        return raw.to(torch.float32, copy=info.data is not None)


def _same_info(a: TensorInfo | None, b: TensorInfo | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b and a.data is b.data


def check_shared_inputs(plans: Sequence[MergePlan]) -> None:
    """Refuse plans that cannot share one pass (`run_plans`): they must read the same tensors.

    Raises:
        UsageError: naming the first plan and tensor that differ.
    """
    first = plans[0]
    for k, p in enumerate(plans[1:], start=1):
        problems: list[str] = []
        if len(p.jobs) != len(first.jobs):
            problems.append(f"{len(p.jobs)} output tensors against {len(first.jobs)}")
        elif p.config.dtype != first.config.dtype:
            problems.append(f"`dtype: {p.config.dtype}` against `dtype: {first.config.dtype}`")
        elif p.config.compute != first.config.compute:
            problems.append(
                f"`compute: {p.config.compute}` against `compute: {first.config.compute}`"
            )
        else:
            for ja, jb in zip(first.jobs, p.jobs):
                same = (
                    ja.name == jb.name
                    and _same_info(ja.source, jb.source)
                    and len(ja.inputs) == len(jb.inputs)
                    and all(_same_info(x, y) for x, y in zip(ja.inputs, jb.inputs))
                    and (ja.base is None or jb.base is None or _same_info(ja.base, jb.base))
                )
                if not same:
                    problems.append(
                        f"tensor {shown(ja.name, quote=True)} is read from different inputs"
                    )
                    break
        if problems:
            raise UsageError(
                f"plan {k} cannot share a pass with plan 0: {problems[0]}\n"
                "hint: plans run together must read the same models, base and tensors"
            )


# ------------------------------------------------------------------------------------ the engine
#
# Threads share the work, so that reading, computing and writing overlap:
#
# - a reader thread reads the raw bytes of the next unit (a chunk of every input of a tensor)
#   with os.preadv into pooled buffers while the current one is computed (preadv releases the
#   GIL); for one plan of a cheap elementwise method the compute threads instead read each
#   piece themselves, into their cache (`_Engine._lazy`);
# - the main thread converts each input into reusable float32 buffers (``copy_``), runs the
#   method on cache-sized pieces, checks for NaN / Inf and casts into a pooled output buffer.
#   For elementwise methods (and stochastic ones, one RNG block per piece) the pieces of a unit
#   are shared with helper threads, each with its own buffers (torch kernels release the GIL):
#   by default all usable CPUs (at most 4) for RNG blocks, one fewer for cheap pieces, whose
#   page-cache copies and writes keep about one core busy (see soupkit.planning.sizes). TIES-like
#   trims share their histogram passes the same way (each helper counts into its own fork;
#   integer counts add exactly) and then merge on the main thread, which spends each model's
#   tie quota in piece order;
# - a writer thread hands output buffers to the sinks (pwrite and the on-the-fly sha256, both
#   of which release the GIL), in order.
#
# torch's own intra-op thread pool is set to ``threads`` (default 1) for the duration: the
# elementwise ops on cache-sized pieces gain little from it, and on a contended machine a pool
# of spinning threads is far slower than one thread (measured; see benchmarks/README.md).

# Units and pieces: see soupkit.planning.sizes (RNG_BLOCK, COMPUTE_ELEMS).

_END = object()
_POLL = 0.1  # seconds: cross-thread waits poll, so that no lost wake-up can hang a run


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@dataclass
class _Unit:
    """Elements [a, b) of tensor ``j`` of the plans, for one phase of its work."""

    j: int
    phase: str  # "copy" | "skip" | "hist" (pre-pass 1) | "lo" (pre-pass 2) | "merge"
    a: int
    b: int
    infos: tuple[TensorInfo | None, ...]  # inputs..., then the base (None when not read)
    nbytes: int = 0
    # read by the compute threads, piece by piece (see _Engine._lazy), not by the reader thread
    lazy: bool = False
    raws: list[torch.Tensor | None] = field(default_factory=list)
    bufs: list[torch.Tensor] = field(default_factory=list)


class _Budget:
    """Bytes of raw units in flight: a unit waits while others hold more than the budget.

    A unit larger than the budget (a whole big tensor) waits until nothing else is in flight,
    so it is alone in memory: peak memory stays about one big unit, as without prefetching.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()
        self.stopped = False

    def acquire(self, n: int) -> bool:
        with self.cond:
            while not self.stopped and self.used and self.used + n > self.limit:
                self.cond.wait(_POLL)  # a timeout, as in _WriteBehind._run
            if self.stopped:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


class _BufferPool:
    """Reusable uint8 buffers of one standard capacity (bigger requests are not kept).

    A request for less than 1/16 of the capacity gets a buffer of its own size, not a pooled
    one: a merge of thousands of small inputs would otherwise reserve a full-capacity buffer
    per input per unit in flight (address space that ``ulimit -v`` counts, though never touched).
    """

    def __init__(self, capacity: int, keep: int) -> None:
        self.capacity = capacity
        self.keep = keep
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def get(self, n: int) -> torch.Tensor:
        if n < self.capacity // 16:
            return torch.empty(n, dtype=torch.uint8)
        if n <= self.capacity:
            with self.lock:
                if self.free:
                    return self.free.pop()
            return torch.empty(self.capacity, dtype=torch.uint8)
        return torch.empty(n, dtype=torch.uint8)

    def put(self, buf: torch.Tensor) -> None:
        if buf.numel() == self.capacity:
            with self.lock:
                if len(self.free) < self.keep:
                    self.free.append(buf)


class _ReadAhead:
    """The reader thread: reads the units of ``schedule`` in order, one or two ahead."""

    def __init__(
        self, schedule: Iterator[_Unit], reader: TensorReader, pool: _BufferPool, budget: _Budget
    ) -> None:
        self.pool = pool
        self.budget = budget
        self.queue: queue.Queue[object] = queue.Queue(maxsize=2)
        self._schedule = schedule
        self._reader = reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soupkit-read", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for u in self._schedule:
                if not self.budget.acquire(0 if u.lazy else u.nbytes):
                    return
                for info in () if u.lazy else u.infos:
                    if info is None or u.phase == "skip":
                        u.raws.append(None)
                        continue
                    if (
                        info.data is not None
                    ):  # in memory: a view, no copy (never handed to a method)
                        u.raws.append(self._reader.read(info, u.a, u.b))
                        continue
                    buf = self.pool.get((u.b - u.a) * info.itemsize)
                    u.bufs.append(buf)
                    u.raws.append(self._reader.read(info, u.a, u.b, out=buf))
                if not self._put(u):
                    return
            self._put(_END)
        except BaseException as e:  # reported in the main thread
            self._put(_Failure(e))

    def done(self, u: _Unit) -> None:
        """The main thread is finished with ``u``: its buffers go back to the pool."""
        for buf in u.bufs:
            self.pool.put(buf)
        u.bufs.clear()
        u.raws.clear()
        self.budget.release(0 if u.lazy else u.nbytes)

    def close(self) -> None:
        self._stop.set()
        self.budget.stop()
        self._thread.join()


class _WriteBehind:
    """The writer thread: hands output buffers to the sinks in order, then back to the pool."""

    def __init__(self, pool: _BufferPool) -> None:
        self.pool = pool
        self.queue: queue.Queue[object] = queue.Queue(maxsize=3)
        self.error: BaseException | None = None
        self.cancelled = False
        self._thread = threading.Thread(target=self._run, name="soupkit-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    item = self.queue.get(timeout=_POLL)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                assert isinstance(item, tuple)
                sink: Sink
                job: TensorJob
                data: torch.Tensor
                offset: int
                buf: torch.Tensor | None
                sink, job, data, offset, buf = item
                if self.error is None and not self.cancelled:
                    try:
                        sink.write(job, data, offset)
                    except BaseException as e:  # re-raised in the main thread
                        self.error = e
                if buf is not None:
                    self.pool.put(buf)

    def check(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def write(
        self, sink: Sink, job: TensorJob, data: torch.Tensor, offset: int, buf: torch.Tensor | None
    ) -> None:
        self.check()
        self.queue.put((sink, job, data, offset, buf))

    def close(self) -> None:
        """Wait until every queued write is done; raise the first write error."""
        self.queue.put(_END)
        self._thread.join()
        self.check()

    def cancel(self) -> None:
        """After a failure: drop the queued writes and stop the thread."""
        if self._thread.is_alive():
            self.cancelled = True
            self.queue.put(_END)
            self._thread.join()


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    want = 1 if n is None else n
    if want != old:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


# How a plan handles one tensor.
_WHOLE = "whole"  # the method needs the whole tensor (slerp, model_stock, della, breadcrumbs)
_ELEM = "elem"  # elementwise: any pieces
_BLOCK = "block"  # elementwise and stochastic: one generator per RNG_BLOCK
_TRIM = "trim"  # elementwise once each model's magnitude cut is known (TIES)


def _mode(spec: MethodSpec) -> str:
    if spec.tensor_trim is not None:
        return _TRIM
    if spec.streams_whole_tensors:
        return _WHOLE
    return _BLOCK if spec.stochastic else _ELEM


@dataclass
class _JobState:
    """Per tensor and plan: the magnitude cuts of a TIES-like method, as they become known."""

    cuts: list[MagnitudeCut | None]
    quota: list[int]
    select: dict[int, tuple[TopKSelect, dict[int, int]]]  # model -> (selection, plan-local k)


class _Engine:
    def __init__(
        self,
        plans: Sequence[MergePlan],
        sinks: Sequence[Sink],
        *,
        progress: Callable[[int], None] | None,
        allow_nonfinite: bool,
        skips: Sequence[frozenset[str]],
        cuts: Sequence[Mapping[str, tuple[MagnitudeCut | None, ...]]],
        diag: TensorReader,
        compute_elems: int,
        workers: int = 1,
        stream_workers: int = 1,
    ) -> None:
        self.plans = plans
        self.sinks = sinks
        self.progress = progress
        self.allow_nonfinite = allow_nonfinite
        self.skips = skips
        self.global_cuts = cuts
        self.cast = getattr(torch, plans[0].config.dtype) if plans[0].config.dtype else None
        self.diag = _Loader(diag, self.cast)
        self.compute_elems = compute_elems
        # exact mode (compute: exact): whole tensors in the recipe's dtype, mergekit's arithmetic
        self.exact = [p.config.compute == "exact" for p in plans]
        self.modes = [_WHOLE if ex else _mode(p.method) for p, ex in zip(plans, self.exact)]
        # float32 buffers up to this size are kept for reuse (pieces and RNG blocks)
        self.keep_elems = max(compute_elems, RNG_BLOCK if _BLOCK in self.modes else 0)
        self.read = 0
        self.written = [0] * len(plans)
        self.skipped = [0] * len(plans)
        self.nonfinite: list[dict[str, None]] = [{} for _ in plans]
        # Pieces of a unit are split between `workers` threads (RNG blocks) or `stream_workers`
        # threads (cheap elementwise pieces, TIES's counting passes); see _split.
        self.workers = max(workers, stream_workers)
        self.stream_workers = stream_workers
        self.helpers: concurrent.futures.ThreadPoolExecutor | None = None
        # reusable float32 buffers, one per input (+ base), per compute thread
        self.works: list[list[torch.Tensor]] = [[] for _ in range(self.workers)]
        self.work = self.works[0]
        # per compute thread, per input: uint8 buffers for lazy reads
        self.rbufs: list[list[torch.Tensor]] = [[] for _ in range(self.workers)]
        self.trim_state: dict[int, _JobState] = {}

    # ------------------------------------------------------------------ schedule (reader thread)

    def _base_info(self, j: int, active: Sequence[int]) -> TensorInfo | None:
        return next(
            (self.plans[k].jobs[j].base for k in active if self.plans[k].jobs[j].base is not None),
            None,
        )

    def _active(self, j: int) -> list[int]:
        return [k for k, p in enumerate(self.plans) if p.jobs[j].name not in self.skips[k]]

    def _needs_prepass(self, j: int, k: int) -> bool:
        """Plan k trims tensor j per tensor (not by a global cut) with some density below 1."""
        p = self.plans[k]
        job = p.jobs[j]
        if self.modes[k] != _TRIM or job.name in self.global_cuts[k]:
            return False
        assert p.method.tensor_trim is not None and job.params is not None
        return any(d < 1 for d in p.method.tensor_trim(job.params))

    def _lazy(self, infos: Sequence[TensorInfo | None], active: Sequence[int]) -> bool:
        """Whether the compute threads read a unit's pieces themselves: for one plan of a cheap
        elementwise method on file inputs. A piece is then read into a small per-thread buffer
        and converted while it is still in that core's cache, instead of a whole unit being
        copied out of the page cache by the reader thread and read back from memory by the
        main thread: the linear benchmark's pass went from 2.9 to 2.6 s, with a third less
        system CPU (benchmarks/README.md). Several plans share one read of each unit instead."""
        return (
            len(active) == 1
            and self.modes[active[0]] == _ELEM
            and all(t is None or t.data is None for t in infos)
        )

    def step(self, j: int, active: Sequence[int]) -> int:
        """Elements per read unit of tensor j."""
        job = self.plans[0].jobs[j]
        modes = {self.modes[k] for k in active}
        if _WHOLE in modes:
            return max(job.numel, 1)
        if _BLOCK in modes:
            return RNG_BLOCK * self.workers  # one block per compute thread
        return self.plans[0].chunk_elems

    def schedule(self) -> Iterator[_Unit]:
        for j, job in enumerate(self.plans[0].jobs):
            active = self._active(j)
            if not active:
                yield _Unit(j, "skip", 0, 0, ())
                continue
            if job.source is not None:
                for a, b in _chunks(job.numel, self.plans[0].chunk_elems):
                    yield _Unit(j, "copy", a, b, (job.source,), (b - a) * job.source.itemsize)
                continue
            base = self._base_info(j, active)
            infos = (*job.inputs, base)
            per_elem = sum(t.itemsize for t in job.inputs) + (
                base.itemsize if base is not None else 0
            )
            step = self.step(j, active)
            phases = ["merge"]
            if step < job.numel and any(self._needs_prepass(j, k) for k in active):
                phases = ["hist", "lo", "merge"]
            lazy = self._lazy(infos, active)  # never with pre-pass phases: those are TIES's
            for phase in phases:
                for a, b in _chunks(job.numel, step):
                    yield _Unit(j, phase, a, b, infos, (b - a) * per_elem, lazy)

    # ------------------------------------------------------- compute (main thread and helpers)

    def _f32(self, slot: int, raw: torch.Tensor, n: int, work: list[torch.Tensor]) -> torch.Tensor:
        """``raw`` (n elements) as float32, in the reusable buffer ``work[slot]``."""
        while len(work) <= slot:
            work.append(torch.empty(0))
        w = work[slot]
        if w.numel() < n:
            w = torch.empty(n, dtype=torch.float32)
            if n <= self.keep_elems:
                work[slot] = w
        out = w[:n]
        if self.cast is not None and raw.dtype != self.cast and self.cast != torch.float32:
            raw = raw.to(self.cast)  # the recipe's dtype rounds first
        out.copy_(raw)
        return out

    def _inputs(
        self,
        raws: Sequence[torch.Tensor | None],
        s: int,
        e: int,
        with_base: bool,
        work: list[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Elements [s, e) of every input (and the base) as float32, in ``work``'s buffers
        (default: the main thread's)."""
        work = self.work if work is None else work
        *xs_raw, base_raw = raws
        xs = [self._f32(i, r[s:e], e - s, work) for i, r in enumerate(xs_raw) if r is not None]
        base = (
            self._f32(len(xs_raw), base_raw[s:e], e - s, work)
            if (with_base and base_raw is not None)
            else None
        )
        return xs, base

    def _exact_inputs(
        self,
        raws: Sequence[torch.Tensor | None],
        n: int,
        with_base: bool,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Exact mode: every input (and the base) as a new tensor in the compute dtype, as
        mergekit's loader gives them: the recipe's ``dtype``, else the inputs' promoted dtype."""
        *xs_raw, base_raw = raws
        present = [r[:n] for r in xs_raw if r is not None]
        if with_base and base_raw is not None:
            present.append(base_raw[:n])
        dtype = self.cast
        if dtype is None:
            dtype = present[0].dtype
            for r in present[1:]:
                dtype = torch.promote_types(dtype, r.dtype)
        out = [r.to(dtype, copy=True) for r in present]
        if with_base and base_raw is not None:
            return out[:-1], out[-1]
        return out, None

    def _split(
        self,
        ranges: Sequence[tuple[int, int]],
        piece: Callable[[int, int, int], None],
        threads: int,
    ) -> None:
        """Run ``piece(s, e, t)`` for every range on up to ``threads`` threads: this thread
        (t = 0) and helpers (t = 1, 2, ...) take the next range in turn, so a thread whose
        core is also reading or writing simply does fewer; thread t uses the float32 buffers
        ``self.works[t]``.

        Every piece is computed exactly as it would be alone, so the bytes depend neither on
        the number of threads nor on which thread took which piece.
        """
        n = min(threads, len(ranges))
        if n < 2 or self.helpers is None:
            for s, e in ranges:
                piece(s, e, 0)
            return
        todo = iter(ranges)
        lock = threading.Lock()
        failed = threading.Event()

        def share(t: int) -> None:
            with torch.inference_mode():
                while not failed.is_set():
                    with lock:
                        r = next(todo, None)
                    if r is None:
                        return
                    try:
                        piece(r[0], r[1], t)
                    except BaseException:
                        failed.set()  # the others stop after their current piece
                        raise

        futures = [self.helpers.submit(share, t) for t in range(1, n)]
        try:
            share(0)
        finally:
            # wait for every helper even when this share failed: they write into this unit's
            # output buffer, which goes back to the pool afterwards
            done = concurrent.futures.wait(futures)[0]
        for f in futures:
            if f in done:
                f.result()  # re-raise a helper's error

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
                raise _nonfinite_error(plan, job, self.diag, a, b, out)
            raise _nonfinite_error(plan, job, self.diag, a, b, out, dest)
        self.nonfinite[k][job.name] = None

    def _call(
        self,
        k: int,
        job: TensorJob,
        xs: list[torch.Tensor],
        base: torch.Tensor | None,
        rng: torch.Generator | None,
        trim: Sequence[MagnitudeCut | None] | None,
        n: int,
        shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        spec = self.plans[k].method
        if shape is not None:
            xs = [x.view(shape) for x in xs]
            base = base.view(shape) if base is not None else None
        assert job.params is not None
        try:
            out = spec.call(xs, job.params, base=base, rng=rng, trim=trim, exact=self.exact[k])
        except MethodInputError as e:
            raise MethodInputError(f"tensor {job.name!r}: {e}") from None
        want = tuple(shape) if shape is not None else (n,)
        if tuple(out.shape) != want:
            raise RuntimeError(
                f"method {spec.name!r} returned shape {list(out.shape)} for "
                f"tensor {shown(job.name, quote=True)}, expected {list(want)}"
            )
        return out.reshape(-1)

    def _trim_for(self, k: int, j: int, job: TensorJob) -> _JobState:
        """The cut state of plan k for tensor j (global cuts, or per-tensor cuts to compute)."""
        st = self.trim_state.get(k * len(self.plans[0].jobs) + j)
        if st is not None:
            return st
        spec = self.plans[k].method
        n_models = len(job.inputs)
        if job.name in self.global_cuts[k]:
            cuts = list(self.global_cuts[k][job.name])
        else:
            cuts = [None] * n_models
        st = _JobState(
            cuts, [c.ties if (c is not None and c.ties is not None) else 0 for c in cuts], {}
        )
        if job.name not in self.global_cuts[k]:
            assert spec.tensor_trim is not None and job.params is not None
            for i, d in enumerate(spec.tensor_trim(job.params)):
                if d >= 1:
                    continue
                kk = int(d * job.numel)
                if kk <= 0:
                    st.cuts[i] = MagnitudeCut(math.inf, 0)
                elif kk < job.numel:
                    st.select[i] = (TopKSelect(job.numel, (kk,)), {})
        self.trim_state[k * len(self.plans[0].jobs) + j] = st
        return st

    def _deltas_bits(
        self,
        raws: Sequence[torch.Tensor | None],
        s: int,
        e: int,
        models: Sequence[int],
        work: list[torch.Tensor] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Bit patterns of |theta_i - theta_0| for elements [s, e), computed as the method does."""
        xs, base = self._inputs(raws, s, e, True, work)
        assert base is not None
        return {i: magnitude_bits(xs[i].sub_(base), inplace=True) for i in models}  # xs: scratch

    def _count(
        self,
        raws: Sequence[torch.Tensor | None],
        n: int,
        phase: str,
        sels: Sequence[tuple[int, TopKSelect]],
    ) -> None:
        """Count the magnitude bits of elements [0, n) of each model ``i`` into its selector
        (phase ``"hist"``: top 16 bits; ``"lo"``: inside the chosen buckets). The pieces are
        shared between the compute threads; each helper counts into a `TopKSelect.fork`, added
        back afterwards (integer counts: the same totals in any order)."""
        models = sorted({i for i, _ in sels})
        ranges = list(_chunks(n, self.compute_elems))
        threads = min(self.stream_workers, len(ranges)) if self.helpers is not None else 1
        parts = [list(sels)] + [[(i, sel.fork()) for i, sel in sels] for _ in range(1, threads)]

        def piece(s: int, e: int, t: int) -> None:
            bits = self._deltas_bits(raws, s, e, models, self.works[t])
            for i, sel in parts[t]:
                sel.add_hi(bits[i]) if phase == "hist" else sel.add_lo(bits[i])

        self._split(ranges, piece, threads)
        for part in parts[1:]:
            for (_, sel), (_, forked) in zip(sels, part, strict=True):
                sel.join(forked)

    def _prepass(self, u: _Unit, active: Sequence[int]) -> None:
        job0 = self.plans[0].jobs[u.j]
        states = [
            (k, self._trim_for(k, u.j, self.plans[k].jobs[u.j]))
            for k in active
            if self._needs_prepass(u.j, k)
        ]
        self._count(
            u.raws,
            u.b - u.a,
            u.phase,
            [(i, sel) for _, st in states for i, (sel, _) in st.select.items()],
        )
        if u.b == job0.numel:  # the last unit of this pass
            for _, st in states:
                for i, (sel, _) in st.select.items():
                    if u.phase == "hist":
                        sel.select_buckets()
                    else:
                        self._set_cut(st, i, sel.cut(sel.ks[0]))
                if u.phase == "lo":
                    st.select.clear()

    @staticmethod
    def _set_cut(st: _JobState, i: int, cut: MagnitudeCut) -> None:
        st.cuts[i] = cut
        st.quota[i] = cut.ties if cut.ties is not None else 0

    def _cuts_whole(self, st: _JobState, raws: Sequence[torch.Tensor | None], n: int) -> None:
        """Per-tensor cuts from a unit that holds the whole tensor (no pre-pass)."""
        if not st.select:
            return
        for phase in ("hist", "lo"):
            self._count(raws, n, phase, [(i, sel) for i, (sel, _) in st.select.items()])
            for i, (sel, _) in st.select.items():
                if phase == "hist":
                    sel.select_buckets()
                else:
                    self._set_cut(st, i, sel.cut(sel.ks[0]))
        st.select.clear()

    def _piece_cuts(
        self,
        st: _JobState,
        xs: Sequence[torch.Tensor],
        base: torch.Tensor | None,
    ) -> list[MagnitudeCut | None]:
        """The cuts for the next piece (in flat order): the tie quotas are spread over pieces."""
        out: list[MagnitudeCut | None] = []
        for i, c in enumerate(st.cuts):
            if c is None or c.ties is None or c.threshold != c.threshold:
                out.append(c)
                continue
            equal = 0
            if st.quota[i] > 0:
                assert base is not None
                equal = int(((xs[i] - base).abs_() == c.threshold).sum())
            pc, st.quota[i] = chunk_cut(c, equal, st.quota[i])
            out.append(pc)
        return out

    def _merge(self, u: _Unit, active: Sequence[int]) -> None:
        j = u.j
        n = u.b - u.a
        for k in active:
            plan, job = self.plans[k], self.plans[k].jobs[j]
            mode = self.modes[k]
            out_dtype = DTYPES[job.out_dtype][0]
            buf = self.out_pool.get(n * out_dtype.itemsize)
            dest_all = buf[: n * out_dtype.itemsize].view(out_dtype)
            uses_base = job.base is not None
            if mode == _WHOLE:
                if self.exact[k]:
                    xs, base = self._exact_inputs(u.raws, n, uses_base)
                else:
                    xs, base = self._inputs(u.raws, 0, n, uses_base)
                rng = (
                    torch.Generator().manual_seed(tensor_seed(plan.config.seed, job.name))
                    if plan.method.stochastic
                    else None
                )
                out = self._call(k, job, xs, base, rng, None, n, job.shape)
                self._emit(k, job, out, u.a, u.b, dest_all)
            elif mode == _BLOCK:
                self._split(
                    list(_chunks(n, RNG_BLOCK)),
                    functools.partial(self._block_piece, u, k, dest_all),
                    self.workers,
                )
            elif mode == _ELEM:
                self._split(
                    list(_chunks(n, self.compute_elems)),
                    functools.partial(self._elem_piece, u, k, dest_all),
                    self.stream_workers,
                )
            else:  # _TRIM: pieces in order, each model's tie quota is spent from the first piece on
                st = self._trim_for(k, j, job)
                if st.select:  # the whole tensor is in this unit: cuts first
                    self._cuts_whole(st, u.raws, n)
                for s, e in _chunks(n, self.compute_elems):
                    xs, base = self._inputs(u.raws, s, e, uses_base)
                    out = self._call(k, job, xs, base, None, self._piece_cuts(st, xs, base), e - s)
                    self._emit(k, job, out, u.a + s, u.a + e, dest_all[s:e])
            self.writer.write(self.sinks[k], job, dest_all, u.a, buf)
            if u.b == job.numel:
                self.trim_state.pop(k * len(self.plans[0].jobs) + j, None)

    def _read_piece(self, u: _Unit, s: int, e: int, t: int) -> list[torch.Tensor | None]:
        """Elements [u.a + s, u.a + e) of every input of a lazy unit, read on thread t."""
        bufs = self.rbufs[t]
        out: list[torch.Tensor | None] = []
        for slot, info in enumerate(u.infos):
            if info is None:
                out.append(None)
                continue
            while len(bufs) <= slot:
                bufs.append(torch.empty(0, dtype=torch.uint8))
            n = (e - s) * info.itemsize
            if bufs[slot].numel() < n:
                # grown geometrically up to one compute piece: thousands of small inputs do not
                # each reserve a full piece (1 MiB of address space per input under `ulimit -v`)
                grow = min(self.compute_elems * info.itemsize, 2 * bufs[slot].numel())
                bufs[slot] = torch.empty(max(n, grow), dtype=torch.uint8)
            out.append(self.reader.read(info, u.a + s, u.a + e, out=bufs[slot]))
        return out

    def _elem_piece(self, u: _Unit, k: int, dest_all: torch.Tensor, s: int, e: int, t: int) -> None:
        """Elements [s, e) of unit ``u`` for plan k, an elementwise method (on thread t)."""
        job = self.plans[k].jobs[u.j]
        if u.lazy:
            xs, base = self._inputs(
                self._read_piece(u, s, e, t), 0, e - s, job.base is not None, self.works[t]
            )
        else:
            xs, base = self._inputs(u.raws, s, e, job.base is not None, self.works[t])
        out = self._call(k, job, xs, base, None, None, e - s)
        self._emit(k, job, out, u.a + s, u.a + e, dest_all[s:e])

    def _block_piece(
        self, u: _Unit, k: int, dest_all: torch.Tensor, s: int, e: int, t: int
    ) -> None:
        """RNG block [s, e) of unit ``u`` for plan k, with that block's own generator (on thread t)."""
        plan = self.plans[k]
        job = plan.jobs[u.j]
        xs, base = self._inputs(u.raws, s, e, job.base is not None, self.works[t])
        rng = torch.Generator().manual_seed(
            tensor_seed(plan.config.seed, job.name, (u.a + s) // RNG_BLOCK)
        )
        out = self._call(k, job, xs, base, rng, None, e - s)
        self._emit(k, job, out, u.a + s, u.a + e, dest_all[s:e])

    def _copy(self, u: _Unit, active: Sequence[int]) -> None:
        raw = u.raws[0]
        assert raw is not None
        for k in active:
            job = self.plans[k].jobs[u.j]
            dt = DTYPES[job.out_dtype][0]
            buf = self.out_pool.get((u.b - u.a) * dt.itemsize)
            dest = buf[: (u.b - u.a) * dt.itemsize].view(dt)
            dest.copy_(raw if raw.dtype == dt else raw.to(dt))
            self.writer.write(self.sinks[k], job, dest, u.a, buf)

    def _account(self, j: int) -> None:
        """Tensor j is finished (or skipped) in every plan."""
        for k, p in enumerate(self.plans):
            job = p.jobs[j]
            self.written[k] += job.numel * DTYPES[job.out_dtype][1]
            if job.name in self.skips[k]:
                self.skipped[k] += 1

    def run(self, reader: TensorReader) -> None:
        self.reader = reader
        jobs = self.plans[0].jobs
        unit = max(
            self.plans[0].chunk_elems, RNG_BLOCK * self.workers if _BLOCK in self.modes else 0
        )
        itemsize = max(
            [t.itemsize for j in jobs for t in (*j.inputs, j.base, j.source) if t is not None] + [1]
        )
        per_elem = max(
            [sum(t.itemsize for t in (*j.inputs, j.base, j.source) if t is not None) for j in jobs]
            + [1]
        )
        out_size = max([DTYPES[j.out_dtype][1] for p in self.plans for j in p.jobs] + [1])
        in_pool = _BufferPool(
            unit * itemsize, keep=2 * (max([len(j.inputs) for j in jobs] + [0]) + 1)
        )
        self.out_pool = _BufferPool(unit * out_size, keep=4)
        # two units in flight: the one being computed and the one being read ahead
        budget = _Budget(2 * unit * per_elem)
        ahead = _ReadAhead(self.schedule(), reader, in_pool, budget)
        self.writer = _WriteBehind(self.out_pool)
        if self.workers > 1:
            self.helpers = concurrent.futures.ThreadPoolExecutor(
                self.workers - 1, thread_name_prefix="soupkit-compute"
            )
        try:
            while True:
                _interrupts.check()  # a SIGINT / SIGTERM held by run_plans arrives here, locks free
                try:
                    item = ahead.queue.get(timeout=_POLL)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                assert isinstance(item, _Unit)
                u = item
                try:
                    self._unit(u)
                finally:
                    ahead.done(u)
            self.writer.close()
        finally:
            if self.helpers is not None:
                self.helpers.shutdown(wait=True)
                self.helpers = None
            ahead.close()
            self.writer.cancel()

    def _unit(self, u: _Unit) -> None:
        jobs0 = self.plans[0].jobs
        job0 = jobs0[u.j]
        if u.phase == "skip":
            n = (
                job0.source.nbytes
                if job0.source is not None
                else sum(t.nbytes for t in job0.inputs) + (job0.base.nbytes if job0.base else 0)
            )
            if self.progress:
                self.progress(n)
            self._account(u.j)
            return
        active = self._active(u.j)
        if u.phase == "copy":
            self._copy(u, active)
        elif u.phase in ("hist", "lo"):
            self._prepass(u, active)
            return  # pre-pass reads count as progress only once, with the merge pass
        else:
            self._merge(u, active)
        n = u.nbytes
        self.read += n
        if self.progress:
            self.progress(n)
        if u.b == job0.numel:
            self._account(u.j)


def plan_stamps(plans: Sequence[MergePlan]) -> dict[Path, FileStamp]:
    """Every input file's identity when the plans read its header (`Checkpoint.stamps`)."""
    return {
        f: st
        for p in plans
        for c in (*p.models, *([p.base] if p.base is not None else []))
        for f, st in c.stamps.items()
    }


def run_plans(
    plans: Sequence[MergePlan],
    sinks: Sequence[Sink],
    *,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    skip: Sequence[Collection[str]] | None = None,
    threads: int | None = None,
    compute_threads: int | None = None,
) -> list[RunStats]:
    """Run several plans over the same inputs in one pass, each into its own sink.

    Each chunk of each input is read once and handed to every plan; every plan's output is bit
    for bit what it gives alone (same chunking rules, per-tensor and per-block seeds, cuts).

    Args:
        plans: plans that read the same tensors (e.g. one recipe with different parameters).
        sinks: one sink per plan.
        progress: called with the number of input bytes consumed after each chunk.
        allow_nonfinite: write NaN / Inf outputs instead of raising (they are listed in
            `RunStats.nonfinite`).
        skip: per plan, names of tensors not to compute (their shard is already finished:
            resume).
        threads: torch intra-op threads during the run (default 1: reading, writing and the
            compute threads already run in their own threads); restored afterwards.
        compute_threads: threads that share the pieces of each unit (default: the CPUs this
            process may use, at most 4, for stochastic methods' RNG blocks; one fewer for cheap
            elementwise pieces and TIES's counting passes, see `soupkit.planning.sizes`); the output
            bytes do not depend on it.

    Returns:
        One `RunStats` per plan (``bytes_read`` is the shared pass's, counted once).

    Raises:
        UsageError: the plans do not read the same inputs.
        NonFiniteError: a merged chunk holds NaN / Inf (before or after the cast to the output
            dtype), naming the tensor and the input model that holds them.
    """
    if not plans or len(plans) != len(sinks):
        raise UsageError(
            f"run_plans needs one sink per plan, got {len(plans)} plans and {len(sinks)} sinks"
        )
    if skip is not None and len(skip) != len(plans):
        raise UsageError(
            f"run_plans needs one skip set per plan, got {len(skip)} for {len(plans)} plans"
        )
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if compute_threads is not None and compute_threads < 1:
        raise UsageError(f"compute_threads must be at least 1, got {compute_threads}")
    check_shared_inputs(plans)
    t0 = time.perf_counter()
    skips = [frozenset(s) for s in skip] if skip is not None else [frozenset()] * len(plans)
    stamps = plan_stamps(plans)  # a file rewritten since planning is refused when it is opened
    with (
        _interrupts.deferred(),
        _torch_threads(threads),
        TensorReader(stamps) as reader,
        TensorReader(stamps) as diag,
        torch.inference_mode(),
    ):
        # trim_scope: global (TIES): a streaming pre-pass finds each model's exact global cut
        cuts = [
            compute_cuts(p, reader)
            if p.method.global_trim is not None and p.config.compute != "exact"
            else {}
            for p in plans
        ]
        engine = _Engine(
            plans,
            sinks,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
            skips=skips,
            cuts=cuts,
            diag=diag,
            compute_elems=COMPUTE_ELEMS,
            workers=compute_threads or _sizes_compute_threads(),
            stream_workers=compute_threads or _sizes_stream_threads(),
        )
        engine.run(reader)
    seconds = time.perf_counter() - t0
    return [
        RunStats(
            seconds,
            engine.read,
            engine.written[k],
            len(p.jobs),
            nonfinite=tuple(engine.nonfinite[k]),
            skipped=engine.skipped[k],
        )
        for k, p in enumerate(plans)
    ]


def run_plan(
    plan: MergePlan,
    sink: Sink,
    *,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    skip: Collection[str] = (),
    threads: int | None = None,
    compute_threads: int | None = None,
) -> RunStats:
    """Run every job of ``plan`` into ``sink`` (`run_plans` with one plan).

    Args:
        plan: the plan (see `soupkit.planning.plan.make_plan`).
        sink: where outputs go.
        progress: called with the number of input bytes consumed after each chunk.
        allow_nonfinite: write NaN / Inf outputs instead of raising (they are listed in
            `RunStats.nonfinite`).
        skip: names of tensors not to compute (their shard is already finished: resume).
        threads: torch intra-op threads during the run (default 1), restored afterwards.
        compute_threads: threads sharing the elementwise pieces (see `run_plans`).

    Returns:
        `RunStats` of the run.

    Raises:
        NonFiniteError: a merged chunk holds NaN / Inf (before or after the cast to the output
            dtype), naming the tensor and the input model that holds them.
    """
    return run_plans(
        [plan],
        [sink],
        progress=progress,
        allow_nonfinite=allow_nonfinite,
        skip=[skip],
        threads=threads,
        compute_threads=compute_threads,
    )[0]
