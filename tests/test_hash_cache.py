"""The cache of input digests: a re-merge of unchanged inputs hashes nothing, any rewrite of an
input (even with its size and modification time restored) is hashed again, and a missing,
damaged or unwritable cache never fails a merge."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from toymodels import write_model

import soupkit
from soupkit.io import digest as hashing
from soupkit.io.digest import HashCache


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("SOUPKIT_CACHE_DIR", str(d))
    monkeypatch.delenv("SOUPKIT_HASH_CACHE", raising=False)
    return d


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the files the hasher reads (one sha256 object per file hashed)."""
    made: list[int] = []
    real = hashlib.sha256

    class Spy:
        @staticmethod
        def sha256(*a: Any) -> Any:
            made.append(1)
            return real(*a)

    monkeypatch.setattr(hashing, "hashlib", Spy)
    return made


def _inputs(tmp_path: Path) -> list[Path]:
    return [
        write_model(tmp_path / f"m{i}", {"w": torch.full((32, 32), float(i))}) for i in range(2)
    ]


def _merge(ms: list[Path], out: Path) -> dict[str, str]:
    return {p: sha for p, (sha, _) in _merge_report(ms, out).items()}


def _merge_report(ms: list[Path], out: Path) -> dict[str, tuple[str, bool]]:
    """path -> (sha256, whether the report says it came from the cache)"""
    soupkit.merge(
        {"merge_method": "linear", "models": [{"model": str(m)} for m in ms]},
        out,
        progress=False,
        force=True,
    )
    rep = json.loads((out / "soupkit-report.json").read_text())
    return {
        f["path"]: (f["sha256"], f.get("sha256_from_cache", False))
        for m in rep["inputs"]["models"]
        for f in m["files"]
    }


def _truth(ms: list[Path]) -> dict[str, str]:
    return {
        str(m / "model.safetensors"): hashlib.sha256(
            (m / "model.safetensors").read_bytes()
        ).hexdigest()
        for m in ms
    }


def test_second_merge_of_the_same_inputs_hashes_nothing(
    tmp_path: Path, cache_dir: Path, hashed: list[int]
) -> None:
    ms = _inputs(tmp_path)
    truth = _truth(ms)
    assert _merge_report(ms, tmp_path / "a") == {p: (h, False) for p, h in truth.items()}
    assert len(hashed) == 2
    assert (cache_dir / HashCache.NAME).is_file()
    # the report says which digests were remembered rather than computed
    assert _merge_report(ms, tmp_path / "b") == {p: (h, True) for p, h in truth.items()}
    assert len(hashed) == 2  # nothing new


def test_rewritten_input_is_hashed_again_even_with_its_stat_restored(
    tmp_path: Path, cache_dir: Path, hashed: list[int]
) -> None:
    ms = _inputs(tmp_path)
    _merge(ms, tmp_path / "a")
    f = ms[1] / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # same size, other bytes
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the modification time as it was
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert _merge(ms, tmp_path / "b") == _truth(ms)
    assert len(hashed) == 3  # only the rewritten file


def test_cache_can_be_turned_off(
    tmp_path: Path, cache_dir: Path, hashed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOUPKIT_HASH_CACHE", "0")
    ms = _inputs(tmp_path)
    _merge(ms, tmp_path / "a")
    _merge(ms, tmp_path / "b")
    assert len(hashed) == 4 and not cache_dir.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"version": 1, "sha256": []}',
        b'{"version": 9, "sha256": {}}',
        b'{"version": 1, "sha256": {"k": "short"}}',
        b"\xff\xfe",
    ],
)
def test_damaged_cache_is_ignored_and_rewritten(
    tmp_path: Path, cache_dir: Path, content: bytes
) -> None:
    cache_dir.mkdir()
    (cache_dir / HashCache.NAME).write_bytes(content)
    ms = _inputs(tmp_path)
    assert _merge(ms, tmp_path / "a") == _truth(ms)
    assert len(json.loads((cache_dir / HashCache.NAME).read_text())["sha256"]) == 2


def test_unwritable_cache_does_not_fail_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SOUPKIT_CACHE_DIR", str(blocker / "cache"))
    ms = _inputs(tmp_path)
    assert _merge(ms, tmp_path / "a") == _truth(ms)


def test_cache_keeps_the_newest_entries_and_merges_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    a, b = HashCache(path, limit=3), HashCache(path, limit=3)
    for i in range(4):
        a.put(f"a{i}", f"{i:064x}")
    a.save()
    assert list(HashCache(path).entries) == ["a1", "a2", "a3"]
    b.put("b0", "f" * 64)  # another run, started before a saved
    b.save()
    assert list(HashCache(path).entries) == ["a2", "a3", "b0"]


def test_file_changing_while_hashed_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    cache = HashCache(tmp_path / "c.json")
    keys = iter([HashCache.key(f), "changed"])
    monkeypatch.setattr(HashCache, "key", staticmethod(lambda path: next(keys)))
    digests = hashing.BackgroundHasher([f], cache).result()
    assert digests[f] == hashlib.sha256(b"x" * 100).hexdigest()
    assert cache.entries == {} and not (tmp_path / "c.json").exists()


