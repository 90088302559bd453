"""What the compute threads share: their workspaces, the sharing of a unit's pieces, the seeds.

Each compute thread (the main thread, t = 0, and helpers, t = 1, 2, ...) converts inputs into its
own reusable float32 buffers (`Workspace`) and reads lazy pieces into its own byte buffers;
`Helpers.split` hands the pieces of a unit to the threads in turn. Every piece is computed as it
would be alone, and randomness comes only from generators seeded by `tensor_seed` (recipe seed,
tensor name[, block]), so output bytes never depend on chunking, order or threads.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
from collections.abc import Callable, Sequence

import torch

from soupkit.io.header import TensorInfo
from soupkit.io.reader import TensorReader

__all__ = ["Helpers", "Workspace", "exact_inputs", "tensor_seed"]


def tensor_seed(seed: int, name: str, block: int | None = None) -> int:
    """A 63-bit seed derived from the recipe seed, the tensor name and (optionally) a block."""
    key = f"{seed}\x00{name}" + (f"\x00{block}" if block is not None else "")
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & (
        (1 << 63) - 1
    )


def exact_inputs(
    raws: Sequence[torch.Tensor | None], n: int, with_base: bool, cast: torch.dtype | None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Exact mode: every input (and the base) as a new tensor in the compute dtype, as
    mergekit's loader gives them: the recipe's ``dtype``, else the inputs' promoted dtype."""
    *xs_raw, base_raw = raws
    present = [r[:n] for r in xs_raw if r is not None]
    if with_base and base_raw is not None:
        present.append(base_raw[:n])
    dtype = cast
    if dtype is None:
        dtype = present[0].dtype
        for r in present[1:]:
            dtype = torch.promote_types(dtype, r.dtype)
    out = [r.to(dtype, copy=True) for r in present]
    if with_base and base_raw is not None:
        return out[:-1], out[-1]
    return out, None


class Workspace:
    """One compute thread's reusable float32 buffers, one per input (+ base).

    Args:
        keep_elems: buffers up to this many elements are kept for reuse (pieces, RNG blocks).
        cast: the recipe's ``dtype``: inputs are rounded to it before float32 (None: not set).
    """

    def __init__(self, keep_elems: int, cast: torch.dtype | None) -> None:
        self.keep_elems = keep_elems
        self.cast = cast
        self.work: list[torch.Tensor] = []
        self.rbufs: list[torch.Tensor] = []  # per input: bytes of lazily read pieces

    def f32(self, slot: int, raw: torch.Tensor, n: int) -> torch.Tensor:
        """``raw`` (n elements) as float32, in the reusable buffer ``slot``."""
        work = self.work
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

    def inputs(
        self, raws: Sequence[torch.Tensor | None], s: int, e: int, with_base: bool
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Elements [s, e) of every input (and the base) as float32, in this workspace."""
        *xs_raw, base_raw = raws
        xs = [self.f32(i, r[s:e], e - s) for i, r in enumerate(xs_raw) if r is not None]
        base = (
            self.f32(len(xs_raw), base_raw[s:e], e - s)
            if (with_base and base_raw is not None)
            else None
        )
        return xs, base

    def read(
        self, reader: TensorReader, infos: Sequence[TensorInfo | None], a: int, b: int, piece: int
    ) -> list[torch.Tensor | None]:
        """Elements [a, b) of every input, read into this thread's byte buffers (lazy units)."""
        bufs = self.rbufs
        out: list[torch.Tensor | None] = []
        for slot, info in enumerate(infos):
            if info is None:
                out.append(None)
                continue
            while len(bufs) <= slot:
                bufs.append(torch.empty(0, dtype=torch.uint8))
            n = (b - a) * info.itemsize
            if bufs[slot].numel() < n:
                # grown geometrically up to one compute piece: thousands of small inputs do not
                # each reserve a full piece (1 MiB of address space per input under `ulimit -v`)
                grow = min(piece * info.itemsize, 2 * bufs[slot].numel())
                bufs[slot] = torch.empty(max(n, grow), dtype=torch.uint8)
            out.append(reader.read(info, a, b, out=bufs[slot]))
        return out


class Helpers:
    """The helper threads of the compute threads (none for ``threads == 1``)."""

    def __init__(self, threads: int) -> None:
        self.pool = (
            concurrent.futures.ThreadPoolExecutor(threads - 1, thread_name_prefix="soupkit-compute")
            if threads > 1
            else None
        )

    def split(
        self,
        ranges: Sequence[tuple[int, int]],
        piece: Callable[[int, int, int], None],
        threads: int,
    ) -> None:
        """Run ``piece(s, e, t)`` for every range on up to ``threads`` threads: this thread
        (t = 0) and helpers (t = 1, 2, ...) take the next range in turn, so a thread whose
        core is also reading or writing simply does fewer; thread t uses its own `Workspace`.

        Every piece is computed exactly as it would be alone, so the bytes depend neither on
        the number of threads nor on which thread took which piece.
        """
        n = min(threads, len(ranges))
        if n < 2 or self.pool is None:
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

        futures = [self.pool.submit(share, t) for t in range(1, n)]
        try:
            share(0)
        finally:
            # wait for every helper even when this share failed: they write into this unit's
            # output buffer, which goes back to the pool afterwards
            done = concurrent.futures.wait(futures)[0]
        for f in futures:
            if f in done:
                f.result()  # re-raise a helper's error

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
