"""Read safetensors headers (and only headers), treating every file as hostile.

Format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian header
length N, N bytes of UTF-8 JSON, then the data buffer. The JSON maps tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the buffer) plus an
optional ``__metadata__`` of string to string. The buffer must be covered exactly: no holes,
no overlaps, nothing after the last tensor.

Everything is checked before a single tensor byte is read, and every failure is a
`CheckpointFormatError` naming the file, the tensor and what was seen versus expected.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointFormatError, shown

__all__ = [
    "DTYPES",
    "FLOAT_DTYPES",
    "FileStamp",
    "MAX_HEADER_BYTES",
    "SafetensorsHeader",
    "TensorInfo",
    "changed_message",
    "dtype_code",
    "file_stamp",
    "open_regular",
    "read_safetensors_header",
]

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_CODE_OF = {td: code for code, (td, _) in DTYPES.items()}

# The reference implementation refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100_000_000
# torch sizes and byte counts are signed 64-bit: a dimension or a tensor beyond this cannot exist.
MAX_INT64 = (1 << 63) - 1


FileStamp = tuple[int, int, int, int, int]


def file_stamp(st: os.stat_result) -> FileStamp:
    """A file's identity: (device, inode, size, mtime_ns, ctime_ns).

    Any rewrite changes it, even to the same size within the same second (the ctime moves even
    when a writer puts the mtime back); a file replaced by another one changes the inode.
    """
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def changed_message(f: Path, before: FileStamp, now: FileStamp, when: str) -> str:
    """The error for an input whose identity moved from ``before`` to ``now``."""
    what = (
        f"size {before[2]} -> {now[2]}"
        if before[2] != now[2]
        else "replaced by another file"
        if before[:2] != now[:2]
        else "rewritten, same size"
    )
    return (
        f"{shown(f)}: the input file changed {when} ({what})\nhint: another program wrote "
        "it; wait until it is done, then plan and merge again"
    )


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _CODE_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from a header alone.

    Attributes:
        name: tensor name.
        dtype: safetensors dtype code (``"BF16"``, ``"F32"``, ...).
        shape: the tensor's shape.
        file: the file holding it (None for an in-memory tensor).
        start: absolute byte offset of its first byte in ``file``.
        end: absolute byte offset one past its last byte.
        data: the tensor itself when it lives in memory (API inputs); never for files.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path | None
    start: int
    end: int
    data: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated safetensors header.

    Attributes:
        path: the file.
        tensors: name -> `TensorInfo`, in the order of their data offsets.
        metadata: the ``__metadata__`` strings (empty if absent).
        data_start: absolute offset of the data buffer.
        file_size: size of the file in bytes.
        stamp: the file's identity when the header was read (`file_stamp`); a run checks it
            when it opens the file, so bytes written after planning are never merged.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    stamp: FileStamp = (0, 0, 0, 0, 0)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


class _DuplicateKey(Exception):
    pass


class _BadConstant(Exception):
    pass


def _no_constants(token: str) -> Any:
    # Python's json accepts NaN / Infinity / -Infinity, which are not JSON; the reference
    # parser (serde_json) rejects them, and so do we.
    raise _BadConstant(token)


def _utf8_ok(s: str) -> bool:
    # A JSON escape like "\ud800" decodes to a lone surrogate, which no UTF-8 file can hold:
    # such a name would break every writer downstream, so it is refused here.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def open_regular(path: Path) -> int:
    """Open ``path`` read-only and make sure it is a regular file (never blocks on a FIFO).

    Returns:
        The file descriptor (blocking mode restored).

    Raises:
        OSError: the file cannot be opened.
        CheckpointFormatError: it is a FIFO, a device, a socket or a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(st.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "a device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket"
                if stat.S_ISSOCK(st.st_mode)
                else "not a regular file"
            )
            raise _fail(path, f"is {kind}, expected a regular .safetensors file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fail(path: Path, what: str, hint: str = "") -> CheckpointFormatError:
    msg = f"{shown(path)}: {what}"
    if hint:
        msg += f"\nhint: {hint}"
    return CheckpointFormatError(msg)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # A header of hundreds of thousands of entries creates millions of small acyclic objects;
    # the cyclic collector would rescan them again and again (2-3x the parse time) for nothing.
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without reading tensor data.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The validated `SafetensorsHeader`.

    Raises:
        CheckpointFormatError: the file is missing, truncated or its header is malformed,
            inconsistent or hostile; the message names the file and the tensor.
    """
    with _gc_paused():
        return _read_header(path)


def _read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    p = Path(path)
    try:
        with open(open_regular(p), "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            if size < 8:
                raise _fail(
                    p,
                    f"file is {size} bytes, too short to be safetensors (needs >= 8)",
                    "the file is truncated or not a safetensors file",
                )
            (n,) = struct.unpack("<Q", f.read(8))
            # A header starts with "{". Any other file (text, an image, /etc/passwd through a
            # symlink) has a "length" that is just its first bytes: never echoed as if meaningful.
            if n > MAX_HEADER_BYTES or (8 + n > size and f.read(1) != b"{"):
                raise _fail(
                    p,
                    f"not a safetensors file: the first 8 bytes are not a plausible "
                    f"header length (file is {size} bytes)",
                    f"a safetensors file starts with the length of its JSON header (at "
                    f"most {MAX_HEADER_BYTES} bytes, within the file), then the header",
                )
            if 8 + n > size:
                raise _fail(
                    p,
                    f"header length field says {n} bytes but the file has only {size - 8} after it",
                    "the file is truncated",
                )
            f.seek(8)
            raw = f.read(n)
    except FileNotFoundError:
        raise _fail(p, "no such file") from None
    except IsADirectoryError:
        raise _fail(p, "is a directory, expected a .safetensors file") from None
    except PermissionError:
        raise _fail(p, "permission denied") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise _fail(p, f"cannot read ({getattr(e, 'strerror', None) or e})") from None
    if len(raw) != n:
        raise _fail(
            p, f"read {len(raw)} header bytes, expected {n}", "the file changed or is truncated"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(
            p, f"header is not valid UTF-8 (byte {e.start})", "not a safetensors file"
        ) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except _DuplicateKey as e:
        raise _fail(
            p,
            f"header names key {shown(e.args[0], quote=True)} twice in one object",
            "a valid file names each tensor (and each field) once",
        ) from None
    except _BadConstant as e:
        raise _fail(
            p,
            f"header is not valid JSON (it holds the token {e.args[0]}, which JSON does not allow)",
            "the file is corrupt or hostile",
        ) from None
    except RecursionError:
        raise _fail(
            p,
            "header is not valid JSON (nested too deeply)",
            "a safetensors header is a flat object; the file is corrupt or hostile",
        ) from None
    except ValueError as e:  # JSONDecodeError, or an integer with thousands of digits
        raise _fail(p, f"header is not valid JSON ({e})", "not a safetensors file") from None
    if not isinstance(obj, dict):
        raise _fail(p, f"header is a JSON {type(obj).__name__}, expected an object")

    data_start = 8 + n
    buffer_size = size - data_start
    metadata: dict[str, str] = {}
    raw_meta = obj.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise _fail(
                p,
                f"__metadata__ is a JSON {type(raw_meta).__name__}, expected an object "
                "of strings to strings",
            )
        for k, v in raw_meta.items():
            if not isinstance(v, str):
                raise _fail(
                    p,
                    f"__metadata__[{shown(k, quote=True)}] is a JSON {type(v).__name__}, expected a string",
                    "safetensors metadata maps strings to strings",
                )
            if not (_utf8_ok(k) and _utf8_ok(v)):
                raise _fail(
                    p,
                    f"__metadata__ key {shown(k, quote=True)} or its value is not valid Unicode "
                    "(a lone surrogate escape)",
                )
        metadata = raw_meta

    if "\\u" in text and not _utf8_ok("".join(obj)):
        bad = next(n for n in obj if not _utf8_ok(n))
        raise _fail(
            p,
            f"tensor name {shown(bad, quote=True)} is not valid Unicode (a lone surrogate escape)",
            "the file is corrupt or hostile",
        )
    entries: list[TensorInfo] = []
    keyset = {"dtype", "shape", "data_offsets"}
    # `type(x) is int` (not isinstance) also refuses booleans; kept tight: headers of hundreds
    # of thousands of entries must parse in seconds.
    for name, ent in obj.items():
        if type(ent) is not dict:
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: entry is a {type(ent).__name__}, expected an object",
            )
        if ent.keys() != keyset:
            keys = set(ent)
            extra = sorted(keys - keyset)
            missing = sorted(keyset - keys)
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: keys {sorted(keys)}; missing {missing}, unexpected {extra}",
            )
        dt, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
        known = DTYPES.get(dt) if type(dt) is str else None
        if known is None:
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: unknown dtype {dt!r}",
                f"known dtypes: {', '.join(DTYPES)}",
            )
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: shape {shape!r} is not a list of non-negative integers",
            )
        if len(shape) > 64:
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: {len(shape)} dimensions, at most 64 are supported",
            )
        itemsize = known[1]
        expected = math.prod(shape) * itemsize
        if expected > MAX_INT64 or (
            expected == 0
            and (
                any(d > MAX_INT64 for d in shape)
                or math.prod(d for d in shape if d) * itemsize > MAX_INT64
            )
        ):
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: shape {shape} is too large (a dimension or the byte "
                "count exceeds 2^63 - 1)",
                "the file is corrupt or hostile",
            )
        if (
            type(offs) is not list
            or len(offs) != 2
            or type(offs[0]) is not int
            or type(offs[1]) is not int
        ):
            raise _fail(
                p, f"tensor {shown(name, quote=True)}: data_offsets {offs!r} is not [begin, end]"
            )
        begin, end = offs
        if not 0 <= begin <= end <= buffer_size:
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: data_offsets [{begin}, {end}] outside the data "
                f"buffer of {buffer_size} bytes",
                "the file is truncated or corrupt",
            )
        if end - begin != expected:
            raise _fail(
                p,
                f"tensor {shown(name, quote=True)}: holds {end - begin} bytes but dtype {dt} x shape "
                f"{shape} needs {expected}",
            )
        entries.append(TensorInfo(name, dt, tuple(shape), p, data_start + begin, data_start + end))

    entries.sort(key=lambda t: (t.start, t.end))
    cursor, prev = data_start, ""
    for t in entries:
        if t.start < cursor:
            raise _fail(
                p,
                f"tensor {shown(t.name, quote=True)} overlaps tensor {shown(prev, quote=True)} in the data buffer",
            )
        if t.start > cursor:
            raise _fail(
                p,
                f"data buffer has a hole of {t.start - cursor} bytes before tensor "
                f"{shown(t.name, quote=True)}",
                "a valid file covers its buffer exactly",
            )
        cursor, prev = t.end, t.name
    if cursor != size:
        raise _fail(
            p,
            f"{size - cursor} bytes after the last tensor are not described by the header",
            "the file is corrupt or was appended to",
        )
    return SafetensorsHeader(
        p, {t.name: t for t in entries}, metadata, data_start, size, file_stamp(st)
    )
