"""Folders as the Hugging Face cache lays them out: ``models--org--name/snapshots/<rev>/`` whose
files are links to ``../../blobs/<etag>``. Sharded and single-file snapshots merge like any
folder, every carried file that `plan` lists is in the output, and links that leave the cache
repository are refused with the reason (the rule of `soupkit.io.links`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import soupkit
from soupkit.cli import main
from soupkit.errors import CheckpointFormatError, PlanError
from soupkit.io.links import resolve_model_file, snapshot_blobs
from soupkit.io.output import save_state_dict

from .eco_helpers import llama_config, llama_state

REV = "0123456789abcdef0123456789abcdef01234567"
CARRIED = [
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def to_cache_snapshot(src: Path, cache: Path, repo: str, rev: str = REV) -> Path:
    """Move every file of folder ``src`` into a Hugging Face cache layout; returns the snapshot."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / rev
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)
    for f in sorted(src.iterdir()):
        etag = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(repo_dir / "blobs" / etag)
        os.symlink(f"../../blobs/{etag}", snap / f.name)
    src.rmdir()
    return snap


def hf_model(tmp_path: Path, name: str, seed: int, *, shard: str | None = None) -> Path:
    """A tiny Llama folder (sharded when ``shard`` is a size) with config and tokenizer files."""
    folder = tmp_path / f"src-{name}"
    save_state_dict(llama_state(seed), folder, max_shard_size=shard or "5GB")
    (folder / "config.json").write_text(json.dumps(llama_config(4)))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>"}))
    return folder


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single-file", "sharded"])
def test_snapshot_folders_merge_and_carry_what_plan_lists(
    tmp_path: Path, shard: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "hub"
    snaps = [
        to_cache_snapshot(hf_model(tmp_path, n, i, shard=shard), cache, f"org/{n}")
        for i, n in enumerate(["a", "b"])
    ]
    assert all((s / "config.json").is_symlink() for s in snaps)
    if shard:
        assert (snaps[0] / "model.safetensors.index.json").is_symlink()
        assert len(soupkit.open_checkpoint(snaps[0]).files) > 1
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n" + "".join(f"  - model: {s}\n" for s in snaps)
    )
    assert main(["plan", str(recipe)]) == 0
    listed = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("carries"))
    assert listed == f"carries     {', '.join(CARRIED)} from {snaps[0]}"
    p = soupkit.plan(recipe)
    assert list(p.carry_files) == CARRIED
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    for name in CARRIED:  # copied, not linked, byte for byte
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (snaps[0] / name).read_bytes()
    report = json.loads((out / "soupkit-report.json").read_text())
    assert [f["file"] for f in report["other_files"] if f["file"] in CARRIED] == CARRIED
    card = (out / "README.md").read_text()
    assert "base_model:\n- org/a\n- org/b" in card  # the cache path names its Hub id


def test_the_link_rule(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snap = to_cache_snapshot(hf_model(tmp_path, "a", 0), cache, "org/a")
    other = to_cache_snapshot(hf_model(tmp_path, "b", 1), cache, "org/b")
    assert snapshot_blobs(snap) == (cache / "models--org--a" / "blobs").resolve()
    assert snapshot_blobs(snap / "sub") == (cache / "models--org--a" / "blobs").resolve()
    assert snapshot_blobs(tmp_path) is None
    # into its own blobs: followed
    assert resolve_model_file(snap, "config.json").parent.name == "blobs"
    # into another repository's blobs, or out of the cache: refused with the reason
    blob_b = os.readlink(other / "config.json")
    os.symlink(Path("../../../models--org--b/snapshots") / REV / blob_b, snap / "x.json")
    with pytest.raises(
        CheckpointFormatError,
        match=r"x.json: file is a symbolic link that leads outside the model folder \(to .*models--org--b/blobs",
    ):
        resolve_model_file(snap, "x.json")
    plain = tmp_path / "plain"
    plain.mkdir()
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", plain / "config.json")
    with pytest.raises(CheckpointFormatError) as e:
        resolve_model_file(plain, "config.json")
    assert f"leads outside the model folder (to {(tmp_path / 'secret').resolve()})\n" in str(
        e.value
    )
    assert "hint: a link is followed only if its target stays inside the model folder" in str(
        e.value
    )


def test_shard_linked_to_another_cache_repo_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snap = to_cache_snapshot(hf_model(tmp_path, "a", 0, shard="20KB"), cache, "org/a")
    to_cache_snapshot(hf_model(tmp_path, "b", 1, shard="20KB"), cache, "org/b")
    shard = json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"][
        "lm_head.weight"
    ]
    (snap / shard).unlink()
    blob = sorted((cache / "models--org--b" / "blobs").iterdir())[0].name
    os.symlink(f"../../../models--org--b/blobs/{blob}", snap / shard)
    with pytest.raises(CheckpointFormatError) as e:
        soupkit.open_checkpoint(snap)
    msg = str(e.value)
    assert f"weight_map points outside the model folder: {shard!r}\n" in msg
    assert "models--org--b/blobs" in msg and "leads outside the model folder" in msg


def test_carried_file_that_leaves_or_dangles_is_an_error_not_a_drop(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snap = to_cache_snapshot(hf_model(tmp_path, "a", 0), cache, "org/a")
    recipe = {"merge_method": "linear", "models": [{"model": str(snap)}]}
    (tmp_path / "secret.json").write_text("{}")
    (snap / "tokenizer_config.json").unlink()
    os.symlink(tmp_path / "secret.json", snap / "tokenizer_config.json")
    with pytest.raises(
        CheckpointFormatError,
        match=r"tokenizer_config.json: carried file is a symbolic link that leads outside the model folder \(to .*secret.json",
    ):
        soupkit.plan(recipe)
    (snap / "tokenizer_config.json").unlink()
    os.symlink("../../blobs/" + "0" * 64, snap / "tokenizer_config.json")  # blob never downloaded
    with pytest.raises(CheckpointFormatError) as e:
        soupkit.plan(recipe)
    assert "tokenizer_config.json: is a symbolic link to '../../blobs/000" in str(e.value)
    assert "which does not exist\nhint: the folder is incomplete (an interrupted download?)" in str(
        e.value
    )


def test_plain_folder_carries_what_plan_lists(tmp_path: Path) -> None:
    folder = hf_model(tmp_path, "a", 0)
    p = soupkit.plan({"merge_method": "linear", "models": [{"model": str(folder)}]})
    assert list(p.carry_files) == CARRIED
    r = soupkit.merge(p.config, tmp_path / "out", progress=False)
    assert sorted(n for n in os.listdir(r.out) if n in p.carry_files) == sorted(CARRIED)


def test_escaping_shard_in_a_recipe_is_a_plan_error(tmp_path: Path) -> None:
    folder = hf_model(tmp_path, "a", 0, shard="20KB")
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][
        "lm_head.weight"
    ]
    (folder / shard).rename(tmp_path / "away.safetensors")
    os.symlink(tmp_path / "away.safetensors", folder / shard)
    with pytest.raises(PlanError, match="weight_map points outside the model folder"):
        soupkit.plan({"merge_method": "linear", "models": [{"model": str(folder)}]})
