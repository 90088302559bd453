"""The streaming loop: for each planned tensor, read -> float32 method -> cast -> write.

Memory is bounded by the plan: elementwise methods run on chunks of ``plan.chunk_elems``
elements (the inputs of one chunk plus one output chunk); other methods get whole tensors (the
inputs of one tensor plus one output). Randomness comes only from a `torch.Generator` seeded
from (recipe seed, tensor name[, block]), so output bytes never depend on order or threads.

Outputs go to a `Sink`: `FileSink` writes planned shards at their offsets; `MemorySink` fills
in-memory tensors (the Python API's in-memory forms). Both see exactly the same tensors, so a
streamed merge and an in-memory merge agree bit for bit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from soupkit.io.header import DTYPES, TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.io.writer import ShardWriter, write_index
from soupkit.plan import MergePlan, TensorJob

__all__ = ["FileSink", "MemorySink", "RNG_BLOCK", "RunStats", "Sink", "run_plan", "tensor_seed"]

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
    """Writes the plan's shards into ``folder`` (header first, tensors at their offsets)."""

    def __init__(self, plan: MergePlan, folder: Path) -> None:
        self.folder = folder
        self.plan = plan
        self._writers: list[ShardWriter] = []
        self._of: dict[str, ShardWriter] = {}
        try:
            for layout in plan.shards:
                w = ShardWriter(folder, layout)
                self._writers.append(w)
                for t in layout.tensors:
                    self._of[t.name] = w
        except BaseException:
            self.abort()
            raise

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None:
        self._of[job.name].write(job.name, data, element_offset)

    def close(self) -> None:
        for w in self._writers:
            w.close()
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
    """What a run did."""

    seconds: float
    bytes_read: int
    bytes_written: int
    tensors: int


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
                 rng: torch.Generator | None) -> torch.Tensor:
    xs = [load.f32(t, a, b) for t in job.inputs]
    base = load.f32(job.base, a, b) if job.base is not None else None
    if shaped:
        xs = [x.view(job.shape) for x in xs]
        base = base.view(job.shape) if base is not None else None
    assert job.params is not None
    out = plan.method.call(xs, job.params, base=base, rng=rng)
    if tuple(out.shape) != (tuple(job.shape) if shaped else (b - a,)):
        raise RuntimeError(f"method {plan.method.name!r} returned shape {list(out.shape)} for "
                           f"tensor {job.name!r}, expected {list(job.shape) if shaped else [b - a]}")
    return out


def run_plan(
    plan: MergePlan,
    sink: Sink,
    *,
    progress: Callable[[int], None] | None = None,
) -> RunStats:
    """Run every job of ``plan`` into ``sink``.

    Args:
        plan: the plan (see `soupkit.plan.make_plan`).
        sink: where outputs go.
        progress: called with the number of input bytes consumed after each chunk.

    Returns:
        `RunStats` of the run.
    """
    t0 = time.perf_counter()
    cast = getattr(torch, plan.config.dtype) if plan.config.dtype else None
    spec = plan.method
    read = written = 0
    with TensorReader() as reader, torch.inference_mode():
        load = _Loader(reader, cast)
        for job in plan.jobs:
            out_dtype = DTYPES[job.out_dtype][0]
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
                    sink.write(job, out.to(out_dtype), a)
                    n = sum((b - a) * t.itemsize for t in job.inputs) + ((b - a) * job.base.itemsize if job.base else 0)
                    read += n
                    if progress:
                        progress(n)
            else:
                rng = torch.Generator().manual_seed(tensor_seed(plan.config.seed, job.name)) if spec.stochastic else None
                out = _merge_range(plan, job, load, 0, job.numel, True, rng)
                sink.write(job, out.reshape(-1).to(out_dtype), 0)
                n = sum(t.nbytes for t in job.inputs) + (job.base.nbytes if job.base else 0)
                read += n
                if progress:
                    progress(n)
            written += job.numel * DTYPES[job.out_dtype][1]
    return RunStats(time.perf_counter() - t0, read, written, len(plan.jobs))
