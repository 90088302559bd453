"""The CLI end to end: commands, outputs and exit codes (0 ok, 1 runtime, 2 usage/config)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toymodels import tiny_state, write_model

from soupkit.cli import main


def write_recipe(tmp_path: Path, paths: list[Path], extra: str = "") -> Path:
    body = "merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n" for p in paths) + extra
    r = tmp_path / "recipe.yaml"
    r.write_text(body)
    return r


def test_merge_plan_validate_inspect_methods(
    tmp_path: Path, models: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    r = write_recipe(tmp_path, models)
    assert main(["validate", str(r)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["plan", str(r)]) == 0
    assert "peak memory" in capsys.readouterr().out
    assert main(["merge", str(r), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "merged 10 tensors with linear" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "10 tensors in 1 file(s)" in out and "lm_head.weight" in out
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    assert '"num_params"' in capsys.readouterr().out
    assert main(["methods"]) == 0
    assert "linear" in capsys.readouterr().out
    for f in ("config.json", "README.md", "soupkit-report.json", "model.safetensors"):
        assert (tmp_path / "out" / f).is_file()


def test_exit_codes(tmp_path: Path, models: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    r = write_recipe(tmp_path, models, "parameters: {normalise: true}\n")
    assert main(["merge", str(r), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'normalise'" in err and "did you mean 'normalize'" in err
    assert "Traceback" not in err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    r = write_recipe(tmp_path, [models[0], corrupt])
    assert main(["merge", str(r), str(tmp_path / "o")]) == 2  # plan-time problem: nothing ran
    err = capsys.readouterr().err
    assert "header is not valid JSON" in err and str(corrupt) in err
    assert main(["inspect", str(corrupt)]) == 1
    assert not (tmp_path / "o").exists()


def test_soup_checkpoints_last_n(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    states = {step: tiny_state(step, torch.bfloat16) for step in (100, 200, 300, 1000)}
    for step, s in states.items():
        write_model(run / f"checkpoint-{step}", s)
    assert (
        main(["soup-checkpoints", str(run), str(tmp_path / "soup"), "--last", "2", "--no-progress"])
        == 0
    )
    out = capsys.readouterr().out
    assert "checkpoint-300" in out and "checkpoint-1000" in out and "checkpoint-200" not in out
    got = load_file(str(tmp_path / "soup" / "model.safetensors"))
    k = "lm_head.weight"
    expected = ((states[300][k].float() + states[1000][k].float()) / 2).to(torch.bfloat16)
    assert torch.equal(got[k], expected)
    assert (
        main(
            [
                "soup-checkpoints",
                str(run),
                str(tmp_path / "w"),
                "--last",
                "2",
                "--weights",
                "1,3",
                "--no-progress",
            ]
        )
        == 0
    )
    got = load_file(str(tmp_path / "w" / "model.safetensors"))
    expected = ((states[300][k].float() * 1 + states[1000][k].float() * 3) / 4).to(torch.bfloat16)
    assert torch.equal(got[k], expected)
    assert main(["soup-checkpoints", str(run), str(tmp_path / "x"), "--last", "9"]) == 2
    assert "has only 4 checkpoint(s)" in capsys.readouterr().err


def test_console_script_runs_as_a_module(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "soupkit.cli", "--version"], capture_output=True, text=True
    )
    assert res.returncode == 0 and res.stdout.startswith("soupkit ")
    res = subprocess.run(
        [sys.executable, "-m", "soupkit.cli", "merge"], capture_output=True, text=True
    )
    assert res.returncode == 2 and "required" in res.stderr


def test_allow_pickle_is_offered_wherever_checkpoints_are_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tiny_state(1)
    (tmp_path / "pt").mkdir()
    torch.save(state, tmp_path / "pt" / "model.pt")
    assert main(["inspect", str(tmp_path / "pt" / "model.pt")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "pt" / "model.pt"), "--allow-pickle"]) == 0
    assert "lm_head.weight" in capsys.readouterr().out
    r = write_recipe(
        tmp_path, [tmp_path / "pt" / "model.pt", write_model(tmp_path / "sf", tiny_state(2))]
    )
    for cmd in (["validate", str(r)], ["plan", str(r)]):
        assert main(cmd) == 2
        assert main([*cmd, "--allow-pickle"]) == 0
    run = tmp_path / "run"
    for step in (1, 2):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        torch.save(tiny_state(step), run / f"checkpoint-{step}" / "model.pt")
    assert main(["soup-checkpoints", str(run), str(tmp_path / "soup"), "--no-progress"]) == 2
    assert (
        main(
            [
                "soup-checkpoints",
                str(run),
                str(tmp_path / "soup"),
                "--no-progress",
                "--allow-pickle",
            ]
        )
        == 0
    )


def test_cli_tunes_the_allocator_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import platform

    import soupkit
    import soupkit.cli as cli

    calls: list[None] = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: calls.append(None) or True)
    assert cli.main(["methods"]) == 0
    capsys.readouterr()
    assert len(calls) == 1
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert soupkit.tune_allocator() is True and soupkit.tune_allocator() is True  # idempotent
