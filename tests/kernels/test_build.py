"""The native kernels' build and switches: ISA detection and forcing, SOUPKIT_KERNELS=0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import soupkit.kernels as kernels

ISAS = ["portable", "avx2", "avx512"]


def test_isa_is_the_best_this_cpu_runs() -> None:
    assert kernels.available()
    best = kernels.best_isa()
    assert best in ISAS
    assert kernels.isa() == best
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if flags and "avx512f" in flags.split():
        assert best == "avx512"
    elif flags and {"avx2", "fma", "f16c"} <= set(flags.split()):
        assert best == "avx2"


def test_isa_env_caps_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    best = ISAS.index(kernels.best_isa() or "portable")
    for name in ISAS[: best + 1]:
        monkeypatch.setenv(kernels.ISA_ENV, name)
        assert kernels.isa() == name
    monkeypatch.delenv(kernels.ISA_ENV)
    assert kernels.isa() == ISAS[best]


def test_unknown_or_unsupported_isa_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match=r"unknown ISA 'sse9' \(portable, avx2, avx512\)"):
        kernels.isa()
    if kernels.best_isa() != "avx512":
        monkeypatch.setenv(kernels.ISA_ENV, "avx512")
        with pytest.raises(ValueError, match="this CPU cannot run the avx512 kernels"):
            kernels.isa()


def test_disabled_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    assert not kernels.available()
    assert kernels.isa() is None
    assert not kernels.supports([torch.bfloat16], torch.bfloat16)
    out = torch.empty(4)
    with pytest.raises(ValueError, match="not supported here"):
        kernels.linear(out, [torch.ones(4)], [1.0])


def test_builds_in_place_from_setup_py(tmp_path: Path) -> None:
    """`make kernels` (setup.py build_ext --inplace) compiles every kernel source with the
    bit-identity flags, here into a scratch folder."""
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
            "--force",
            "--verbose",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SOUPKIT_REQUIRE_KERNELS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "-ffp-contract=off" in r.stdout + r.stderr
    built = sorted(p.name for p in (tmp_path / "lib").rglob("_elementwise*"))
    assert len(built) == 1, built
