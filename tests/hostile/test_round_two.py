"""Hostile inputs, round two (issue 15): the recipe, the carried files, messages and links.

Each test builds its hostile input from the issue's description and asserts a clear one-line
error (exit 1 or 2) in bounded time and memory, or a correct result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

import soupkit
from soupkit.errors import MAX_SHOWN_CHARS, CheckpointFormatError, shown

from hostile_helpers import entry, raw_file, run_cli

import pytest

# --- 6: terminal and log injection ----------------------------------------------------------

NASTY = ["w\x1b[2J\x1b]0;T\x07", "b\nerror: fake", "bidi\u202eexe.txt"]


def _no_control_bytes(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert not any(line.startswith("error: fake") for line in text.splitlines())


def test_shown_escapes_and_cuts() -> None:
    assert shown("w\x1b[2J") == "w\\x1b[2J"
    assert shown("b\nerror: fake", quote=True) == "'b\\nerror: fake'"
    assert shown("plain/path.safetensors") == "plain/path.safetensors"
    long = shown("x" * 5_000_000)
    assert len(long) < MAX_SHOWN_CHARS + 40 and long.endswith(f"({5_000_000 - MAX_SHOWN_CHARS} more characters)")
    assert shown(Path("/tmp/a\x1bb")) == "/tmp/a\\x1bb"
    assert shown(b"bad\xff") == "bad\\udcff"  # an undecodable file name byte


def test_inspect_escapes_tensor_names(tmp_path: Path) -> None:
    save_file({n: torch.zeros(2) for n in NASTY}, str(tmp_path / "m.safetensors"))
    r = run_cli("inspect", str(tmp_path / "m.safetensors"))
    assert r.returncode == 0, r.stderr
    _no_control_bytes(r.stdout)
    assert "w\\x1b[2J\\x1b]0;T\\x07" in r.stdout and "b\\nerror: fake" in r.stdout
    r = run_cli("inspect", "--json", str(tmp_path / "m.safetensors"))
    _no_control_bytes(r.stdout)
    assert set(json.loads(r.stdout)["tensors"]) == set(NASTY)  # JSON keeps the exact names


def test_errors_escape_names_and_paths(tmp_path: Path) -> None:
    bad = raw_file(tmp_path / "m.safetensors", {NASTY[1]: entry("F99", [2], 0, 8)}, b"\0" * 8)
    r = run_cli("inspect", str(bad))
    assert r.returncode == 1
    _no_control_bytes(r.stderr)
    assert "unknown dtype" in r.stderr and "'b\\nerror: fake'" in r.stderr
    folder = tmp_path / "m\x1b]0;T\x07"
    folder.mkdir()
    r = run_cli("inspect", str(folder))
    assert r.returncode == 1 and "folder holds no checkpoint" in r.stderr
    _no_control_bytes(r.stderr)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [{"model": str(tmp_path / "gone\x1b[2J")}]}))
    r = run_cli("validate", str(recipe))
    assert r.returncode in (1, 2) and "no such file" in r.stderr
    _no_control_bytes(r.stderr)


def test_a_5mb_tensor_name_gives_a_short_line(tmp_path: Path) -> None:
    name = "n" * 5_000_000
    bad = raw_file(tmp_path / "m.safetensors", {name: entry("F99", [2], 0, 8)}, b"\0" * 8)
    r = run_cli("inspect", str(bad))
    assert r.returncode == 1 and "unknown dtype" in r.stderr
    assert max(len(line) for line in r.stderr.splitlines()) < 1000
    save_file({name: torch.zeros(1)}, str(tmp_path / "ok.safetensors"))
    r = run_cli("inspect", str(tmp_path / "ok.safetensors"))
    assert r.returncode == 0 and max(len(line) for line in r.stdout.splitlines()) < 1000


# --- 7: bytes of unrelated files never leak into errors ----------------------------------------

def test_unrelated_file_reported_without_echoing_its_bytes(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    m = tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors").write_bytes(passwd.read_bytes())
    with pytest.raises(CheckpointFormatError) as ei:
        soupkit.open_checkpoint(m)
    msg = str(ei.value)
    assert "not a safetensors file: the first 8 bytes are not a plausible header length (file is 32 bytes)" in msg
    assert str(int.from_bytes(b"root:x:0", "little")) not in msg and "root" not in msg.replace(str(tmp_path), "")
