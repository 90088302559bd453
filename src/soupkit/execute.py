"""The streaming loop: for each planned tensor, read -> float32 method -> cast -> write.

Memory is bounded by the plan: elementwise methods run on chunks of ``plan.chunk_elems``
elements (the inputs of one chunk plus one output chunk); other methods get whole tensors (the
inputs of one tensor plus one output). Randomness comes only from a `torch.Generator` seeded
from (recipe seed, tensor name[, block]), so output bytes never depend on order or threads.

Outputs go to a `Sink`: `FileSink` writes planned shards at their offsets; `MemorySink` fills
in-memory tensors (the Python API's in-memory forms). Both see exactly the same tensors, so a
streamed merge and an in-memory merge agree bit for bit.

Non-finite values: every merged chunk is checked in float32 before the cast and again after
it (when the output dtype is narrower than float32), with `all_finite`: one ``sum`` (no
allocation; NaN and Inf always propagate into a sum) and an exact ``isfinite`` only if the sum
is not finite. When a check fires, the inputs of that chunk are re-read to name the model that
holds NaN / Inf; a `NonFiniteError` stops the run unless ``allow_nonfinite``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from soupkit.errors import NonFiniteError
from soupkit.global_trim import compute_cuts
from soupkit.io.header import DTYPES, TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.io.writer import Journal, ShardWriter, write_index
from soupkit.methods import MagnitudeCut
from soupkit.plan import MergePlan, TensorJob

__all__ = [
    "FileSink", "MemorySink", "RNG_BLOCK", "RunStats", "Sink", "all_finite", "run_plan", "tensor_seed",
]

# Stochastic elementwise methods draw per block of this many elements, each block with its own
# generator, so results do not depend on how the engine chunks a tensor.
RNG_BLOCK = 1 << 20


def tensor_seed(seed: int, name: str, block: int | None = None) -> int:
    """A 63-bit seed derived from the recipe seed, the tensor name and (optionally) a block."""
    key = f"{seed}\x00{name}" + (f"\x00{block}" if block is not None else "")
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


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

    def __init__(self, plan: MergePlan, folder: Path, *, done: Mapping[str, str] | None = None,
                 journal: Journal | None = None) -> None:
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
        return frozenset(t.name for s in self.plan.shards if s.filename in self._done for t in s.tensors)

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
        flat[element_offset: element_offset + data.numel()] = data


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


def _nonfinite_error(plan: MergePlan, job: TensorJob, load: _Loader, a: int, b: int,
                     out: torch.Tensor, cast_out: torch.Tensor | None = None) -> NonFiniteError:
    """Explain NaN / Inf in the output chunk [a, b) of ``job``: which input holds them, or why.

    ``out`` is the float32 result; ``cast_out`` the result in the output dtype when it is the
    cast that overflowed.
    """
    nan, inf = _count_nonfinite(out if cast_out is None else cast_out)
    where = f"elements {a:,}..{b:,} of " if (a, b) != (0, job.numel) else ""
    what = f"{nan:,} NaN and {inf:,} Inf" if nan and inf else (f"{nan:,} NaN" if nan else f"{inf:,} Inf")
    allow = "or pass --allow-nonfinite (allow_nonfinite=True) to write them anyway"
    if cast_out is not None:
        big = float(out.abs().max())
        limit = float(torch.finfo(DTYPES[job.out_dtype][0]).max)
        return NonFiniteError(
            f"tensor {job.name!r}: {what} in {where}the output after the cast to {job.out_dtype}: "
            f"the merged values are finite in float32 but reach {big:.6g}, beyond the largest "
            f"{job.out_dtype} value {limit:.6g}\n"
            f"hint: set `out_dtype: bfloat16` or `float32` in the recipe, {allow}"
        )
    labels = [m.label for m in plan.models]
    culprits: list[str] = []
    named = list(zip(labels, job.inputs)) + ([(f"base {plan.base.label}" if plan.base else "base", job.base)]
                                             if job.base is not None else [])
    for label, info in named:
        raw = load.reader.read(info, a, b)
        n_nan, n_inf = _count_nonfinite(raw)
        if n_nan or n_inf:
            culprits.append(f"{label} holds {n_nan:,} NaN and {n_inf:,} Inf there")
            continue
        if load.cast_to is not None and raw.dtype != load.cast_to:
            c_nan, c_inf = _count_nonfinite(raw.to(load.cast_to))
            if c_nan or c_inf:
                culprits.append(f"{label} overflows the recipe's dtype {str(load.cast_to).removeprefix('torch.')} "
                                f"({c_inf:,} values become Inf)")
    if culprits:
        return NonFiniteError(
            f"tensor {job.name!r}: {what} in {where}the merged output, from the inputs:\n"
            + "\n".join(f"  - {c}" for c in culprits)
            + f"\nhint: the input checkpoint is broken (diverged training, a bad conversion); leave "
              f"that model out, {allow}"
        )
    return NonFiniteError(
        f"tensor {job.name!r}: method {plan.method.name!r} produced {what} in {where}the output "
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
    """Reads ranges as float32 (through the recipe's `dtype` first, if set)."""

    def __init__(self, reader: TensorReader, cast_to: torch.dtype | None) -> None:
        self.reader = reader
        self.cast_to = cast_to

    def f32(self, info: TensorInfo, a: int, b: int) -> torch.Tensor:
        raw = self.reader.read(info, a, b)
        if self.cast_to is not None and raw.dtype != self.cast_to:
            raw = raw.to(self.cast_to)
        # Methods own (and may overwrite) the tensors they get: never hand them a user's tensor.
        return raw.to(torch.float32, copy=info.data is not None)


def _merge_range(plan: MergePlan, job: TensorJob, load: _Loader, a: int, b: int, shaped: bool,
                 rng: torch.Generator | None, trim: tuple[MagnitudeCut | None, ...] | None = None,
                 ) -> torch.Tensor:
    xs = [load.f32(t, a, b) for t in job.inputs]
    base = load.f32(job.base, a, b) if job.base is not None else None
    if shaped:
        xs = [x.view(job.shape) for x in xs]
        base = base.view(job.shape) if base is not None else None
    assert job.params is not None
    out = plan.method.call(xs, job.params, base=base, rng=rng, trim=trim)
    if tuple(out.shape) != (tuple(job.shape) if shaped else (b - a,)):
        raise RuntimeError(f"method {plan.method.name!r} returned shape {list(out.shape)} for "
                           f"tensor {job.name!r}, expected {list(job.shape) if shaped else [b - a]}")
    return out


def run_plan(
    plan: MergePlan,
    sink: Sink,
    *,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    skip: Collection[str] = (),
) -> RunStats:
    """Run every job of ``plan`` into ``sink``.

    Args:
        plan: the plan (see `soupkit.plan.make_plan`).
        sink: where outputs go.
        progress: called with the number of input bytes consumed after each chunk.
        allow_nonfinite: write NaN / Inf outputs instead of raising (they are listed in
            `RunStats.nonfinite`).
        skip: names of tensors not to compute (their shard is already finished: resume).

    Returns:
        `RunStats` of the run.

    Raises:
        NonFiniteError: a merged chunk holds NaN / Inf (before or after the cast to the output
            dtype), naming the tensor and the input model that holds them.
    """
    t0 = time.perf_counter()
    cast = getattr(torch, plan.config.dtype) if plan.config.dtype else None
    spec = plan.method
    read = written = 0
    nonfinite: dict[str, None] = {}
    skipped = 0
    with TensorReader() as reader, torch.inference_mode():
        load = _Loader(reader, cast)
        # trim_scope: global (TIES): a streaming pre-pass finds each model's exact global cut
        cuts = compute_cuts(plan, reader) if spec.global_trim is not None else {}

        def emit(job: TensorJob, out: torch.Tensor, a: int, b: int) -> None:
            # `out` is the method's float32 result for elements [a, b): check, cast, check, write.
            out_dtype = DTYPES[job.out_dtype][0]
            if not all_finite(out):
                if not allow_nonfinite:
                    raise _nonfinite_error(plan, job, load, a, b, out)
                nonfinite[job.name] = None
            cast_out = out.to(out_dtype)
            if (out_dtype.itemsize < 4 and job.name not in nonfinite
                    and not all_finite(cast_out)):
                if not allow_nonfinite:
                    raise _nonfinite_error(plan, job, load, a, b, out, cast_out)
                nonfinite[job.name] = None
            sink.write(job, cast_out, a)

        for job in plan.jobs:
            out_dtype = DTYPES[job.out_dtype][0]
            if job.name in skip:
                skipped += 1
                n = (job.source.nbytes if job.source is not None else
                     sum(t.nbytes for t in job.inputs) + (job.base.nbytes if job.base else 0))
                if progress:
                    progress(n)
                written += job.numel * DTYPES[job.out_dtype][1]
                continue
            if job.source is not None:
                for a, b in _chunks(job.numel, plan.chunk_elems):
                    raw = reader.read(job.source, a, b)
                    sink.write(job, raw if raw.dtype == out_dtype else raw.to(out_dtype), a)
                    n = (b - a) * job.source.itemsize
                    read += n
                    if progress:
                        progress(n)
            elif spec.elementwise:
                step = RNG_BLOCK if spec.stochastic else plan.chunk_elems
                for a, b in _chunks(job.numel, step):
                    rng = (torch.Generator().manual_seed(tensor_seed(plan.config.seed, job.name, a // RNG_BLOCK))
                           if spec.stochastic else None)
                    out = _merge_range(plan, job, load, a, b, False, rng)
                    emit(job, out, a, b)
                    n = sum((b - a) * t.itemsize for t in job.inputs) + ((b - a) * job.base.itemsize if job.base else 0)
                    read += n
                    if progress:
                        progress(n)
            else:
                rng = torch.Generator().manual_seed(tensor_seed(plan.config.seed, job.name)) if spec.stochastic else None
                out = _merge_range(plan, job, load, 0, job.numel, True, rng, cuts.get(job.name))
                emit(job, out.reshape(-1), 0, job.numel)
                n = sum(t.nbytes for t in job.inputs) + (job.base.nbytes if job.base else 0)
                read += n
                if progress:
                    progress(n)
            written += job.numel * DTYPES[job.out_dtype][1]
    return RunStats(time.perf_counter() - t0, read, written, len(plan.jobs),
                    nonfinite=tuple(nonfinite), skipped=skipped)
