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
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch

from soupkit.errors import MergeIOError, OutputExistsError
from soupkit.io.header import DTYPES
from soupkit.io.reader import byte_view

__all__ = [
    "OutputFolder",
    "OutputTensor",
    "ShardLayout",
    "ShardWriter",
    "layout_shards",
    "parse_size",
    "write_index",
]

INDEX_NAME = "model.safetensors.index.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


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


def _header_bytes(tensors: Sequence[OutputTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    obj: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    rel: dict[str, int] = {}
    pos = 0
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
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
        out.append(ShardLayout(name, header, offsets, tuple(g), len(header) + sum(t.nbytes for t in g)))
    return out


def write_index(folder: Path, shards: Sequence[ShardLayout]) -> None:
    """Write ``model.safetensors.index.json`` (only for more than one shard)."""
    if len(shards) < 2:
        return
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total = sum(t.nbytes for s in shards for t in s.tensors)
    body = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


class ShardWriter:
    """Writes one shard: the header first, then tensor bytes at their precomputed offsets."""

    def __init__(self, folder: Path, layout: ShardLayout) -> None:
        self.layout = layout
        self.path = folder / layout.filename
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._written = 0
        self._expected = layout.size - len(layout.header)
        self._pwrite(layout.header, 0)

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            try:
                done += os.pwrite(self._fd, mv[done:], offset + done)
            except OSError as e:
                raise MergeIOError(
                    f"{self.path}: write failed ({e.strerror})"
                    + ("\nhint: the disk is full; free space or choose another output folder"
                       if e.errno == 28 else "")
                ) from None

    def write(self, name: str, data: torch.Tensor, element_offset: int = 0) -> None:
        """Write ``data`` (contiguous, already in the output dtype) at element ``element_offset``."""
        data = data.contiguous()
        off = self.layout.offsets[name] + element_offset * data.element_size()
        self._pwrite(byte_view(data), off)
        self._written += data.numel() * data.element_size()

    def close(self) -> None:
        """Flush and close; raises if fewer bytes were written than the layout promised."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.close(fd)
        except OSError as e:
            raise MergeIOError(f"{self.path}: close failed ({e.strerror})") from None
        if self._written != self._expected:
            raise MergeIOError(
                f"{self.path}: wrote {self._written} data bytes, the layout needs {self._expected}"
            )

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OutputFolder:
    """A destination folder that appears only when complete.

    Usage::

        with OutputFolder(dest, force=False) as tmp:
            ...write files into tmp...
        # dest now exists with everything; on an exception nothing is left behind.

    Raises:
        OutputExistsError: ``dest`` exists and is not an empty folder, and ``force`` is false.
    """

    def __init__(self, dest: str | os.PathLike[str], *, force: bool = False) -> None:
        self.dest = Path(dest)
        self.force = force
        self.tmp: Path | None = None
        if self.dest.exists():
            if not self.dest.is_dir():
                raise OutputExistsError(f"{self.dest}: exists and is not a folder\nhint: choose another output path")
            if any(self.dest.iterdir()) and not force:
                raise OutputExistsError(
                    f"{self.dest}: output folder exists and is not empty\n"
                    "hint: pass --force (force=True) to replace it, or choose another folder"
                )

    def __enter__(self) -> Path:
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".soupkit-partial-{self.dest.name}-", dir=parent))
            # mkdtemp makes 0700; the finished folder should have the usual permissions.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)
        except OSError as e:
            raise MergeIOError(f"{parent}: cannot create the output ({e.strerror})") from None
        return self.tmp

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self.tmp is not None
        if et is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.dest.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".soupkit-old-{self.dest.name}-", dir=self.dest.parent))
                os.rename(self.dest, trash / "old")
                os.rename(self.tmp, self.dest)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.tmp, self.dest)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise MergeIOError(f"{self.dest}: could not move the finished output into place ({e.strerror})") from None
