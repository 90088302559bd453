"""The native kernels' build and switches: ISA detection and forcing, SOUPKIT_KERNELS=0."""

from __future__ import annotations

import os
import shutil
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


def _build(tmp: Path, cflags: str = "") -> Path:
    """setup.py build_ext into ``tmp`` (what `make kernels` runs, elsewhere); the built module."""
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "SOUPKIT_REQUIRE_KERNELS": "1", "CFLAGS": cflags}
    r = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp / "lib"),
         "--build-temp", str(tmp / "tmp"), "--force", "--verbose"],
        cwd=root, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "-ffp-contract=off" in r.stdout + r.stderr
    built = sorted((tmp / "lib").rglob("_elementwise*"))
    assert len(built) == 1, built
    return built[0]


def test_builds_in_place_from_setup_py(tmp_path: Path) -> None:
    """`make kernels` (setup.py build_ext) compiles every kernel source with the bit-identity
    flags, here into a scratch folder."""
    _build(tmp_path)


PORTABLE_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from reference import make_input, reference, same_bytes, DTYPES
import soupkit.kernels as k
assert k.best_isa() == "portable", k.best_isa()
for n in (0, 1, 17, 2049, 4100):
    for di in DTYPES:
        for do in DTYPES:
            xs = [make_input(n, di, 3 * n + i, 1.0, 9) for i in range(3)]
            base = make_input(n, di, n, 1.0, 9)
            ref, bad = reference("task_arithmetic", {"weight": (1.0, 0.5, 0.2), "lambda": 0.7}, xs, base, do)
            out = torch.empty(n, dtype=do)
            assert k.task_arithmetic(out, xs, base, (1.0, 0.5, 0.2), lam=0.7) == bad
            assert same_bytes(out, ref), (n, di, do)
            ref, bad = reference("linear", {"weight": (0.3, 0.3, 0.4)}, xs, None, do)
            assert k.linear(out, xs, (0.3, 0.3, 0.4)) == bad and same_bytes(out, ref), (n, di, do)
print("ok")
"""


def test_portable_only_build(tmp_path: Path) -> None:
    """Built with -DSOUPKIT_NO_SIMD, the extension has the portable path alone, as on aarch64
    or any CPU other than x86-64, and gives the reference's bytes."""
    so = _build(tmp_path, "-DSOUPKIT_NO_SIMD")
    root = Path(__file__).resolve().parents[2]
    pkg = tmp_path / "pkg"
    shutil.copytree(
        root / "src" / "soupkit", pkg / "soupkit", ignore=shutil.ignore_patterns("*.so")
    )
    shutil.copy(so, pkg / "soupkit" / "kernels" / so.name)
    r = subprocess.run(
        [sys.executable, "-c", PORTABLE_CHECK, str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(pkg), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
