"""Pickle checkpoints: refused by default; on opt-in only torch.load(weights_only=True); never code."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_helpers import cli_process, tree_state
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.errors import CheckpointFormatError, UnsafeFormatError
from soupkit.io.pickle_ckpt import load_pickle_state_dict


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 4, generator=g),
        "b": torch.randn(4, generator=g),
        "ids": torch.arange(5),
    }


class Payload:
    """Unpickling this runs ``fn(*args)``: the classic malicious checkpoint."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def payloads(marker: Path) -> dict[str, Any]:
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.call": Payload(subprocess.call, ["touch", str(marker)]),
    }


def write_malicious(path: Path, payload: Any, how: str) -> Path:
    obj = {"w": torch.zeros(2), "evil": payload}
    if how == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(how.removeprefix("pickle-protocol-")))
    return path


# --- refused by default -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_refused_without_opt_in(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"model{suffix}"
    torch.save(state(0), p)
    with pytest.raises(UnsafeFormatError) as ei:
        soupkit.open_checkpoint(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: is a pickle checkpoint ({suffix})")
    assert "loading a pickle can execute arbitrary code" in msg and "--allow-pickle" in msg
    assert "torch.load(weights_only=True)" in msg


def test_hf_folder_with_bin_refused_without_opt_in(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    torch.save(state(0), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UnsafeFormatError, match="pytorch_model.bin: is a pickle checkpoint"):
        soupkit.open_checkpoint(tmp_path / "m")


# --- malicious payloads never run ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "subprocess.call"])
def test_malicious_pickle_never_runs_even_when_opted_in(
    tmp_path: Path, how: str, kind: str
) -> None:
    marker = tmp_path / "PWNED"
    evil = write_malicious(tmp_path / "evil.pt", payloads(marker)[kind], how)
    with pytest.raises(UnsafeFormatError) as ei:  # default: refused before anything is read
        soupkit.open_checkpoint(evil)
    assert "is a pickle checkpoint" in str(ei.value)
    with pytest.raises(UnsafeFormatError) as ei:  # opted in: the restricted unpickler refuses it
        soupkit.open_checkpoint(evil, allow_pickle=True)
    msg = str(ei.value)
    assert msg.startswith(f"{evil}: unsafe pickle, not a plain state dict: it asks to load ")
    assert "never runs code from a checkpoint" in msg
    assert "weights_only=False" not in msg  # never advise the unsafe fallback torch suggests
    assert not marker.exists()


def test_malicious_pickle_through_the_cli_with_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = write_malicious(tmp_path / "evil.bin", payloads(marker)["os.system"], "torch.save")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {"merge_method": "linear", "models": [{"model": str(good)}, {"model": str(evil)}]}
        )
    )
    proc = cli_process(
        ["merge", str(recipe), str(tmp_path / "out"), "--allow-pickle"], tmp_path / "log"
    )
    proc.join(timeout=120)
    err = (tmp_path / "log").read_text()
    assert proc.exitcode == 2, err
    # the planner gathers every input's problem into one PlanError naming the model
    assert err.startswith("error: PlanError: cannot merge: 1 problem(s)")
    assert f"models[1]: {evil}: unsafe pickle, not a plain state dict" in err
    assert "posix.system" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- opted in: plain state dicts load, everything else is explained ---------------------------


def test_opted_in_pickle_merges_like_safetensors(tmp_path: Path) -> None:
    for i in range(2):
        torch.save(state(i), tmp_path / f"m{i}.pt")
        save_file(state(i), str(tmp_path / f"m{i}.safetensors"))
    # a legacy (non-zip) file too: loaded without mmap
    torch.save(state(1), tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    before = tree_state(tmp_path)
    a = soupkit.uniform_soup(
        [tmp_path / "m0.pt", tmp_path / "legacy.bin"], tmp_path / "out-pickle", allow_pickle=True
    )
    b = soupkit.uniform_soup(
        [tmp_path / "m0.safetensors", tmp_path / "m1.safetensors"], tmp_path / "out-st"
    )
    ta, tb = (
        load_file(str(a.out / "model.safetensors")),
        load_file(str(b.out / "model.safetensors")),
    )
    assert set(ta) == set(tb) and all(
        torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta
    )
    report = json.loads((a.out / "soupkit-report.json").read_text())
    assert report["inputs"]["models"][0]["files"][0]["path"] == str(tmp_path / "m0.pt")
    assert len(report["inputs"]["models"][0]["files"][0]["sha256"]) == 64
    after = tree_state(tmp_path)
    assert {
        k: v for k, v in after.items() if k in before
    } == before  # inputs untouched (mmap is private)


def test_lightning_nesting_is_unwrapped_and_noted(tmp_path: Path) -> None:
    ckpt = {
        "epoch": 3,
        "global_step": 100,
        "state_dict": state(0),
        "optimizer_states": [{"lr": 0.1}],
        "lr_schedulers": [],
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    ck = soupkit.open_checkpoint(tmp_path / "last.ckpt", allow_pickle=True)
    assert set(ck.tensors) == {"w", "b", "ids"}
    assert (
        ck.notes
        and "took the tensors from its 'state_dict' entry (a Lightning checkpoint)" in ck.notes[0]
    )
    assert "ignored epoch, global_step, optimizer_states, lr_schedulers" in ck.notes[0]
    torch.save(state(1), tmp_path / "other.pt")
    p = soupkit.plan(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tmp_path / "last.ckpt")},
                {"model": str(tmp_path / "other.pt")},
            ],
        },
        allow_pickle=True,
    )
    assert any("Lightning" in n for n in p.notes)


