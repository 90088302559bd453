"""The engine's buffer sizes, shared by the engine (`soupkit.engine`) and by the plan's memory
estimate, which must not import the engine (layering: engine -> planning -> io, methods)."""

from __future__ import annotations

import os

from soupkit.methods._topk import BATCH_ENTRIES

__all__ = [
    "BATCH_ENTRIES",
    "COMPUTE_ELEMS",
    "MAX_COMPUTE_THREADS",
    "OUTPUT_BUFFERS",
    "RNG_BLOCK",
    "compute_threads",
    "stream_threads",
]

# Stochastic elementwise methods draw per block of this many elements, each block with its own
# generator, so results do not depend on how the engine chunks a tensor.
RNG_BLOCK = 1 << 20

# A unit is read in one go: ``plan.chunk_elems`` elements (bounded memory), a whole RNG block
# for stochastic methods, or the whole tensor for methods that need it. The compute threads then
# work on pieces of at most this many elements, so that the float32 working set (a few inputs
# plus temporaries, 1-5 MiB) stays in the CPU caches. 1 << 18 against 1 << 16: linear's pass
# 2.5-2.9 s against 2.9-3.4 s (fewer calls per byte); 1 << 20 spills the caches (3.5-4.7 s).
COMPUTE_ELEMS = 1 << 18

# Output buffers alive at once at most: the pool keeps 4, the writer's queue holds 3 plus one in
# hand, but the pool and the queue share buffers; 5 bounds what the estimate counts.
OUTPUT_BUFFERS = 5

# BATCH_ENTRIES (from soupkit.methods._topk): the radix select of a magnitude pre-pass counts
# bins per batch of this many entries (one int32 buffer per histogram).

# Elementwise pieces of one unit are computed by up to this many threads (the main thread and
# helpers; torch kernels release the GIL). More rarely pays: reading, writing and hashing need
# cores too, and the pieces are memory-bound.
MAX_COMPUTE_THREADS = 4


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compute_threads() -> int:
    """The engine's default number of compute threads for compute-bound pieces (stochastic
    methods' RNG blocks): the CPUs this process may use, at most `MAX_COMPUTE_THREADS`."""
    return max(1, min(_cpus(), MAX_COMPUTE_THREADS))


def stream_threads() -> int:
    """The default for pieces of cheap elementwise work (linear, task arithmetic, TIES's passes):
    one CPU fewer, because copying the inputs out of the page cache and writing the output keep
    about one core busy. On 2 cores a second compute thread showed no gain for linear or TIES
    and made DARE 1.4-1.9x faster (`benchmarks/ab.py`, benchmarks/README.md)."""
    return max(1, min(_cpus() - 1, MAX_COMPUTE_THREADS))
