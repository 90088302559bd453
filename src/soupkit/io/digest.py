"""sha256 of files: the one helper (`sha256_file`), the one cache (`HashCache`), and the
input hashes computed beside a merge in background threads.

The report of a merge records the sha256 of every input file so a soup can be audited and
rebuilt. Hashing costs a full read of every input, which would add a second pass to a merge
that is itself bound by reading. `BackgroundHasher` overlaps that pass with the merge: its
threads read the files in 8 MiB blocks and feed ``hashlib`` (which releases the GIL on large
buffers). Memory is one block per thread. sha256 runs at 1.1-1.3 GiB/s per core here even
with the CPU's SHA instructions, so one thread alone finished about 2 s after a 7 GB linear
merge on two cores, the other core idle; two threads, the largest files first, finish with the
merge. On two cores the hashing is then the larger part of a first merge's CPU time
(benchmarks/README.md, "Issue 17").

A merge's hashing follows its reads (`ReadMarks`, filled by the merge's
`soupkit.io.reader.TensorReader`): a file is hashed only as far as the merge has read it
without a gap, so every hashing read finds its pages in the page cache. On a cold cache the
disk then serves the merge's reads alone; hashing threads reading the files in their own order
beside it made a cold linear merge take 1.51x a cold ``cat`` of its inputs, against 1.09x
without hashing. What the merge never reads (a resumed merge's finished shards) is hashed once
it is over.

`sha256_file` is the one helper soupkit hashes a file with (inputs, search ingredients,
evaluator sources, the lm-eval evaluator's files, `soupkit diagnose`'s tokenizer files), in
`BLOCK`-sized reads; output shards are hashed as they are written (`soupkit.io.output`).

`HashCache` remembers digests across runs under a file's identity and state (path, device,
inode, size, modification and change times), as git's index does: merging the same inputs
again (a sweep, a greedy soup, a recipe being tuned) skips the hashing, about 3 CPU-seconds per
7 GB here. A search's score cache keeps the same digests in its own file and passes them in
as ``records`` (one store, two places it persists). Any write to a file changes its change time (``st_ctime``, which no program can set
back), so a changed file is hashed again. ``SOUPKIT_HASH_CACHE=0`` turns the cache off.

`file_state` and `changed_files_check` notice an input that changes while soupkit reads it
(the state is taken before the merge and compared after it).
"""

from __future__ import annotations

import bisect
import errno
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
    "ReadMarks",
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


class ReadMarks:
    """The byte ranges of each file a run has read so far, for hashing threads that follow it.

    The run's reader calls `add` after each read (`soupkit.io.reader.TensorReader`). A
    `BackgroundHasher` given these marks hashes a file only as far as the run has read it
    without a gap (`reach`), so its reads find pages the run has just brought into the page
    cache: on a cold cache the disk serves the run's reads alone, not those plus one stream per
    hashing thread elsewhere in the files. `finish` says the run has read all it will; the
    hashing then reads what is left (tensors the run skipped) itself.
    """

    def __init__(self) -> None:
        self._spans: dict[Path, list[tuple[int, int]]] = {}  # sorted, disjoint, not touching
        self._done = False
        #: notified on every change; `BackgroundHasher` waits on it
        self.changed = threading.Condition()

    def add(self, path: Path, start: int, stop: int) -> None:
        """Bytes ``[start, stop)`` of ``path`` were read."""
        if stop <= start:
            return
        with self.changed:
            spans = self._spans.setdefault(path, [])
            i = bisect.bisect_left(
                spans, start, key=lambda s: s[1]
            )  # first one ending at or after start
            j = i
            while j < len(spans) and spans[j][0] <= stop:
                start, stop = min(start, spans[j][0]), max(stop, spans[j][1])
                j += 1
            spans[i:j] = [(start, stop)]
            self.changed.notify_all()

    def reach(self, path: Path, pos: int) -> int | None:
        """Where the bytes read from ``pos`` on without a gap end (``pos`` when the byte at
        ``pos`` was not read); None once `finish` was called."""
        with self.changed:
            if self._done:
                return None
            spans = self._spans.get(path, [])
            i = bisect.bisect_right(spans, pos, key=lambda s: s[0]) - 1
            return spans[i][1] if i >= 0 and spans[i][1] > pos else pos

    def finish(self) -> None:
        """The run has read everything it will read."""
        with self.changed:
            self._done = True
            self.changed.notify_all()


