"""Keep glibc's allocator from returning and re-faulting the engine's large buffers.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` (128 KiB, raised dynamically up to
32 MiB) with its own ``mmap`` and trims the heap top above ``M_TRIM_THRESHOLD`` on free, so the
multi-MiB temporaries of a method that runs on whole RNG blocks or tensors (DARE, DELLA,
Breadcrumbs, SLERP) went back to the kernel after every block and came back as fresh
zero-filled pages. Raising both thresholds keeps those pages in the heap for reuse: on the
DARE-TIES benchmark with 2 compute threads, the pass went from 27.2 s (15.9 s of system CPU) to
17.6 s (3.5 s); `benchmarks/ab.py`, see benchmarks/README.md.

The setting is process-wide and cannot be undone exactly (setting a threshold turns glibc's
dynamic adjustment off), so only the ``soupkit`` command applies it, at start-up; library
users can call `tune_allocator` themselves. A no-op where glibc's ``mallopt`` is missing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # allocations below this come from the heap, and are reused
TRIM_THRESHOLD = 256 << 20  # free heap memory kept before returning the top to the kernel

_done = False


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (once); returns whether they were set."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _done
