"""The engine's thread pipeline: reading ahead, writing behind, bounded buffers.

Threads share the work, so that reading, computing and writing overlap:

- a reader thread (`ReadAhead`) reads the raw bytes of the next unit (a chunk of every input of
  a tensor) with os.preadv into pooled buffers (`BufferPool`) while the current one is computed
  (preadv releases the GIL); `Budget` bounds the bytes of units in flight. A lazy unit (its
  pieces read by the compute threads) is only announced to the kernel (`TensorReader.advise`),
  so that a cold disk reads it ahead instead of idling between the compute threads' reads;
- the main thread and its helpers compute (`soupkit.engine.core`, `soupkit.engine.compute`);
- a writer thread (`WriteBehind`) hands output buffers to the sinks (pwrite and the on-the-fly
  sha256, both of which release the GIL), in order.

torch's own intra-op thread pool is set to ``threads`` (default 1) for the duration
(`torch_threads`): the elementwise ops on cache-sized pieces gain little from it, and on a
contended machine a pool of spinning threads is far slower than one thread (measured; see
benchmarks/README.md).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from soupkit.engine.sinks import Sink
from soupkit.io.header import TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.planning.plan import TensorJob

__all__ = [
    "END",
    "POLL",
    "Budget",
    "BufferPool",
    "Failure",
    "ReadAhead",
    "Unit",
    "WriteBehind",
    "chunks",
    "torch_threads",
]


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    if n == 0:
        yield 0, 0
        return
    for a in range(0, n, size):
        yield a, min(n, a + size)


END = object()
POLL = 0.1  # seconds: cross-thread waits poll, so that no lost wake-up can hang a run


class Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


@dataclass
class Unit:
    """Elements [a, b) of tensor ``j`` of the plans, for one phase of its work."""

    j: int
    phase: str  # "copy" | "skip" | "prepass" (pass ``step`` of a pre-pass) | "merge"
    a: int
    b: int
    infos: tuple[TensorInfo | None, ...]  # inputs..., then the base (None when not read)
    nbytes: int = 0
    # read by the compute threads, piece by piece (see _Engine._lazy), not by the reader thread
    lazy: bool = False
    step: int = 0
    raws: list[torch.Tensor | None] = field(default_factory=list)
    bufs: list[torch.Tensor] = field(default_factory=list)


class Budget:
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
                self.cond.wait(POLL)  # a timeout, as in WriteBehind._run
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


class BufferPool:
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


class ReadAhead:
    """The reader thread: reads the units of ``schedule`` in order, one or two ahead."""

    def __init__(
        self, schedule: Iterator[Unit], reader: TensorReader, pool: BufferPool, budget: Budget
    ) -> None:
        self.pool = pool
        self.budget = budget
        self.queue: queue.Queue[object] = queue.Queue(maxsize=2)
        self._schedule = schedule
        self._reader = reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soupkit-read", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for u in self._schedule:
                if not self.budget.acquire(0 if u.lazy else u.nbytes):
                    return
                if u.lazy and u.phase != "skip":
                    # the compute threads read its pieces: have the disk start on them now
                    for info in u.infos:
                        if info is not None:
                            self._reader.advise(info, u.a, u.b)
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
            self._put(END)
        except BaseException as e:  # reported in the main thread
            self._put(Failure(e))

    def done(self, u: Unit) -> None:
        """The main thread is finished with ``u``: its buffers go back to the pool."""
        for buf in u.bufs:
            self.pool.put(buf)
        u.bufs.clear()
        u.raws.clear()
        self.budget.release(0 if u.lazy else u.nbytes)

    def close(self) -> None:
        self._stop.set()
        self.budget.stop()
        if self._thread.is_alive():
            self._thread.join()


class WriteBehind:
    """The writer thread: hands output buffers to the sinks in order, then back to the pool."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.queue: queue.Queue[object] = queue.Queue(maxsize=3)
        self.error: BaseException | None = None
        self.cancelled = False
        self._thread = threading.Thread(target=self._run, name="soupkit-write", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    item = self.queue.get(timeout=POLL)
                except queue.Empty:
                    continue
                if item is END:
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
        self.queue.put(END)
        self._thread.join()
        self.check()

    def cancel(self) -> None:
        """After a failure: drop the queued writes and stop the thread."""
        if self._thread.is_alive():
            self.cancelled = True
            self.queue.put(END)
            self._thread.join()


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    want = 1 if n is None else n
    if want != old:
        torch.set_num_threads(want)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
