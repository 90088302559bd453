"""Hostile sharded folders: an index may not lead outside its folder or disagree with its shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hostile_helpers import good_file, sharded_folder, write_index

import soupkit
from soupkit.errors import CheckpointFormatError
from soupkit.io.checkpoint import INDEX_NAME

S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def open_bad(folder: Path) -> str:
    with pytest.raises(CheckpointFormatError) as ei:
        soupkit.open_checkpoint(folder)
    assert type(ei.value) is CheckpointFormatError
    msg = str(ei.value)
    assert msg.startswith(f"{folder / INDEX_NAME}: "), msg
    return msg


def test_valid_sharded_folder_opens(tmp_path: Path) -> None:
    ck = soupkit.open_checkpoint(sharded_folder(tmp_path / "m"))
    assert list(ck.tensors) == ["a", "b", "c"] and len(ck.files) == 2


@pytest.mark.parametrize(
    "target", ["../secret.safetensors", "sub/../../secret.safetensors", "/etc/passwd", "", "a\x00b"]
)
def test_weight_map_may_not_leave_the_folder(tmp_path: Path, target: str) -> None:
    good_file(tmp_path / "secret.safetensors")
    folder = sharded_folder(tmp_path / "m")
    write_index(folder, {"a": S1, "b": S1, "c": target})
    msg = open_bad(folder)
    assert f"weight_map points outside the model folder: {target!r}" in msg
    assert "hint: shard names must be plain file names inside the folder" in msg


def test_symlink_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    secret = good_file(tmp_path / "secret.safetensors")
    folder = sharded_folder(tmp_path / "m")
    os.symlink(secret, folder / "evil.safetensors")
    write_index(folder, {"a": S1, "b": S1, "c": "evil.safetensors"})
    assert "weight_map points outside the model folder: 'evil.safetensors'" in open_bad(folder)


def test_symlinked_subfolder_escaping_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    good_file(tmp_path / "elsewhere" / "x.safetensors")
    folder = sharded_folder(tmp_path / "m")
    os.symlink(tmp_path / "elsewhere", folder / "sub")
    write_index(folder, {"a": S1, "b": S1, "c": "sub/x.safetensors"})
    assert "points outside the model folder: 'sub/x.safetensors'" in open_bad(folder)


def test_symlink_loop_is_refused(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    os.symlink("loop.safetensors", folder / "loop.safetensors")
    write_index(folder, {"a": S1, "b": S1, "c": "loop.safetensors"})
    assert "points outside the model folder: 'loop.safetensors'" in open_bad(folder)


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    os.rename(folder / S2, folder / "real.safetensors")
    os.symlink("real.safetensors", folder / S2)
    assert set(soupkit.open_checkpoint(folder).tensors) == {"a", "b", "c"}


def test_missing_shard(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    (folder / S2).unlink()
    assert f"shard {S2!r} listed in weight_map does not exist" in open_bad(folder)


def test_shard_that_is_a_fifo_is_not_opened(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    (folder / S2).unlink()
    os.mkfifo(folder / S2)
    assert f"shard {S2!r} listed in weight_map does not exist" in open_bad(folder)


def test_index_and_headers_disagree(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    # c really lives in shard 2; the index says shard 1; 'zz' exists nowhere; 'b' is not listed
    write_index(folder, {"a": S1, "c": S1, "zz": S2})
    msg = open_bad(folder)
    assert "index and shard headers disagree" in msg
    assert f"tensor 'b' is in shard {S1} but the index says nothing" in msg
    assert f"tensor 'c' is in shard {S2} but the index says {S1}" in msg
    assert f"index maps 'zz' to {S2}, but that shard has no such tensor" in msg


def test_same_tensor_in_two_shards(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(4), "c": torch.zeros(3)}, str(folder / S2))
    msg = open_bad(folder)
    assert f"tensor 'a' is stored in two shards ({S1} and {S2})" in msg


def test_shard_with_a_malformed_header_names_the_shard(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    data = (folder / S2).read_bytes()
    (folder / S2).write_bytes(data[:-3])
    with pytest.raises(CheckpointFormatError) as ei:
        soupkit.open_checkpoint(folder)
    assert str(ei.value).startswith(f"{folder / S2}: ") and "outside the data buffer" in str(
        ei.value
    )


@pytest.mark.parametrize(
    "text,part",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected an object with a 'weight_map' of tensor name -> shard file name"),
        ('{"weight_map": ["a"]}', "expected an object with a 'weight_map'"),
        ('{"weight_map": {"a": 1}}', "expected an object with a 'weight_map'"),
        ('{"weight_map": {"a": "x", "a": "y"}}', "names key 'a' twice in one object"),
        ('{"weight_map": {"a": "x"}, "weight_map": {}}', "names key 'weight_map' twice"),
        ("[" * 100_000, "nested too deeply"),
        ('{"weight_map": {}, "n": 1' + "0" * 5000 + "}", "not valid JSON"),
    ],
)
def test_malformed_index(tmp_path: Path, text: str, part: str) -> None:
    folder = sharded_folder(tmp_path / "m")
    (folder / INDEX_NAME).write_text(text)
    assert part in open_bad(folder)


def test_non_utf8_index(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    (folder / INDEX_NAME).write_bytes(b'{"weight_map": {"\xff": "x"}}')
    assert "not valid JSON" in open_bad(folder)


def test_oversized_index_is_refused_before_reading(tmp_path: Path) -> None:
    folder = sharded_folder(tmp_path / "m")
    with open(folder / INDEX_NAME, "r+b") as f:
        f.truncate(50_000_001)  # sparse: costs no disk
    assert "50000001 bytes; an index larger than 50000000 bytes is refused" in open_bad(folder)


def test_merge_refuses_hostile_index_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from soupkit.cli import main

    good_file(tmp_path / "secret.safetensors")
    folder = sharded_folder(tmp_path / "m")
    write_index(folder, {"a": S1, "b": S1, "c": "../secret.safetensors"})
    other = sharded_folder(tmp_path / "n", seed=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {"merge_method": "linear", "models": [{"model": str(other)}, {"model": str(folder)}]}
        )
    )
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2  # PlanError: a usage problem
    err = capsys.readouterr().err
    assert (
        "error: PlanError" in err
        and "models[1]" in err
        and "points outside the model folder" in err
    )
    assert not (tmp_path / "out").exists()
