"""The shard writer's direct (``O_DIRECT``) path and its fallbacks, and disk reservation.

Every case writes the same tensors in chunks and compares the file byte for byte (and its
sha256) with what the plain buffered path writes.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toymodels import write_model

import soupkit
from soupkit.errors import MergeIOError
from soupkit.io import writer as writer_mod
from soupkit.io.writer import OutputTensor, ShardWriter, layout_shards

ALIGN = writer_mod._Staging.ALIGN


def _tensors(sizes: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(sizes))
    return {f"t{i}": torch.randn(n, generator=g).to(torch.bfloat16) for i, n in enumerate(sizes)}


def _write(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    *,
    direct: bool | None,
    chunk: int,
    order: list[str] | None = None,
) -> tuple[bytes, str]:
    folder.mkdir(parents=True, exist_ok=True)
    layout = layout_shards(
        [OutputTensor(k, "BF16", tuple(v.shape)) for k, v in tensors.items()], 10**12
    )[0]
    w = ShardWriter(folder, layout, direct=direct)
    for name in order or list(tensors):
        t = tensors[name]
        for a in range(0, t.numel(), chunk):
            w.write(name, t[a : a + chunk], a)
    sha = w.close()
    raw = (folder / layout.filename).read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest()
    return raw, sha


@pytest.fixture
def small_staging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 2-block staging buffer, so that small shards fill it many times."""
    monkeypatch.setattr(writer_mod, "STAGING_BYTES", 2 * ALIGN)
    yield


def _direct_supported(folder: Path) -> bool:
    fd = writer_mod._open_direct(_touch(folder / "probe"))
    if fd is None:
        return False
    os.close(fd)
    return True


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=5), chunk=st.integers(1, 5000))
def test_direct_writes_give_the_buffered_bytes(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], chunk: int
) -> None:
    old = writer_mod.STAGING_BYTES
    writer_mod.STAGING_BYTES = 2 * ALIGN
    try:
        root = tmp_path_factory.mktemp("direct")
        tensors = _tensors(sizes)
        assert _write(root / "d", tensors, direct=True, chunk=chunk) == _write(
            root / "b", tensors, direct=False, chunk=chunk
        )
    finally:
        writer_mod.STAGING_BYTES = old


def test_direct_path_is_taken_and_writes_aligned_blocks(
    tmp_path: Path, small_staging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    direct_writes: list[tuple[int, int]] = []
    real = writer_mod._Staging._write

    def spy(self: Any, n: int) -> None:
        direct_writes.append((self.start, n))
        real(self, n)

    monkeypatch.setattr(writer_mod._Staging, "_write", spy)
    tensors = _tensors([5000, 7000, 3])
    raw, _ = _write(tmp_path / "d", tensors, direct=True, chunk=999)
    assert raw == _write(tmp_path / "b", tensors, direct=False, chunk=999)[0]
    assert len(direct_writes) >= len(raw) // (2 * ALIGN)
    assert all(off % ALIGN == 0 and n % ALIGN == 0 for off, n in direct_writes)


def test_out_of_order_write_switches_to_buffered(tmp_path: Path, small_staging: None) -> None:
    tensors = _tensors([6000, 6000, 6000])
    order = ["t0", "t2", "t1"]  # t2 arrives before t1: staged bytes go out buffered, then all
    assert _write(tmp_path / "d", tensors, direct=True, chunk=1000, order=order) == _write(
        tmp_path / "b", tensors, direct=False, chunk=1000
    )


def test_refused_direct_write_falls_back_without_losing_bytes(
    tmp_path: Path, small_staging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that opens with O_DIRECT but refuses the write (EINVAL, e.g. a larger
    alignment): the buffer and the rest of the chunk that did not fit go out buffered."""
    calls = {"n": 0}
    real = writer_mod._Staging._write

    def refuse_second(self: Any, n: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(self, n)

    monkeypatch.setattr(writer_mod._Staging, "_write", refuse_second)
    monkeypatch.setattr(writer_mod, "_open_direct", lambda path: os.open(path, os.O_WRONLY))
    tensors = _tensors([9000, 4000])
    assert _write(tmp_path / "d", tensors, direct=True, chunk=3000) == _write(
        tmp_path / "b", tensors, direct=False, chunk=3000
    )
    assert calls["n"] == 2  # direct writing stopped after the refusal


def test_direct_write_error_is_a_clear_error(
    tmp_path: Path, small_staging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Any, n: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod._Staging, "_write", full)
    monkeypatch.setattr(writer_mod, "_open_direct", lambda path: os.open(path, os.O_WRONLY))
    with pytest.raises(
        MergeIOError,
        match=r"model.safetensors: write failed \(No space left on device\)\n"
        r"hint: the disk is full",
    ):
        _write(tmp_path / "d", _tensors([9000]), direct=True, chunk=9000)


def test_environment_turns_direct_writes_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(writer_mod, "DIRECT_WRITES", False)
    opened: list[Path] = []
    monkeypatch.setattr(writer_mod, "_open_direct", lambda path: opened.append(path))
    _write(tmp_path, _tensors([9000]), direct=None, chunk=1000)
    assert opened == []


def test_disk_full_at_reservation_fails_before_merging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output's space is reserved when its shard is created: a full disk fails there,
    with the size, before any tensor is computed, and leaves nothing behind."""
    ms = [write_model(tmp_path / f"m{i}", {"w": torch.full((64, 64), float(i))}) for i in range(2)]

    def reserve(fd: int, size: int) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_mod, "reserve", reserve)
    computed = {"n": 0}
    real = soupkit.engine.execute._Engine._merge

    def merge(self: Any, *a: Any) -> None:
        computed["n"] += 1
        real(self, *a)

    monkeypatch.setattr(soupkit.engine.execute._Engine, "_merge", merge)
    recipe = {"merge_method": "linear", "models": [{"model": str(m)} for m in ms]}
    with pytest.raises(
        MergeIOError,
        match=r"cannot allocate 16,\d+ bytes \(No space left on device\)\n"
        r"hint: the disk is full",
    ):
        soupkit.merge(recipe, tmp_path / "out")
    assert computed["n"] == 0
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".soupkit-partial")] == []


def test_reserve_allocates_the_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT)
    try:
        done = writer_mod.reserve(fd, 1 << 20)
    finally:
        os.close(fd)
    if not done:
        pytest.skip("this filesystem has no fallocate")
    assert p.stat().st_size == 1 << 20 and p.stat().st_blocks * 512 >= 1 << 20


def test_direct_write_refused_at_close_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard smaller than the buffer meets its first direct write only when it is closed."""
    calls = {"n": 0}

    def refuse(self: Any, n: int) -> None:
        calls["n"] += 1
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer_mod._Staging, "_write", refuse)
    monkeypatch.setattr(writer_mod, "_open_direct", lambda path: os.open(path, os.O_WRONLY))
    tensors = _tensors([5000])
    raw, _ = _write(tmp_path / "d", tensors, direct=True, chunk=700)
    assert raw == _write(tmp_path / "b", tensors, direct=False, chunk=700)[0]
    assert len(raw) % ALIGN and calls["n"] == 1


@pytest.mark.parametrize(
    "value, direct", [("0", False), ("off", False), ("false", False), ("1", True), ("", True)]
)
def test_soupkit_direct_writes_variable_is_read_at_import(value: str, direct: bool) -> None:
    import subprocess
    import sys

    env = {**os.environ, "SOUPKIT_DIRECT_WRITES": value}
    r = subprocess.run(
        [sys.executable, "-c", "from soupkit.io import writer; print(writer.DIRECT_WRITES)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(direct)
