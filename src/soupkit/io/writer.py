"""Header-first streaming safetensors writer and atomic output folders.

safetensors puts all metadata before the first data byte (safetensors#291), so a streamed
write needs the complete header up front. The planner knows every output tensor's dtype and
shape before any data moves; `layout_shards` turns that into shards, headers and byte offsets,
and `ShardWriter` then writes each tensor (or chunk of a tensor) at its offset with
``os.pwrite``, in any order.

`OutputFolder` makes the result appear atomically: everything is written under a hidden
``.soupkit-partial-*`` folder beside the destination and renamed into place only when
complete; on any failure the partial folder is removed. The index (for sharded output) is
written last, inside the partial folder. The rename protects against interrupted and crashed
runs; it does not fsync, so it is not a guarantee against power loss.

Interrupts and kills:

- SIGINT and SIGTERM are held back (``pthread_sigmask``) while the partial folder is created,
  removed or renamed into place, so a signal cannot split those steps; it is delivered right
  after them.
- During a merge the signals are held (`soupkit._util.interrupts`) and delivered at safe points,
  the last one just before the rename, so an interrupt never lands inside a lock of the
  engine's threads, and one that Python swallowed (raised in a ``__del__``) still cancels the
  output instead of being lost.
- A process killed outright (SIGKILL, OOM killer, power cut) cannot clean up. Each partial
  folder holds a ``.soupkit-lock`` file that its run keeps ``flock``-ed; the next run to the
  same destination removes every partial folder of that destination whose lock is free (its
  run is gone), so debris never accumulates and never looks like a finished model.
- Resumable runs (``resume_key``) use a deterministic partial folder that survives failures,
  with a `Journal` of finished shards and their sha256; a re-run verifies and skips them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch

from soupkit._util import interrupts as _interrupts
from soupkit.errors import CheckpointFormatError, MergeIOError, OutputExistsError, UsageError, shown
from soupkit.io.digest import BLOCK, sha256_file
from soupkit.io.folder import INDEX_NAME
from soupkit.io.header import DTYPES, open_regular
from soupkit.io.reader import byte_view

__all__ = [
    "JOURNAL_NAME",
    "Journal",
    "LOCK_NAME",
    "OutputFolder",
    "OutputTensor",
    "ShardLayout",
    "ShardWriter",
    "layout_shards",
    "parse_size",
    "io_failure",
    "remove_stale",
    "reserve",
    "signals_deferred",
    "write_index",
]

LOCK_NAME = ".soupkit-lock"
JOURNAL_NAME = ".soupkit-journal.jsonl"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: int | str) -> int:
    """Parse ``"5GB"`` (10^9, as Hugging Face does), ``"500MiB"`` (2^20) or an int of bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return size
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"cannot read size {size!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise ValueError(f"size must be at least 1 byte, got {size!r}")
    return int(value)


