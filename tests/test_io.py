"""Header-first writer, reader ranges, sharded round trips, atomic output folders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from toymodels import tiny_state, write_model

import soupkit
from soupkit.errors import CheckpointFormatError, OutputExistsError
from soupkit.io import (
    OutputFolder,
    OutputTensor,
    ShardWriter,
    TensorReader,
    layout_shards,
    open_checkpoint,
    read_safetensors_header,
)
from soupkit.io.writer import parse_size, write_index


def test_writer_golden_bytes(tmp_path: Path) -> None:
    layout = layout_shards([OutputTensor("a", "F32", (2,)), OutputTensor("b", "U8", (3,))], 10**9)
    assert len(layout) == 1
    w = ShardWriter(tmp_path, layout[0])
    # write out of order: offsets are precomputed, so order does not matter
    w.write("b", torch.tensor([7, 8, 9], dtype=torch.uint8))
    w.write("a", torch.tensor([1.0, -2.0]))
    w.close()
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = (
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}'
    )
    header += b" " * (-len(header) % 8)
    expected = (
        struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, -2.0) + bytes([7, 8, 9])
    )
    assert raw == expected
    # an independent reader agrees
    back = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(back["a"], torch.tensor([1.0, -2.0])) and back["b"].tolist() == [7, 8, 9]


def test_writer_refuses_to_close_incomplete_shard(tmp_path: Path) -> None:
    layout = layout_shards([OutputTensor("a", "F32", (2,))], 10**9)
    w = ShardWriter(tmp_path, layout[0])
    with pytest.raises(soupkit.MergeIOError, match="wrote 0 data bytes, the layout needs 8"):
        w.close()


def test_shard_layout_follows_hugging_face_naming() -> None:
    ts = [OutputTensor(f"t{i}", "F32", (10,)) for i in range(5)]  # 40 bytes each
    shards = layout_shards(ts, 100)
    assert [s.filename for s in shards] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert [len(s.tensors) for s in shards] == [2, 2, 1]
    big = layout_shards(
        [OutputTensor("huge", "F32", (100,))], 10
    )  # larger than the limit: own shard
    assert len(big) == 1 and big[0].filename == "model.safetensors"


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("five gigs")


def test_sharded_round_trip(tmp_path: Path) -> None:
    state = tiny_state(3, torch.bfloat16)
    src = write_model(tmp_path / "src", state)
    soupkit.uniform_soup([src], tmp_path / "sharded", max_shard_size=600, progress=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    ck = open_checkpoint(tmp_path / "sharded")
    assert len(ck.files) > 1 and set(ck.tensors) == set(state)
    # and merging *from* a sharded folder back into one file gives the original bytes
    soupkit.uniform_soup([tmp_path / "sharded"], tmp_path / "single", progress=False)
    back = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert (tmp_path / "single" / "config.json").is_file()  # carried from the input folder


def test_reader_reads_element_ranges(tmp_path: Path) -> None:
    t = torch.arange(100, dtype=torch.float16)
    save_file({"x": t, "y": torch.ones(3)}, str(tmp_path / "f.safetensors"))
    ck = open_checkpoint(tmp_path / "f.safetensors")
    with TensorReader() as r:
        assert torch.equal(r.read(ck.tensors["x"], 10, 17), t[10:17])
        buf = torch.empty(64, dtype=torch.uint8)
        assert torch.equal(r.read(ck.tensors["x"], 0, 5, out=buf), t[:5])
        assert torch.equal(r.read(ck.tensors["y"]), torch.ones(3))


def test_checkpoint_forms(tmp_path: Path) -> None:
    state = tiny_state(1)
    save_file(state, str(tmp_path / "file.safetensors"))
    (tmp_path / "one").mkdir()
    save_file(state, str(tmp_path / "one" / "weights.safetensors"))
    for path in (tmp_path / "file.safetensors", tmp_path / "one"):
        assert set(open_checkpoint(path).tensors) == set(state)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="folder holds no checkpoint"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointFormatError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope")
    torch.save(state, tmp_path / "model.bin")
    with pytest.raises(soupkit.UnsafeFormatError, match="pickle checkpoint"):
        open_checkpoint(tmp_path / "model.bin")


def test_output_folder_is_atomic(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with OutputFolder(dest) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash mid-write")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no debris
    with OutputFolder(dest) as tmp:
        (tmp / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700)
    with pytest.raises(OutputExistsError, match="exists and is not empty"):
        OutputFolder(dest)
    with OutputFolder(dest, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_merge_failure_leaves_nothing(
    tmp_path: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from soupkit.io.output import ShardFiles

    calls = {"n": 0}
    real = ShardFiles.write

    def flaky(self, job, data, off):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(self, job, data, off)

    monkeypatch.setattr(ShardFiles, "write", flaky)
    with pytest.raises(OSError):
        soupkit.uniform_soup(models, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soupkit")]


def test_output_may_not_hold_an_input(tmp_path: Path, models: list[Path]) -> None:
    with pytest.raises(soupkit.UsageError, match="holds input"):
        soupkit.uniform_soup(models, models[0], force=True, progress=False)
    assert (models[0] / "model.safetensors").is_file()


def test_index_is_only_written_for_several_shards(tmp_path: Path) -> None:
    one = layout_shards([OutputTensor("a", "F32", (2,))], 10**9)
    write_index(tmp_path, one)
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_lazy_units_ask_the_disk_for_each_input_range_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compute threads read a linear merge's pieces themselves; the reader thread hints the
    kernel (posix_fadvise WILLNEED) about every unit first, so a cold cache is read ahead: each
    input tensor's bytes are hinted exactly once, and the output is unchanged."""
    import os

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    states = [{"a": torch.randn(300, 7), "b": torch.randn(1000)} for _ in range(2)]
    ms = [write_model(tmp_path / f"m{i}", s) for i, s in enumerate(states)]
    seen: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            seen.append((os.fstat(fd).st_ino, offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    recipe = {"merge_method": "linear", "models": [{"model": str(m)} for m in ms]}
    soupkit.merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    want = []
    for m in ms:
        f = m / "model.safetensors"
        header = read_safetensors_header(f)
        want += [(f.stat().st_ino, t.start, t.end - t.start) for t in header.tensors.values()]
    assert sorted(seen) == sorted(want)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    torch.testing.assert_close(
        merged["b"], (states[0]["b"] + states[1]["b"]) / 2, rtol=0, atol=1e-6
    )