def test_non_tensor_entries_are_listed(tmp_path: Path) -> None:
    torch.save(
        {"w": torch.zeros(2), "step": 5, "cfg": {"lr": 0.1}, "name": "run"}, tmp_path / "x.pt"
    )
    with pytest.raises(CheckpointFormatError) as ei:
        soupkit.open_checkpoint(tmp_path / "x.pt", allow_pickle=True)
    assert type(ei.value) is CheckpointFormatError
    msg = str(ei.value)
    assert (
        "not a plain state dict: 3 of 4 entries are not dense tensors: 'step' (int), 'cfg' (dict), 'name' (str)"
        in msg
    )
    assert "save `model.state_dict()` only" in msg


def test_training_checkpoint_hint_names_the_nested_state_dict(tmp_path: Path) -> None:
    torch.save({"model": state(0), "epoch": 2}, tmp_path / "ckpt.pt")
    with pytest.raises(
        CheckpointFormatError, match=r"entry 'model' looks like a state dict; save that entry alone"
    ):
        soupkit.open_checkpoint(tmp_path / "ckpt.pt", allow_pickle=True)


@pytest.mark.parametrize(
    "obj,part",
    [
        (torch.zeros(3), "holds a Tensor, expected a state dict"),
        ([torch.zeros(3)], "holds a list, expected a state dict"),
        ({1: torch.zeros(3)}, "key 1 (int, expected a string)"),
        ({"s": torch.zeros(3, 3).to_sparse()}, "'s' (torch.sparse_coo tensor)"),
        (
            {"c": torch.zeros(2, dtype=torch.complex64)},
            "has dtype torch.complex64, which safetensors cannot store",
        ),
    ],
)
def test_not_a_state_dict(tmp_path: Path, obj: Any, part: str) -> None:
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointFormatError) as ei:
        soupkit.open_checkpoint(tmp_path / "x.pt", allow_pickle=True)
    assert part in str(ei.value)


@pytest.mark.parametrize("make", ["garbage", "truncated-zip", "empty"])
def test_corrupt_pickle_files(tmp_path: Path, make: str) -> None:
    p = tmp_path / "x.bin"
    if make == "garbage":
        p.write_bytes(b"this is not a checkpoint at all" * 10)
    elif make == "empty":
        p.write_bytes(b"")
    else:
        torch.save(state(0), p)
        p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(CheckpointFormatError) as ei:
        load_pickle_state_dict(p)
    assert type(ei.value) is CheckpointFormatError
    assert str(ei.value).startswith(f"{p}: not a readable PyTorch checkpoint")


def test_sharded_pickle_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    sd = state(0)
    torch.save({"w": sd["w"]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": sd["b"], "ids": sd["ids"]}, folder / "pytorch_model-00002-of-00002.bin")
    wm = {
        "w": "pytorch_model-00001-of-00002.bin",
        "b": "pytorch_model-00002-of-00002.bin",
        "ids": "pytorch_model-00002-of-00002.bin",
    }
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(UnsafeFormatError):
        soupkit.open_checkpoint(folder)
    ck = soupkit.open_checkpoint(folder, allow_pickle=True)
    assert all(torch.equal(ck.tensors[k].data, v) for k, v in sd.items())
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {**wm, "w": "../../etc/passwd"}})
    )
    with pytest.raises(CheckpointFormatError, match="weight_map points outside the model folder"):
        soupkit.open_checkpoint(folder, allow_pickle=True)


def test_output_may_not_be_the_pickle_folder(tmp_path: Path) -> None:
    for i in range(2):
        (tmp_path / f"m{i}").mkdir()
        torch.save(state(i), tmp_path / f"m{i}" / "pytorch_model.bin")
    with pytest.raises(soupkit.UsageError, match="is input|holds input"):
        soupkit.uniform_soup(
            [tmp_path / "m0", tmp_path / "m1"], tmp_path / "m0", allow_pickle=True, force=True
        )
    assert (tmp_path / "m0" / "pytorch_model.bin").is_file()
    out = soupkit.uniform_soup(
        [tmp_path / "m0", tmp_path / "m1"], tmp_path / "soup", allow_pickle=True
    )
    assert set(load_file(str(out.out / "model.safetensors"))) == {"w", "b", "ids"}