class _Cancelled(Exception):
    """`BackgroundHasher.cancel` was called: stop after the current block."""


class _File:
    """One file's hashing, resumable: a thread takes it, hashes what may be read, gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sort_size = _size(path)  # the order files are started in (largest first)
        self.fd: int | None = None  # open once started
        self.size = 0
        self.key: str | None = None  # its `HashCache.key` when started
        self.free = 0  # bytes it may hash before the run reads them (a safetensors header)
        self.sha: hashlib._Hash | None = None  # once started, when not in the cache
        self.pos = 0
        self.busy = False
        self.done = False


def _header_end(fd: int, path: Path, size: int) -> int:
    """Bytes of ``path`` hashable before a run reads any tensor: a safetensors file's 8-byte
    length and JSON header, which planning read; all of any other file (read whole at
    planning, never streamed)."""
    if path.suffix != ".safetensors":
        return size
    head = os.pread(fd, 8, 0)
    return min(size, 8 + int.from_bytes(head, "little")) if len(head) == 8 else size


class BackgroundHasher:
    """sha256 of a list of files in daemon threads.

    Usage::

        hasher = BackgroundHasher(files)      # starts at once
        ...merge...
        digests = hasher.result()             # waits; path -> hex digest

    `cancel` stops it early (on an interrupt). Files are deduplicated and started largest
    first, shared among ``threads`` threads (default `default_threads`). Digests found in
    ``cache`` (e.g. `HashCache.default()`) are not computed again, and new ones are added to it
    by `result`. With ``marks``, each file is hashed only as far as the run has read it
    (`ReadMarks`), until `ReadMarks.finish`; `result` calls that (the run is over by then).
    """

    def __init__(
        self,
        files: Sequence[Path],
        cache: HashCache | None = None,
        threads: int | None = None,
        marks: ReadMarks | None = None,
    ) -> None:
        self.files = list(dict.fromkeys(files))
        self.cache = cache
        self.marks = marks
        self.from_cache: set[Path] = set()  # files whose digest came from the cache
        self._digests: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._cond = marks.changed if marks is not None else threading.Condition()
        self._todo = sorted((_File(f) for f in self.files), key=lambda f: -f.sort_size)
        n = default_threads(len(self.files)) if threads is None else max(1, threads)
        self._threads = [
            threading.Thread(target=self._run, name=f"soupkit-hash-inputs-{i}", daemon=True)
            for i in range(min(n, max(1, len(self.files))))
        ]
        for t in self._threads:
            t.start()

    def _stop_point(self) -> None:
        if self._stop.is_set():
            raise _Cancelled

    def _hashable(self, f: _File) -> int:
        """Where ``f`` may be hashed to now (past its position when not started: starting it
        reads it)."""
        if f.fd is None:
            return f.pos + 1
        if self.marks is None:
            return f.size
        reach = self.marks.reach(f.path, max(f.pos, f.free))
        return f.size if reach is None else min(reach, f.size)

    @staticmethod
    def _ready(f: _File, stop: int) -> bool:
        """Worth a hashing step: a whole block, or the rest of the file, or starting it."""
        return stop > f.pos and (f.fd is None or stop == f.size or stop - f.pos >= BLOCK)

    def _take(self) -> tuple[_File, int] | None:
        """The next file to hash and how far, or None when nothing is left for this thread
        (every unfinished file is another thread's). Waits while the run has not read far
        enough into any file."""
        with self._cond:
            while True:
                if self._stop.is_set() or self._error is not None:
                    return None
                left = [f for f in self._todo if not f.done]
                idle = [f for f in left if not f.busy]
                if not idle:
                    return None
                for f in idle:  # largest first: the order of _todo
                    stop = self._hashable(f)
                    if self._ready(f, stop):
                        break
                else:
                    self._cond.wait(timeout=0.1)
                    continue
                f.busy = True
                return f, stop

    def _start(self, f: _File) -> None:
        """Open ``f``, note its cache key, and take its digest from the cache if it is there."""
        key, got = self.cache.lookup(f.path) if self.cache is not None else (None, None)
        if got is not None:
            self._digests[f.path] = got
            self.from_cache.add(f.path)
            f.done = True
            return
        f.key = key
        f.sha = hashlib.sha256()
        f.fd = os.open(f.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        f.size = os.fstat(f.fd).st_size
        f.free = _header_end(f.fd, f.path, f.size) if self.marks is not None else f.size

    def _hash(self, f: _File, stop: int, buf: memoryview) -> None:
        """Hash ``f`` from where it is to ``stop`` and on, as far as may be read meanwhile."""
        assert f.fd is not None and f.sha is not None
        while f.pos < f.size:
            if f.pos >= stop:
                stop = self._hashable(f)
                if not self._ready(f, stop):
                    return  # taken again when the run has read a block further
            self._stop_point()
            n = os.preadv(f.fd, [buf[: min(BLOCK, stop - f.pos)]], f.pos)
            if n == 0:
                raise OSError(errno.EIO, f"{f.path} ended at byte {f.pos}, not {f.size}")
            f.sha.update(buf[:n])
            f.pos += n
        self._digests[f.path] = f.sha.hexdigest()
        os.close(f.fd)
        f.fd, f.done = None, True
        if self.cache is not None and f.key is not None:
            self.cache.remember(f.path, f.key, self._digests[f.path])

    def _run(self) -> None:
        buf = memoryview(bytearray(BLOCK))
        try:
            while (job := self._take()) is not None:
                f, stop = job
                try:
                    if f.fd is None:
                        self._start(f)
                        stop = self._hashable(f)
                    if not f.done:
                        self._hash(f, stop, buf)
                finally:
                    with self._cond:
                        f.busy = False
                        self._cond.notify_all()
        except _Cancelled:
            return
        except BaseException as e:  # reported by result(), in the caller's thread
            with self._cond:
                if self._error is None:
                    self._error = e
                self._cond.notify_all()

    def cancel(self) -> None:
        """Stop hashing (each thread ends after its current block)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self._close()

    def _close(self) -> None:
        for f in self._todo:
            if f.fd is not None and not f.busy:
                os.close(f.fd)
                f.fd = None

    def result(self) -> dict[Path, str]:
        """Wait for every digest (first telling the marks, if any, that the run is over).

        Raises:
            CheckpointFormatError: a file could not be read.
        """
        if self.marks is not None:
            self.marks.finish()
        for t in self._threads:
            while t.is_alive():
                t.join(timeout=0.1)
                _interrupts.check()  # a held SIGINT / SIGTERM does not wait for the hashing
        self._close()
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
            ...merge, its reader given hashes.marks...
            digests, from_cache = hashes.result()              # raises if an input changed

    The hashing follows the run's reads through `marks` (`ReadMarks`; None when hashing is
    off), so give them to the run's `soupkit.io.reader.TensorReader`: a run that does not
    report its reads gets its digests only when `result` is called. Leaving the block stops
    the hashing (on an error or interrupt).
    """

    def __init__(self, before: Mapping[Path, FileStamp], *, enabled: bool = True) -> None:
        self.before = dict(before)
        self.enabled = enabled and bool(self.before)
        self.marks = ReadMarks() if self.enabled else None
        self._hasher: BackgroundHasher | None = None

    def __enter__(self) -> InputHashes:
        if self.enabled:
            self._hasher = BackgroundHasher(
                list(self.before), HashCache.default(), marks=self.marks
            )
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