@dataclass(frozen=True)
class OutputTensor:
    """One output tensor: name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class ShardLayout:
    """One output file, fully decided before any data is written.

    Attributes:
        filename: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``.
        header: the exact header bytes (length prefix + padded JSON).
        offsets: tensor name -> absolute byte offset of its first byte in the file.
        size: the final file size.
    """

    filename: str
    header: bytes = field(repr=False)
    offsets: dict[str, int] = field(repr=False)
    tensors: tuple[OutputTensor, ...] = field(repr=False)
    size: int = 0


def _header_bytes(
    tensors: Sequence[OutputTensor], metadata: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
    obj: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    rel: dict[str, int] = {}
    pos = 0
    for t in tensors:
        obj[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        rel[t.name] = pos
        pos += t.nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Pad with spaces to a multiple of 8 bytes, as the reference writer does, so every
    # tensor's data is 8-byte aligned in the file.
    text += b" " * (-len(text) % 8)
    header = len(text).to_bytes(8, "little") + text
    return header, {k: len(header) + v for k, v in rel.items()}


def layout_shards(
    tensors: Sequence[OutputTensor],
    max_shard_size: int,
    metadata: dict[str, str] | None = None,
) -> list[ShardLayout]:
    """Split ``tensors`` (in order) into shards of at most ``max_shard_size`` data bytes.

    A tensor larger than the limit gets a shard of its own, as Hugging Face does. One shard is
    named ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors``.
    """
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    meta = {"format": "pt", **(metadata or {})}
    out: list[ShardLayout] = []
    n = len(groups)
    for i, g in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offsets = _header_bytes(g, meta)
        out.append(
            ShardLayout(name, header, offsets, tuple(g), len(header) + sum(t.nbytes for t in g))
        )
    return out


def write_index(folder: Path, shards: Sequence[ShardLayout]) -> None:
    """Write ``model.safetensors.index.json`` (only for more than one shard)."""
    if len(shards) < 2:
        return
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total = sum(t.nbytes for s in shards for t in s.tensors)
    body = {"metadata": {"total_size": total}, "weight_map": weight_map}
    try:
        (folder / INDEX_NAME).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise io_failure(f"{folder / INDEX_NAME}: cannot write", e) from None


def copy_file(src: Path, dst: Path, limit: int) -> str:
    """Copy ``src`` to ``dst`` in blocks (never whole in memory) and return its sha256.

    Raises:
        CheckpointFormatError: ``src`` cannot be read, is not a regular file, or has grown past
            ``limit`` bytes since it was checked.
        MergeIOError: ``dst`` cannot be written.
    """
    h = hashlib.sha256()
    mv = memoryview(bytearray(BLOCK))
    done = 0
    try:
        fin = open(open_regular(src), "rb", buffering=0)
    except OSError as e:
        raise CheckpointFormatError(f"{shown(src)}: cannot read ({e.strerror})") from None
    with fin:
        try:
            fout = open(dst, "wb")
        except OSError as e:
            raise io_failure(f"{dst}: cannot write", e) from None
        with fout:
            while True:
                try:
                    n = fin.readinto(mv)
                except OSError as e:
                    raise CheckpointFormatError(
                        f"{shown(src)}: cannot read ({e.strerror})"
                    ) from None
                if not n:
                    break
                done += n
                if done > limit:
                    raise CheckpointFormatError(
                        f"{shown(src)}: grew past {limit:,} bytes while it was "
                        "copied\nhint: another program is writing it"
                    )
                h.update(mv[:n])
                try:
                    fout.write(mv[:n])
                except OSError as e:
                    raise io_failure(f"{dst}: cannot write", e) from None
    return h.hexdigest()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the duration (delivered when the block ends).

    Used around steps that must not be split by an interrupt: creating, removing or renaming
    the partial folder. A no-op where signal masks are not available.
    """
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# the buffer of a shard's direct writes (one shard is written at a time)
STAGING_BYTES = 8 << 20

