"""sha256 of files: the one helper (`sha256_file`), the one cache (`HashCache`), and the
input hashes computed beside a merge in a background thread.

The report of a merge records the sha256 of every input file so a soup can be audited and
rebuilt. Hashing costs a full read of every input, which would add a second pass to a merge
that is itself bound by reading. `BackgroundHasher` overlaps that pass with the merge: its
threads read the files in 8 MiB blocks and feed ``hashlib`` (which releases the GIL on large
buffers), and the reads mostly hit the page cache the merge is filling anyway. Memory is one
block per thread. sha256 runs at 1.1-1.3 GiB/s per core here even with the CPU's SHA
instructions, so one thread alone finished about 2 s after a 7 GB linear merge on two cores,
the other core idle; two threads, the largest files first, finish with the merge. On two cores
the hashing is then the larger part of a first merge's CPU time (benchmarks/README.md,
"Issue 17").

`sha256_file` is the one helper soupkit hashes a file with (inputs, search ingredients,
evaluator sources, the lm-eval evaluator's files, `soupkit diagnose`'s tokenizer files), in
`BLOCK`-sized reads; output shards are hashed as they are written (`soupkit.io.output`).

`HashCache` remembers digests across runs under a file's identity and state (path, device,
inode, size, modification and change times), as git's index does: merging the same inputs
again (a sweep, a greedy soup, a recipe being tuned) skips the hashing, about 3 CPU-seconds per
7 GB here. A search's score cache keeps the same digests in its own file and passes them in
as ``records`` (one store, two places it persists). Any write to a file changes its change
time (``st_ctime``, which ordinary programs cannot set back), so a changed file is hashed
again. ``SOUPKIT_HASH_CACHE=0`` turns the cache off.

`file_state` and `changed_files_check` notice an input that changes while soupkit reads it
(the state is taken before the merge and compared after it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from soupkit._util import interrupts as _interrupts
from soupkit.errors import CheckpointFormatError, shown
from soupkit.io.header import FileStamp, changed_message, file_stamp

__all__ = [
    "BLOCK",
    "BackgroundHasher",
    "HashCache",
    "InputHashes",
    "cache_dir",
    "changed_files_check",
    "default_threads",
    "file_state",
    "sha256_file",
]

#: bytes per read when hashing or copying a file (one buffer of this size per hashing thread)
BLOCK = 8 << 20


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """The sha256 hex digest of a file, read in `BLOCK` blocks (bounded memory).

    Args:
        path: the file.
        on_bytes: called with the size of each block after it is hashed (a progress bar's
            ``update``); an exception it raises stops the hashing.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.sha256()
    mv = memoryview(bytearray(BLOCK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            h.update(mv[:n])
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest()


def cache_dir() -> Path:
    """soupkit's cache folder: ``$SOUPKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/soupkit``, else
    ``~/.cache/soupkit``."""
    root = os.environ.get("SOUPKIT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "soupkit"


class HashCache:
    """sha256 digests of files, remembered under their identity and state (`key`).

    Args:
        path: the JSON file (`default` gives the usual one, or no cache when
            ``SOUPKIT_HASH_CACHE=0``); None keeps the digests in memory only.
        limit: entries kept (the most recently added); older ones are dropped when saving.
        records: more known digests (key -> sha256), e.g. those a score cache persisted.

    Attributes:
        new: digests added since the last `save` (a score cache appends them to its file).
    """

    NAME = "input-sha256.json"

    def __init__(
        self, path: Path | None, limit: int = 4096, records: Mapping[str, str] | None = None
    ) -> None:
        self.path = path
        self.limit = limit
        self.entries = {**self._load(), **dict(records or {})}
        self.new: dict[str, str] = {}

    @staticmethod
    def default_path() -> Path | None:
        """The shared cache file in `cache_dir`, or None when ``SOUPKIT_HASH_CACHE`` is 0 /
        false / no / off."""
        if os.environ.get("SOUPKIT_HASH_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        return cache_dir() / HashCache.NAME

    @classmethod
    def default(cls) -> HashCache | None:
        """The cache in `cache_dir`, or None when ``SOUPKIT_HASH_CACHE`` is 0 / false / off."""
        path = cls.default_path()
        return cls(path) if path is not None else None

    @staticmethod
    def key(path: Path) -> str:
        """What identifies a file's content without reading it (raises OSError)."""
        st = os.stat(path)
        return f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet, unreadable or damaged: start afresh (it is only a cache)
        if (
            not isinstance(data, dict)
            or data.get("version") != 1
            or not isinstance(data.get("sha256"), dict)
        ):
            return {}
        return {
            k: v
            for k, v in data["sha256"].items()
            if isinstance(k, str) and isinstance(v, str) and len(v) == 64
        }

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, digest: str) -> None:
        self.entries[key] = digest
        self.new[key] = digest

    def lookup(self, path: Path) -> tuple[str, str | None]:
        """``path``'s `key` now and its remembered digest, if any (raises OSError)."""
        key = self.key(path)
        return key, self.get(key)

    def remember(self, path: Path, key: str, digest: str) -> None:
        """Remember ``digest``, computed from ``path`` read after `lookup` gave ``key``, unless
        the file changed meanwhile."""
        if self.key(path) == key:
            self.put(key, digest)

    def sha256(self, path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
        """The digest of ``path``: remembered, or computed (`sha256_file`) and remembered if the
        file did not change while it was read. ``on_bytes`` sees the file's size either way.

        Raises:
            OSError: the file cannot be read.
        """
        key, got = self.lookup(path)
        if got is not None:
            if on_bytes is not None:
                on_bytes(path.stat().st_size)
            return got
        got = sha256_file(path, on_bytes)
        self.remember(path, key, got)
        return got

    def save(self) -> None:
        """Add the new digests to the file (merged with what other runs wrote meanwhile),
        atomically; a cache that cannot be written is left alone."""
        if not self.new:
            return
        if self.path is None:
            self.new.clear()
            return
        merged = {**self._load(), **self.new}
        keep = dict(list(merged.items())[-self.limit :])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".input-sha256-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"version": 1, "sha256": keep}, f)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            return
        self.new.clear()


def file_state(path: Path) -> FileStamp:
    """The identity of a file now (see `soupkit.io.header.file_stamp`)."""
    return file_stamp(os.stat(path))


def default_threads(files: int) -> int:
    """Hashing threads beside a merge: two on a two-core machine (one alone finishes well after
    the merge), half the cores on larger ones, at most 8 and at most one per file."""
    return max(1, min(files, max(2, (os.cpu_count() or 1) // 2), 8))


def _size(f: Path) -> int:
    try:
        return os.stat(f).st_size
    except OSError:
        return 0  # reported when it is hashed


class _Cancelled(Exception):
    """`BackgroundHasher.cancel` was called: stop after the current block."""


class BackgroundHasher:
    """sha256 of a list of files in daemon threads.

    Usage::

        hasher = BackgroundHasher(files)      # starts at once
        ...merge...
        digests = hasher.result()             # waits; path -> hex digest

    `cancel` stops it early (on an interrupt). Files are deduplicated and hashed largest
    first, each by one of ``threads`` threads (default `default_threads`). Digests found in
    ``cache`` (e.g. `HashCache.default()`) are not computed again, and new ones are added to it
    by `result`.
    """

    def __init__(
        self, files: Sequence[Path], cache: HashCache | None = None, threads: int | None = None
    ) -> None:
        self.files = list(dict.fromkeys(files))
        self.cache = cache
        self.from_cache: set[Path] = set()  # files whose digest came from the cache
        self._digests: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._todo = sorted(self.files, key=_size)  # popped from the end: largest first
        n = default_threads(len(self.files)) if threads is None else max(1, threads)
        self._threads = [
            threading.Thread(target=self._run, name=f"soupkit-hash-inputs-{i}", daemon=True)
            for i in range(min(n, max(1, len(self.files))))
        ]
        for t in self._threads:
            t.start()

    def _stop_point(self, _n: int) -> None:
        if self._stop.is_set():
            raise _Cancelled

    def _next(self) -> Path | None:
        with self._lock:
            if self._error is not None or not self._todo:
                return None
            return self._todo.pop()

    def _run(self) -> None:
        try:
            while (f := self._next()) is not None:
                self._stop_point(0)
                key, got = self.cache.lookup(f) if self.cache is not None else (None, None)
                if got is not None:
                    self._digests[f] = got
                    self.from_cache.add(f)
                    continue
                self._digests[f] = sha256_file(f, self._stop_point)
                if self.cache is not None and key is not None:
                    self.cache.remember(f, key, self._digests[f])
        except _Cancelled:
            return
        except BaseException as e:  # reported by result(), in the caller's thread
            with self._lock:
                if self._error is None:
                    self._error = e

    def cancel(self) -> None:
        """Stop hashing (the thread ends after its current block)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)

    def result(self) -> dict[Path, str]:
        """Wait for every digest.

        Raises:
            CheckpointFormatError: a file could not be read.
        """
        for t in self._threads:
            while t.is_alive():
                t.join(timeout=0.1)
                _interrupts.check()  # a held SIGINT / SIGTERM does not wait for the hashing
        if self._error is not None:
            e = self._error
            raise CheckpointFormatError(
                f"hashing the inputs failed: {getattr(e, 'strerror', None) or e}"
            ) from None
        if self.cache is not None:
            self.cache.save()
        return dict(self._digests)


class InputHashes:
    """The inputs of a run: their sha256 computed in the background (`BackgroundHasher`, with
    the default `HashCache`) while the run reads them, and their state checked afterwards.

    Usage::

        with InputHashes(before, enabled=True) as hashes:    # before: path -> `file_state`
            ...merge...
            digests, from_cache = hashes.result()              # raises if an input changed

    Leaving the block stops the hashing (on an error or interrupt).
    """

    def __init__(self, before: Mapping[Path, FileStamp], *, enabled: bool = True) -> None:
        self.before = dict(before)
        self.enabled = enabled and bool(self.before)
        self._hasher: BackgroundHasher | None = None

    def __enter__(self) -> InputHashes:
        if self.enabled:
            self._hasher = BackgroundHasher(list(self.before), HashCache.default())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._hasher is not None:
            self._hasher.cancel()

    def result(self) -> tuple[dict[Path, str], set[Path]]:
        """Every input's sha256 (empty when hashing is off) and the files whose digest came
        from the cache, after checking that no input changed since ``before``.

        Raises:
            CheckpointFormatError: a file could not be read, or an input changed.
        """
        digests = self._hasher.result() if self._hasher is not None else {}
        changed_files_check(self.before)
        return digests, (self._hasher.from_cache if self._hasher is not None else set())


def changed_files_check(
    before: Mapping[Path, FileStamp], when: str = "while soupkit was merging it"
) -> None:
    """Raise if any file's identity (`file_state`) differs from ``before``.

    Raises:
        CheckpointFormatError: naming the first file that changed.
    """
    for f, st in before.items():
        try:
            now = file_state(f)
        except OSError as e:
            raise CheckpointFormatError(
                f"{shown(f)}: input disappeared {when} ({e.strerror})"
            ) from None
        if now != st:
            raise CheckpointFormatError(changed_message(f, st, now, when))
