"""The input hashing follows the run's reads (`ReadMarks`): it reads no byte of a tensor before
the run has read it, so on a cold page cache the disk serves one stream; once the run is over
it reads what the run skipped; and every digest is hashlib's."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from toymodels import write_model

import soupkit
from soupkit.io import digest as hashing
from soupkit.io.digest import BackgroundHasher, ReadMarks


def _covered(reads: list[tuple[int, int]], pos: int) -> int:
    """Brute force: where the bytes read from ``pos`` on without a gap end."""
    hit = set()
    for a, b in reads:
        hit.update(range(a, b))
    while pos in hit:
        pos += 1
    return pos


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 12)), max_size=12),
    st.integers(0, 75),
)
def test_reach_is_the_end_of_the_gapless_run_read(spans: list[tuple[int, int]], pos: int) -> None:
    """Overlapping, touching, nested and out-of-order reads: `reach` agrees with brute force."""
    marks = ReadMarks()
    path = Path("f")
    reads = [(a, a + n) for a, n in spans]
    for a, b in reads:
        marks.add(path, a, b)
    assert marks.reach(path, pos) == _covered(reads, pos)
    assert marks.reach(Path("other"), pos) == pos
    marks.finish()
    assert marks.reach(path, pos) is None


def _safetensors(path: Path, tensors: int, elems: int) -> tuple[int, int]:
    """A file of ``tensors`` float32 tensors; its (header end, size)."""
    g = torch.Generator().manual_seed(tensors)
    save_file({f"t{i:02d}": torch.rand(elems, generator=g) for i in range(tensors)}, str(path))
    head = path.read_bytes()[:8]
    return 8 + int.from_bytes(head, "little"), path.stat().st_size


class _ReadSpy:
    """Records every byte range the hasher reads, and which of them the run had not read."""

    def __init__(self, marks: ReadMarks, monkeypatch: pytest.MonkeyPatch) -> None:
        self.marks = marks
        self.ahead: list[tuple[int, int]] = []
        self.reads: list[tuple[int, int]] = []
        self.headers: dict[int, int] = {}  # fd -> header end
        real = os.preadv

        def preadv(fd: int, bufs: list[Any], offset: int, *a: Any) -> int:
            n = real(fd, bufs, offset, *a)
            free = self.headers.get(fd, 0)
            with marks.changed:
                reach = marks.reach(Path(os.readlink(f"/proc/self/fd/{fd}")), max(offset, free))
                if reach is not None and offset + n > max(reach, free):
                    self.ahead.append((offset, offset + n))
                self.reads.append((offset, offset + n))
            return n

        real_start = BackgroundHasher._start

        def start(hasher: BackgroundHasher, f: Any) -> None:
            real_start(hasher, f)
            if f.fd is not None:
                self.headers[f.fd] = f.free

        monkeypatch.setattr(hashing.os, "preadv", preadv)
        monkeypatch.setattr(BackgroundHasher, "_start", start)


def _wait_until(cond: Any, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_hashing_reads_no_tensor_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """The run reads the files' tensors in an order of its own, in pieces; the hasher reads only
    headers and bytes already read, and still hashes each file whole."""
    monkeypatch.setattr(hashing, "BLOCK", 4096)  # small blocks: many hashing steps
    files = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    layout = [_safetensors(f, 6 + i, 3000 + 500 * i) for i, f in enumerate(files)]
    marks = ReadMarks()
    spy = _ReadSpy(marks, monkeypatch)
    hasher = BackgroundHasher([f.resolve() for f in files], None, threads=threads, marks=marks)
    # the headers, and nothing more, are hashed before the run reads anything
    _wait_until(lambda: len(spy.headers) == len(files))
    time.sleep(0.2)
    assert spy.ahead == [] and sum(b - a for a, b in spy.reads) <= sum(h for h, _ in layout)
    # the run reads pieces of 1000 bytes: in file order, in a shuffled order, back half first
    g = torch.Generator().manual_seed(0)
    for k, (f, (head, size)) in enumerate(zip(files, layout)):
        cuts = list(range(head, size, 1000))
        order = [
            cuts,
            [cuts[i] for i in torch.randperm(len(cuts), generator=g).tolist()],
            cuts[len(cuts) // 2 :] + cuts[: len(cuts) // 2],
        ][k]
        for a in order:
            marks.add(f.resolve(), a, min(a + 1000, size))
    digests = hasher.result()
    assert spy.ahead == []
    assert digests == {f.resolve(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_what_the_run_skipped_is_hashed_after_it(tmp_path: Path) -> None:
    """A run that reads part of a file (a resumed merge skips finished shards): `result` lets
    the hashing read the rest itself."""
    f = tmp_path / "m.safetensors"
    head, size = _safetensors(f, 4, 5000)
    marks = ReadMarks()
    hasher = BackgroundHasher([f], None, marks=marks)
    marks.add(f, head, head + (size - head) // 3)
    assert hasher.result() == {f: hashlib.sha256(f.read_bytes()).hexdigest()}


def test_hashing_waiting_for_the_run_stops_when_cancelled(tmp_path: Path) -> None:
    f = tmp_path / "m.safetensors"
    _safetensors(f, 4, 5000)
    marks = ReadMarks()
    hasher = BackgroundHasher([f], None, threads=2, marks=marks)
    time.sleep(0.2)  # the threads wait for the run
    t0 = time.monotonic()
    hasher.cancel()
    assert time.monotonic() - t0 < 4.0
    assert not any(t.is_alive() for t in hasher._threads)


def test_a_missing_file_is_reported_when_following(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    _safetensors(good, 2, 100)
    hasher = BackgroundHasher([good, tmp_path / "missing.safetensors"], None, marks=ReadMarks())
    with pytest.raises(soupkit.errors.CheckpointFormatError, match="hashing the inputs failed"):
        hasher.result()


@pytest.mark.parametrize("many", [False, True])
def test_merges_report_every_byte_they_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, many: bool
) -> None:
    """`merge` and `merge_many` give their reader the hashing's marks: by the end of the run
    every tensor byte of every input was reported read, so no hashing read came first."""
    monkeypatch.setenv("SOUPKIT_HASH_CACHE", "0")
    ms = [
        write_model(tmp_path / f"m{i}", {"a": torch.full((64, 32), float(i)), "b": torch.ones(7)})
        for i in range(3)
    ]
    seen: list[dict[Path, int | None]] = []
    real_finish = ReadMarks.finish

    def finish(marks: ReadMarks) -> None:
        files = [m.resolve() / "model.safetensors" for m in ms]
        seen.append(
            {f: marks.reach(f, 8 + int.from_bytes(f.read_bytes()[:8], "little")) for f in files}
        )
        real_finish(marks)

    monkeypatch.setattr(ReadMarks, "finish", finish)
    recipe = {"merge_method": "linear", "models": [{"model": str(m)} for m in ms]}
    if many:
        p = soupkit.plan(recipe)
        soupkit.merge_many([p, p], [tmp_path / "o1", tmp_path / "o2"], progress=False)
    else:
        soupkit.merge(recipe, tmp_path / "out", progress=False)
    assert len(seen) == 1
    assert seen[0] == {f: f.stat().st_size for f in seen[0]}


def test_marks_are_safe_to_add_from_many_threads() -> None:
    marks = ReadMarks()
    path = Path("f")

    def add(k: int) -> None:
        for i in range(k, 4000, 4):
            marks.add(path, 10 * i, 10 * i + 10)

    ts = [threading.Thread(target=add, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert marks.reach(path, 0) == 40000
    assert marks._spans[path] == [(0, 40000)]