# ``SOUPKIT_DIRECT_WRITES=0`` turns direct writes off (e.g. on a network filesystem, where each
# direct write is a synchronous round trip)
DIRECT_WRITES = os.environ.get("SOUPKIT_DIRECT_WRITES", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def io_failure(what: str, e: OSError) -> MergeIOError:
    """``MergeIOError("{what} ({strerror})")``, with a hint when the disk is full."""
    hint = (
        "\nhint: the disk is full; free space or choose another output folder"
        if e.errno == errno.ENOSPC
        else ""
    )
    return MergeIOError(f"{what} ({e.strerror}){hint}")


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte of ``mv`` is written at ``offset`` (raises OSError)."""
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        f = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    f.restype = ctypes.c_int
    return f


_fallocate = _libc_fallocate()


def reserve(fd: int, size: int) -> bool:
    """Allocate ``size`` bytes of disk for the file ``fd`` up front (Linux ``fallocate``).

    A full disk then fails here, before any merging, instead of part-way through; and writes
    that go through the page cache skip the filesystem's block reservation page by page.
    Unlike ``posix_fallocate``, which falls back to writing a byte into every block where the
    filesystem has no ``fallocate``, this is skipped where the call is not supported.

    Returns:
        whether the space was reserved.

    Raises:
        OSError: ``ENOSPC`` (or another error than "not supported").
    """
    if _fallocate is None or size <= 0:
        return False
    if _fallocate(fd, 0, 0, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err))


class _Staging:
    """Bytes that arrive in file order, gathered into an aligned buffer and written with
    ``O_DIRECT``: a whole buffer at a time, at aligned file offsets.

    Direct writes skip the page cache. The output then does not push the merge's inputs out
    of the cache (the next merge of the same inputs, a sweep's or a greedy soup's, reads them
    warm again), and the kernel allocates no page-cache pages for it: on a virtual machine
    whose free memory goes back to the host, every fresh page costs a fault in the host
    (benchmarks/README.md, "Machine", measures it).
    """

    ALIGN = 4096  # file offsets, lengths and the buffer's address: any device's logical block

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.buf = mmap.mmap(-1, size)  # page aligned
        self.view = torch.frombuffer(self.buf, dtype=torch.uint8)
        self.start = 0  # the file offset of buf[0] (aligned)
        self.used = 0
        self.taken = 0  # bytes of the last `add`'s data in the buffer or written

    @property
    def end(self) -> int:
        return self.start + self.used

    def add(self, data: torch.Tensor) -> None:
        """Append ``data`` (uint8), writing every buffer that fills. If a write fails, the
        buffer is still full and `taken` says how much of ``data`` it holds."""
        size = len(self.buf)
        n = data.numel()
        self.taken = 0
        while self.taken < n:
            take = min(n - self.taken, size - self.used)
            self.view[self.used : self.used + take].copy_(
                data[self.taken : self.taken + take]
            )  # no GIL
            self.used += take
            self.taken += take
            if self.used == size:
                self._write(size)
                self.start += size
                self.used = 0

    def _write(self, n: int) -> None:
        _pwrite_all(self.fd, memoryview(self.buf)[:n], self.start)

    def flush(self, buffered_fd: int) -> None:
        """Write what is left: the aligned part directly, the tail through ``buffered_fd``."""
        whole = self.used - self.used % self.ALIGN
        if whole:
            self._write(whole)
        _pwrite_all(buffered_fd, memoryview(self.buf)[whole : self.used], self.start + whole)
        self.start += self.used
        self.used = 0

    def close(self) -> None:
        del self.view
        self.buf.close()
        os.close(self.fd)


def _open_direct(path: Path) -> int | None:
    """``path`` opened for writing with ``O_DIRECT``, or None where that is not supported."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None  # tmpfs and some others refuse O_DIRECT (EINVAL)


class ShardWriter:
    """Writes one shard: the header first, then tensor bytes at their precomputed offsets.

    The sha256 of the shard is computed on the fly while writes arrive in file order (the
    engine's order); if they do not, it is computed from the file when the shard is finished.

    With ``direct`` (default: `DIRECT_WRITES`, from ``SOUPKIT_DIRECT_WRITES``), bytes that
    arrive in file order are gathered into an aligned buffer of `STAGING_BYTES` and written
    with ``O_DIRECT`` (see `_Staging`); a write out of order, a filesystem without
    ``O_DIRECT``, or a direct write it refuses (even the last, at `close`) switch the
    shard to ordinary buffered writes, with the same bytes in the file.
    """

    def __init__(self, folder: Path, layout: ShardLayout, *, direct: bool | None = None) -> None:
        self.layout = layout
        self.path = folder / layout.filename
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise MergeIOError(f"{self.path}: cannot create ({e.strerror})") from None
        try:
            reserve(self._fd, layout.size)
        except OSError as e:
            os.close(self._fd)
            raise io_failure(f"{self.path}: cannot allocate {layout.size:,} bytes", e) from None
        self._written = 0
        self._expected = layout.size - len(layout.header)
        self._hash: hashlib._Hash | None = hashlib.sha256()
        self._hash_pos = 0
        self.sha256: str | None = None
        self._stage: _Staging | None = None
        self._direct = (
            DIRECT_WRITES if direct is None else direct
        ) and layout.size >= 2 * _Staging.ALIGN
        self._pwrite(torch.frombuffer(bytearray(layout.header), dtype=torch.uint8), 0)

    @property
    def complete(self) -> bool:
        """Every byte the layout promised has been written."""
        return self._written == self._expected

    def _staged(self, data: torch.Tensor, offset: int) -> bool:
        """Hand ``data`` to the direct-write buffer, if it continues it; False: write it buffered."""
        if self._stage is None and self._direct and offset == 0:
            fd = _open_direct(self.path)
            if fd is not None:
                self._stage = _Staging(
                    fd, min(STAGING_BYTES, _round_up(self.layout.size, _Staging.ALIGN))
                )
            self._direct = False
        if self._stage is None:
            return False
        if offset != self._stage.end:
            self._unstage()  # out of order: the rest goes through the page cache
            return False
        try:
            self._stage.add(data)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise io_failure(f"{self.path}: write failed", e) from None
            taken = self._stage.taken
            self._unstage()  # a direct write refused (alignment): the rest buffered
            self._buffered(
                byte_view(data)[taken:] if taken < data.numel() else memoryview(b""), offset + taken
            )
        return True

    def _unstage(self) -> None:
        st, self._stage = self._stage, None
        if st is None:
            return
        try:
            self._buffered(memoryview(st.buf)[: st.used], st.start)  # all staged bytes, buffered
        finally:
            st.close()

    def _buffered(self, mv: memoryview, offset: int) -> None:
        try:
            _pwrite_all(self._fd, mv, offset)
        except OSError as e:
            raise io_failure(f"{self.path}: write failed", e) from None

    def _pwrite(self, data: torch.Tensor, offset: int) -> None:
        mv = byte_view(data) if data.numel() else memoryview(b"")
        if self._hash is not None:
            if offset == self._hash_pos:
                self._hash.update(mv)
                self._hash_pos += len(mv)
            else:
                self._hash = None  # out of order: hash the file when it is finished
        if not self._staged(data, offset):
            self._buffered(mv, offset)

    def write(self, name: str, data: torch.Tensor, element_offset: int = 0) -> None:
        """Write ``data`` (contiguous, already in the output dtype) at element ``element_offset``."""
        data = data.contiguous()
        off = self.layout.offsets[name] + element_offset * data.element_size()
        self._pwrite(data.reshape(-1).view(torch.uint8), off)
        self._written += data.numel() * data.element_size()

    def close(self) -> str:
        """Close the shard and return its sha256.

        Raises:
            MergeIOError: fewer bytes were written than the layout promised, or closing failed.
        """
        if self._fd < 0:
            assert self.sha256 is not None
            return self.sha256
        if self._stage is not None:
            try:
                self._stage.flush(self._fd)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    self.abort()
                    raise io_failure(f"{self.path}: write failed", e) from None
                self._unstage()  # the direct write was refused: everything staged, buffered
            else:
                st, self._stage = self._stage, None
                st.close()
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as e:
            raise MergeIOError(f"{self.path}: close failed ({e.strerror})") from None
        if self._written != self._expected:
            raise MergeIOError(
                f"{self.path}: wrote {self._written} data bytes, the layout needs {self._expected}"
            )
        if self._hash is not None and self._hash_pos == self.layout.size:
            self.sha256 = self._hash.hexdigest()
        else:
            self.sha256 = sha256_file(self.path)
        return self.sha256

    def abort(self) -> None:
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Journal:
    """The record of finished shards in a resumable partial folder.

    One JSON object per line: first ``{"fingerprint": ...}`` (what run the folder belongs
    to), then ``{"file", "bytes", "sha256"}`` per finished shard, appended as each finishes.
    """

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.path = folder / JOURNAL_NAME
        self.fingerprint = fingerprint

    def verified(self, layouts: Sequence[ShardLayout]) -> dict[str, str]:
        """Shards recorded as finished whose file still has the recorded size and sha256.

        Returns:
            filename -> sha256 of every shard that can be skipped. A journal of another run
            (different fingerprint), a torn last line or a changed file count as not finished.
        """
        sizes = {s.filename: s.size for s in layouts}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return {}
        out: dict[str, str] = {}
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                break  # torn write at a kill: everything after it is unknown
            if not isinstance(rec, dict):
                break
            if i == 0:
                if rec.get("fingerprint") != self.fingerprint:
                    return {}
                continue
            name, size, sha = rec.get("file"), rec.get("bytes"), rec.get("sha256")
            if not isinstance(name, str) or sizes.get(name) != size or not isinstance(sha, str):
                continue
            f = self.path.parent / name
            try:
                if f.stat().st_size == size and sha256_file(f) == sha:
                    out[name] = sha
            except OSError:
                continue
        return out

    def start(self, keep: dict[str, str], layouts: Sequence[ShardLayout]) -> None:
        """Rewrite the journal with the fingerprint and the verified shards ``keep``."""
        sizes = {s.filename: s.size for s in layouts}
        lines = [json.dumps({"fingerprint": self.fingerprint})]
        lines += [json.dumps({"file": n, "bytes": sizes[n], "sha256": h}) for n, h in keep.items()]
        self._write("\n".join(lines) + "\n", "w")

    def record(self, layout: ShardLayout, sha256: str) -> None:
        """Append a finished shard."""
        self._write(
            json.dumps({"file": layout.filename, "bytes": layout.size, "sha256": sha256}) + "\n",
            "a",
        )

    def _write(self, text: str, mode: str) -> None:
        try:
            with open(self.path, mode, encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            raise MergeIOError(
                f"{self.path}: cannot write the resume journal ({e.strerror})"
            ) from None


def _lock(folder: Path, dest: Path) -> int:
    """Create and flock ``folder/.soupkit-lock`` (content: the destination it belongs to)."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(dest).encode("utf-8", "surrogateescape"), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _owner_gone(folder: Path, dest: Path) -> bool:
    """True when ``folder`` belongs to ``dest`` and no live run holds its lock."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR)
    except OSError:
        return False  # no lock file: not ours to judge (or just being created)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live run holds it
        owner = os.pread(fd, 1 << 16, 0).decode("utf-8", "surrogateescape")
        return owner == str(dest)
    finally:
        os.close(fd)


def work_tag(dest: Path) -> str:
    """How hidden work folders beside ``dest`` name it: its name, or for a name over 48 bytes a
    hash of it, so ``.soupkit-partial-<tag>-<random>`` stays within the file system's name limit
    for any legal ``dest`` (the lock file inside says which destination a folder belongs to)."""
    raw = os.fsencode(dest.name)
    return dest.name if len(raw) <= 48 else "h" + hashlib.sha256(raw).hexdigest()[:16]


def remove_stale(dest: Path, keep: Path | None = None) -> list[Path]:
    """Remove partial and trash folders of ``dest`` left by runs that were killed.

    Only folders whose lock file names ``dest`` and is not held by a live process are removed.

    Returns:
        The folders removed.
    """
    parent = dest.parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    absdest = dest.absolute()
    for prefix in (f".soupkit-partial-{work_tag(dest)}-", f".soupkit-old-{work_tag(dest)}-"):
        try:
            entries = [e for e in parent.iterdir() if e.name.startswith(prefix)]
        except OSError:
            return removed
        for d in entries:
            if keep is not None and d == keep:
                continue
            if d.is_dir() and not d.is_symlink() and _owner_gone(d, absdest):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def _check_name_length(dest: Path) -> None:
    """Refuse an output path the file system cannot hold (a name over NAME_MAX bytes)."""
    name_max = 255
    for probe in dest.absolute().parents:  # the nearest folder that exists says its limit
        try:
            name_max = os.pathconf(probe, "PC_NAME_MAX")
            break
        except (OSError, ValueError):
            continue
    for part in dest.absolute().parts[1:]:
        n = len(os.fsencode(part))
        if n > name_max:
            raise UsageError(
                f"{shown(dest)}: the name {shown(part, quote=True, limit=40)} is {n} bytes; "
                f"this file system allows at most {name_max} bytes per name\n"
                "hint: choose a shorter output name"
            )


class OutputFolder:
    """A destination folder that appears only when complete.

    Usage::

        with OutputFolder(dest, force=False) as tmp:
            ...write files into tmp...
        # dest now exists with everything; on an exception nothing is left behind.

    Args:
        dest: the destination folder.
        force: replace ``dest`` if it exists and is not empty.
        resume_key: make the partial folder resumable: its name is derived from this key
            (so a re-run finds it), and it is kept (not removed) when the run fails.

    Raises:
        OutputExistsError: ``dest`` exists and is not an empty folder, and ``force`` is false.
        UsageError: a name in ``dest`` is longer than the file system allows.
    """

    def __init__(
        self, dest: str | os.PathLike[str], *, force: bool = False, resume_key: str | None = None
    ) -> None:
        self.dest = Path(dest)
        self.force = force
        self.resume_key = resume_key
        self.tmp: Path | None = None
        self.resumed = False
        self.kept: Path | None = None
        self._lock_fd = -1
        self._swallowed = 0
        _check_name_length(self.dest)
        if self.dest.exists():
            if not self.dest.is_dir():
                raise OutputExistsError(
                    f"{self.dest}: exists and is not a folder\nhint: choose another output path"
                )
            if any(self.dest.iterdir()) and not force:
                raise OutputExistsError(
                    f"{self.dest}: output folder exists and is not empty\n"
                    "hint: pass --force (force=True) to replace it, or choose another folder"
                )

    @property
    def partial_path(self) -> Path | None:
        """Where a resumable run keeps its partial folder (None when not resumable)."""
        if self.resume_key is None:
            return None
        return self.dest.parent / f".soupkit-partial-{work_tag(self.dest)}-r{self.resume_key}"

    def __enter__(self) -> Path:
        _interrupts.install()
        self._swallowed = _interrupts.swallowed_count()
        parent = self.dest.parent
        with signals_deferred():
            try:
                parent.mkdir(parents=True, exist_ok=True)
                remove_stale(self.dest, keep=self.partial_path)
                if self.partial_path is not None:
                    self.tmp = self.partial_path
                    try:
                        os.mkdir(self.tmp, 0o700)
                    except FileExistsError:
                        if not self.tmp.is_dir() or self.tmp.is_symlink():
                            raise MergeIOError(
                                f"{self.tmp}: exists and is not a folder\n"
                                "hint: remove it and run again"
                            ) from None
                        self.resumed = True
                else:
                    self.tmp = Path(
                        tempfile.mkdtemp(
                            prefix=f".soupkit-partial-{work_tag(self.dest)}-", dir=parent
                        )
                    )
                try:
                    self._lock_fd = _lock(self.tmp, self.dest.absolute())
                except BlockingIOError:
                    raise MergeIOError(
                        f"{self.tmp}: another soupkit run is writing this output right now\n"
                        "hint: wait for it to finish, or choose another output folder"
                    ) from None
                # mkdtemp makes 0700; the finished folder should have the usual permissions.
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o777 & ~umask)
            except OSError as e:
                if self.tmp is not None and not self.resumed and self._lock_fd < 0:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                raise MergeIOError(f"{parent}: cannot create the output ({e.strerror})") from None
        return self.tmp

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.tmp is not None
        if et is None:  # an interrupt Python swallowed (in a __del__) still cancels the output
            try:
                _interrupts.raise_if_swallowed(self._swallowed)
            except KeyboardInterrupt as e:
                self.__exit__(type(e), e, None)
                raise
        with signals_deferred():
            if et is not None:
                if self.resume_key is not None:
                    self.kept = self.tmp  # the journal lets a re-run with resume continue
                else:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                self._unlock()
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.tmp / JOURNAL_NAME)
                if self.dest.exists():
                    trash = Path(
                        tempfile.mkdtemp(
                            prefix=f".soupkit-old-{work_tag(self.dest)}-", dir=self.dest.parent
                        )
                    )
                    trash_fd = _lock(trash, self.dest.absolute())
                    try:
                        os.rename(self.dest, trash / "old")
                        os.rename(self.tmp, self.dest)
                        shutil.rmtree(trash, ignore_errors=True)
                    finally:
                        os.close(trash_fd)
                else:
                    os.rename(self.tmp, self.dest)
                # The lock file travels with the rename so that a kill before this point leaves a
                # partial folder that the next run can recognise and remove.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dest / LOCK_NAME)
            except OSError as e:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise MergeIOError(
                    f"{self.dest}: could not move the finished output into place ({e.strerror})"
                ) from None
            finally:
                self._unlock()
