"""Read tensor bytes: ``os.preadv`` straight into torch memory, one range at a time.

No memory map and no page-faulted fresh tensors: a read lands in a caller-owned buffer, so the
engine can reuse buffers across chunks and memory stays bounded by what it asks for.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from soupkit.errors import CheckpointFormatError, shown
from soupkit.io.header import FileStamp, TensorInfo, changed_message, file_stamp, open_regular

__all__ = ["TensorReader", "byte_view"]

_WILLNEED: int | None = getattr(os, "POSIX_FADV_WILLNEED", None)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes (zero copy, no numpy)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("byte_view needs a contiguous CPU tensor")
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class TensorReader:
    """Reads element ranges of tensors from files (or from in-memory tensors).

    File descriptors are opened once per file and kept until `close`. Use as a context manager.

    Args:
        expected: file -> its identity when its header was read (`Checkpoint.stamps`); a file
            whose open descriptor no longer matches is refused, so bytes written after
            planning are never read as if the header described them.
    """

    def __init__(self, expected: Mapping[Path, FileStamp] | None = None) -> None:
        self._expected = dict(expected or {})
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # several threads read: one descriptor per file

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    # never a FIFO or device swapped in after the header was read: those would block
                    fd = open_regular(path)
                except OSError as e:
                    hint = (
                        "\nhint: a merge keeps every input file open; raise the limit of open "
                        "files (`ulimit -n`) above the number of input files"
                        if e.errno == errno.EMFILE
                        else ""
                    )
                    raise CheckpointFormatError(
                        f"{shown(path)}: cannot open ({e.strerror}){hint}"
                    ) from None
                want = self._expected.get(path)
                if want is not None and (now := file_stamp(os.fstat(fd))) != want:
                    os.close(fd)
                    raise CheckpointFormatError(
                        changed_message(path, want, now, "after its header was read")
                    )
                self._fds[path] = fd
            return fd

    def advise(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> None:
        """Ask the kernel to start reading elements ``[start, stop)`` of ``info`` into the page
        cache now (``posix_fadvise(WILLNEED)``), for a later `read` on another thread.

        Only a hint: it reads nothing into the process and fails silently where the platform
        or the file system has no such call. On a warm cache it costs a lookup of the pages.
        """
        if info.data is not None or _WILLNEED is None:
            return
        stop = info.numel if stop is None else stop
        nbytes = (stop - start) * info.itemsize
        if nbytes <= 0:
            return
        assert info.file is not None
        try:
            os.posix_fadvise(
                self._fd(info.file), info.start + start * info.itemsize, nbytes, _WILLNEED
            )
        except OSError:
            return

    def read(
        self,
        info: TensorInfo,
        start: int = 0,
        stop: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Read elements ``[start, stop)`` of the flattened tensor, in its stored dtype.

        Args:
            info: the tensor.
            start: first element.
            stop: one past the last element (default: the end).
            out: optional 1-D uint8 buffer of at least the needed bytes to read into; the
                returned tensor is then a view of it (valid until the buffer is reused).

        Returns:
            A 1-D tensor of ``stop - start`` elements of dtype ``info.torch_dtype``.
        """
        stop = info.numel if stop is None else stop
        count = stop - start
        if info.data is not None:
            return info.data.reshape(-1)[start:stop]
        nbytes = count * info.itemsize
        if out is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        else:
            buf = out[:nbytes]
        if nbytes:
            assert info.file is not None
            fd = self._fd(info.file)
            mv = byte_view(buf)
            offset = info.start + start * info.itemsize
            done = 0
            while done < nbytes:
                try:
                    n = os.preadv(fd, [mv[done:]], offset + done)
                except OSError as e:
                    raise CheckpointFormatError(
                        f"{shown(info.file)}: reading tensor {shown(info.name, quote=True)} failed ({e.strerror})"
                    ) from None
                if n == 0:
                    raise CheckpointFormatError(
                        f"{shown(info.file)}: tensor {shown(info.name, quote=True)} ends at byte {info.end} but the file "
                        f"ended at {offset + done}\nhint: the file was truncated or changed "
                        "while soupkit was reading it"
                    )
                done += n
        return buf.view(info.torch_dtype)
