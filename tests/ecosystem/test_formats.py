"""Checkpoints from other ecosystems: Lightning .ckpt (state_dict nesting, ``model.`` prefix),
timm / open_clip / DDP (``module.``) state dicts through the pickle opt-in, key maps applied at
plan level, in-memory ``nn.Module`` inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.cli import main
from soupkit.errors import CheckpointFormatError, PlanError, UnsafeFormatError, UsageError
from soupkit.io.names import KeyMap, RenameRule, as_state_dict, prefix_hint
from soupkit.io.output import save_state_dict


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


def test_key_map_rules() -> None:
    km = KeyMap.build(strip_prefix=["model.", "module."], rename=[r"^enc\.(\d+)=>encoder.layer.\1"])
    assert km("model.enc.3.weight") == "encoder.layer.3.weight"
    assert km("module.head.bias") == "head.bias"
    assert km("head.bias") == "head.bias"  # names without the prefix are kept
    assert km.describe() == [
        "strip prefix 'model.'",
        "strip prefix 'module.'",
        r"^enc\.(\d+)=>encoder.layer.\1",
    ]
    assert not KeyMap.build() and KeyMap.build() is not None
    with pytest.raises(UsageError, match="expected 'REGEX=>REPLACEMENT'"):
        RenameRule.parse("model.")
    with pytest.raises(UsageError, match="invalid regular expression"):
        RenameRule.parse("(=>x")
    with pytest.raises(UsageError, match=r"(?s)invalid replacement .*refer to them as \\1 .. \\1"):
        RenameRule.parse(r"(a)=>\2")
    with pytest.raises(CheckpointFormatError, match="'model.w' and 'w' both become 'w'"):
        KeyMap.build(strip_prefix="model.").rename_all(["model.w", "w"], "ckpt")


def test_prefix_hint() -> None:
    names = ["0.weight", "0.bias", "1.weight"]
    assert prefix_hint(names, [f"module.{n}" for n in names]) == "--strip-prefix module."
    assert prefix_hint(names, [f"net.{n}" for n in names]) == "--strip-prefix net."
    assert prefix_hint(names, ["x", "y"]) is None


def _lightning(path: Path, model: torch.nn.Module, prefix: str = "model.") -> Path:
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save(
        {
            "state_dict": sd,
            "epoch": 3,
            "global_step": 120,
            "optimizer_states": [{"lr": 0.1}],
            "hyper_parameters": {"hidden": 8},
        },
        path,
    )
    return path


def test_lightning_checkpoints_merge_like_plain_state_dicts(tmp_path: Path) -> None:
    nets = [net(i) for i in range(3)]
    ckpts = [_lightning(tmp_path / f"epoch={i}.ckpt", n) for i, n in enumerate(nets)]
    recipe = {"merge_method": "linear", "models": [{"model": str(c)} for c in ckpts]}
    with pytest.raises(PlanError, match="(?s)is a pickle checkpoint .*opt in with --allow-pickle"):
        soupkit.plan(recipe)
    with pytest.raises(UnsafeFormatError):
        soupkit.open_checkpoint(ckpts[0])
    r = soupkit.merge(
        recipe,
        tmp_path / "soup",
        allow_pickle=True,
        key_map=KeyMap.build(strip_prefix="model."),
        progress=False,
    )
    assert any("Lightning" in n for n in r.plan.notes) and any(
        "renamed 9 of 9" in n for n in r.plan.notes
    )
    got = load_file(str(tmp_path / "soup" / "model.safetensors"))
    ref = soupkit.merge_state_dicts(nets)  # nn.Modules in memory: the same engine
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert got["1.num_batches_tracked"].dtype == torch.int64


def test_cli_merge_mixes_lightning_and_safetensors_with_strip_prefix(tmp_path: Path) -> None:
    a, b = net(0), net(1)
    ck = _lightning(tmp_path / "a.ckpt", a)
    save_file(b.state_dict(), str(tmp_path / "b.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {ck}\n  - model: {tmp_path / 'b.safetensors'}\n"
    )
    assert (
        main(["merge", str(recipe), str(tmp_path / "x"), "--allow-pickle", "--no-progress"]) == 2
    )  # names differ
    assert (
        main(
            [
                "merge",
                str(recipe),
                str(tmp_path / "out"),
                "--allow-pickle",
                "--strip-prefix",
                "model.",
                "--no-progress",
            ]
        )
        == 0
    )
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = soupkit.merge_state_dicts([a, b])
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert (
        main(["validate", str(recipe), "--strip-prefix", "model."]) == 2
    )  # validate has no --allow-pickle


def test_timm_and_open_clip_style_prefixes_and_regex_renames(tmp_path: Path) -> None:
    a, b = net(0), net(1)
    torch.save(
        {f"module.{k}": v for k, v in a.state_dict().items()}, tmp_path / "ddp.pt"
    )  # DDP / timm
    torch.save(
        {f"visual.trunk.{k}": v for k, v in b.state_dict().items()}, tmp_path / "clip.pth"
    )  # open_clip-like
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / "ddp.pt")}, {"model": str(tmp_path / "clip.pth")}],
    }
    with pytest.raises(PlanError, match="tensor"):
        soupkit.plan(recipe, allow_pickle=True)
    km = KeyMap.build(strip_prefix="module.", rename=[r"^visual\.trunk\.=>"])
    p = soupkit.plan(recipe, allow_pickle=True, key_map=km)
    assert [j.name for j in p.jobs] == list(a.state_dict())
    out = soupkit.merge(recipe, tmp_path / "out", allow_pickle=True, key_map=km, progress=False)
    got = load_file(str(out.out / "model.safetensors"))
    ref = soupkit.merge_state_dicts([a.state_dict(), b.state_dict()])
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_in_memory_modules_and_lightning_dicts(tmp_path: Path) -> None:
    a, b = net(0), net(1)
    by_module = soupkit.merge_state_dicts(
        [a, b], "task_arithmetic", base=net(2), parameters={"lambda": 0.5}
    )
    by_dict = soupkit.merge_state_dicts(
        [a.state_dict(), {"state_dict": b.state_dict()}],
        "task_arithmetic",
        base=net(2).state_dict(),
        parameters={"lambda": 0.5},
    )
    assert all(torch.equal(by_module[k], by_dict[k]) for k in by_dict)
    with pytest.raises(
        CheckpointFormatError, match="got a list, expected an nn.Module or a state dict"
    ):
        as_state_dict([1, 2])
    with pytest.raises(CheckpointFormatError, match="1 entry is not tensors: 'epoch' \\(int\\)"):
        as_state_dict({"w": torch.zeros(1), "epoch": 3})


def test_save_state_dict_writes_an_atomic_sharded_folder(tmp_path: Path) -> None:
    sd = {f"w{i}": torch.full((64,), float(i)) for i in range(5)}
    save_state_dict(sd, tmp_path / "out", max_shard_size=600, extra_files={"note.txt": b"hi"})
    ck = soupkit.open_checkpoint(tmp_path / "out")
    assert len(ck.files) > 1 and (tmp_path / "out" / "note.txt").read_bytes() == b"hi"
    got = {k: v for f in ck.files for k, v in load_file(str(f)).items()}
    assert all(torch.equal(got[k], sd[k]) for k in sd)