def test_search_and_merge_share_input_digests(
    tmp_path: Path, cache_dir: Path, hashed: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A score cache's file memo and the merges' digest cache are one store: files a search
    hashed are not hashed again by the merge that writes the soup, and the other way round."""
    from soupkit.search.cache import ScoreCache

    ms = _inputs(tmp_path)
    store = ScoreCache(tmp_path / "scores.jsonl")
    files = [m / "model.safetensors" for m in ms]
    assert [store.memo.sha256(f) for f in files] == list(_truth(ms).values())
    store.save_file_hashes()
    assert len(hashed) == 2  # the search hashed both files
    hashed.clear()
    assert _merge_report(ms, tmp_path / "a") == {p: (h, True) for p, h in _truth(ms).items()}
    assert hashed == []  # the merge hashed nothing
    extra = write_model(tmp_path / "m9", {"w": torch.full((32, 32), 9.0)})
    _merge([*ms, extra], tmp_path / "b")  # the merge hashes the new file ...
    assert len(hashed) == 1
    fresh = ScoreCache(tmp_path / "other-scores.jsonl")
    fresh.memo.sha256(extra / "model.safetensors")  # ... and a new search's memo finds it
    assert len(hashed) == 1
    assert ScoreCache(None).memo.path is None  # an in-memory score cache persists nothing


def test_sha256_file_is_hashlib_over_blocks(tmp_path: Path) -> None:
    """One helper hashes every file: equal to hashlib over the whole bytes, across block
    boundaries, with ``on_bytes`` seeing every byte once."""
    for size in (0, 1, hashing.BLOCK - 1, hashing.BLOCK, hashing.BLOCK + 3):
        f = tmp_path / f"f{size}"
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        f.write_bytes(data)
        seen: list[int] = []
        assert hashing.sha256_file(f, seen.append) == hashlib.sha256(data).hexdigest()
        assert sum(seen) == size


def test_hash_cache_in_memory_with_records(tmp_path: Path) -> None:
    """A cache without a file (a memory-only score cache) answers from its records, remembers
    what it computes, and writes nothing."""
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    cache = HashCache(None, records={HashCache.key(f): "0" * 64})
    assert cache.sha256(f) == "0" * 64  # from the records: not read
    g = tmp_path / "g"
    g.write_bytes(b"xyz")
    sizes: list[int] = []
    assert cache.sha256(g, sizes.append) == hashlib.sha256(b"xyz").hexdigest()
    assert cache.new == {HashCache.key(g): hashlib.sha256(b"xyz").hexdigest()}
    cache.save()
    assert cache.new == {} and sorted(tmp_path.iterdir()) == [f, g]


def test_one_evaluator_source_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluator's source hash is the same whether the evaluator is named by a module
    import string, a file path or given as the function itself (search, backends, CLI)."""
    import importlib
    import sys

    from soupkit.backends.jobs import RemoteEvaluator
    from soupkit.evaluate.identity import source_digest
    from soupkit.search import evaluator_identity

    (tmp_path / "myeval16b.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    want = hashlib.sha256((tmp_path / "myeval16b.py").read_bytes()).hexdigest()[:16]
    mod = importlib.import_module("myeval16b")
    try:
        assert source_digest("myeval16b:score") == want
        assert source_digest("myeval16b.py:score") == want
        assert source_digest(mod.score) == want
        assert evaluator_identity(mod.score) == f"myeval16b:score@{want}"
        assert RemoteEvaluator.from_spec("myeval16b:score").cache_key == f"myeval16b:score@{want}"
        assert source_digest("nosuchmodule16b:score") is None
        assert (
            RemoteEvaluator.from_spec("nosuchmodule16b:f").cache_key == "nosuchmodule16b:f@nosource"
        )
    finally:
        sys.modules.pop("myeval16b", None)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_hashing_threads_give_every_files_digest(tmp_path: Path, threads: int) -> None:
    """Files are shared out among the threads, largest first; each digest is hashlib's."""
    files = []
    for i, size in enumerate([0, 1, hashing.BLOCK + 3, 5000, 2 * hashing.BLOCK, 17, 65536]):
        f = tmp_path / f"f{i}"
        f.write_bytes(os.urandom(size))
        files.append(f)
    hasher = hashing.BackgroundHasher([*files, files[2]], None, threads=threads)  # a repeat
    assert len(hasher._threads) == min(threads, len(files))
    digests = hasher.result()
    assert digests == {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_hashing_threads_report_an_unreadable_file(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(b"x" * 1000)
    with pytest.raises(soupkit.errors.CheckpointFormatError, match="hashing the inputs failed"):
        hashing.BackgroundHasher([good, tmp_path / "missing", good], None, threads=2).result()


def test_default_hashing_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    for cpus, files, want in [
        (2, 5, 2),
        (1, 5, 2),
        (None, 5, 2),
        (16, 5, 5),
        (16, 20, 8),
        (64, 1, 1),
        (4, 0, 1),
    ]:
        monkeypatch.setattr(os, "cpu_count", lambda c=cpus: c)
        assert hashing.default_threads(files) == want, (cpus, files)
