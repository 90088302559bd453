"""Content hashes of input files, computed beside the merge in a background thread.

The report of a merge records the sha256 of every input file so a soup can be audited and
rebuilt. Hashing costs a full read of every input, which would add a second pass to a merge
that is itself bound by reading. `BackgroundHasher` overlaps that pass with the merge: one
thread reads each file in 8 MiB blocks and feeds ``hashlib`` (which releases the GIL on large
buffers), so on two or more cores the hashes cost little wall time, and the reads mostly hit
the page cache the merge is filling anyway. Memory is one block.

`file_state` and `changed_files_check` notice an input that changes while soupkit reads it
(the state is taken before the merge and compared after it).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from soupkit import _interrupts
from soupkit.errors import CheckpointFormatError

__all__ = ["BackgroundHasher", "changed_files_check", "file_state"]

_BLOCK = 8 << 20


def file_state(path: Path) -> tuple[int, int, int]:
    """(size, mtime in ns, inode) of a file: what changes when it is rewritten."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


class BackgroundHasher:
    """sha256 of a list of files in a daemon thread.

    Usage::

        hasher = BackgroundHasher(files)      # starts at once
        ...merge...
        digests = hasher.result()             # waits; path -> hex digest

    `cancel` stops it early (on an interrupt). Files are deduplicated.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(dict.fromkeys(files))
        self._digests: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soupkit-hash-inputs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(_BLOCK)
        mv = memoryview(buf)
        try:
            for f in self.files:
                h = hashlib.sha256()
                with open(f, "rb", buffering=0) as fh:
                    while not self._stop.is_set():
                        n = fh.readinto(mv)
                        if not n:
                            break
                        h.update(mv[:n])
                if self._stop.is_set():
                    return
                self._digests[f] = h.hexdigest()
        except BaseException as e:  # reported by result(), in the caller's thread
            self._error = e

    def cancel(self) -> None:
        """Stop hashing (the thread ends after its current block)."""
        self._stop.set()
        self._thread.join(timeout=5)

    def result(self) -> dict[Path, str]:
        """Wait for every digest.

        Raises:
            CheckpointFormatError: a file could not be read.
        """
        while self._thread.is_alive():
            self._thread.join(timeout=0.1)
            _interrupts.check()  # a held SIGINT / SIGTERM does not wait for the hashing
        if self._error is not None:
            e = self._error
            raise CheckpointFormatError(f"hashing the inputs failed: {getattr(e, 'strerror', None) or e}") from None
        return dict(self._digests)


def changed_files_check(before: dict[Path, tuple[int, int, int]]) -> None:
    """Raise if any file's (size, mtime, inode) differs from ``before``.

    Raises:
        CheckpointFormatError: naming the first file that changed.
    """
    for f, st in before.items():
        try:
            now = file_state(f)
        except OSError as e:
            raise CheckpointFormatError(f"{f}: input disappeared during the merge ({e.strerror})") from None
        if now != st:
            raise CheckpointFormatError(
                f"{f}: the input file changed while soupkit was merging it (size {st[0]} -> "
                f"{now[0]}, modified time or inode changed)\nhint: another program is writing "
                "it; wait until it is done and merge again"
            )
