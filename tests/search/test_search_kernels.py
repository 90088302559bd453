"""The searches merge their candidates in memory on the native kernels, with torch's bytes.

Each search runs twice, kernels on and off (``SOUPKIT_KERNELS=0``): the written model, every
state an evaluator saw and the report (but its timings and digest-cache flags) are equal byte for byte, and a spy
proves the kernels ran: greedy soup's running sum and learned soup's mixture through
`soupkit.kernels.RunningSumOps`, a sweep's candidates through the engine's in-memory sink
(`soupkit.engine.core._Engine._kernel_piece`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import soup_toy as toy
import torch
from safetensors.torch import load_file
from test_greedy import KINDS, assert_same_bits
from test_learned import ToyLinear
from test_sweep import GRID, opposite_pair

import soupkit.kernels as kernels
from soupkit.engine import core
from soupkit.search import greedy_soup
from soupkit.search.learned import learned_soup
from soupkit.search.sweeps import sweep

pytestmark = pytest.mark.skipif(
    kernels.best_isa() is None, reason="soupkit's native kernels are not built; run `make kernels`"
)


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Counts of kernel calls: ``sum`` (RunningSumOps) and ``engine`` (elementwise pieces)."""
    calls = {"sum": 0, "engine": 0}
    run, piece = kernels.RunningSumOps._run, core._Engine._kernel_piece

    def counted_run(self: kernels.RunningSumOps, *a: Any) -> None:
        calls["sum"] += 1
        run(self, *a)

    def counted_piece(self: core._Engine, *a: Any) -> bool:
        calls["engine"] += 1
        return piece(self, *a)

    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(kernels.RunningSumOps, "_run", counted_run)
    monkeypatch.setattr(core._Engine, "_kernel_piece", counted_piece)
    yield calls


# what differs between two runs of the same search: the report's clock (a second can pass
# between the runs), timings, and whether a file's digest was read from the digest cache (the
# second run finds it there)
_RUN_KEYS = {"created_unix", "seconds", "sha256_from_cache"}


def _without_timings(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k not in _RUN_KEYS}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


def on_and_off(
    monkeypatch: pytest.MonkeyPatch, spies: dict[str, int], tmp: Path, run: Callable[[Path], Any]
) -> tuple[dict[str, int], list[Any]]:
    """``run(out)`` with the kernels on, then off: the kernel calls of the first run (none in
    the second) and each run's (output, report without timings, result)."""
    got, ran = [], []
    for on in (True, False):
        monkeypatch.setenv(kernels.DISABLE_ENV, "1" if on else "0")
        before = dict(spies)
        out = tmp / ("on" if on else "off")
        result = run(out)
        report = json.loads((out / "soupkit-report.json").read_text())
        got.append((load_file(str(out / "model.safetensors")), _without_timings(report), result))
        ran.append({k: spies[k] - before[k] for k in spies})
    assert ran[1] == {"sum": 0, "engine": 0}  # off: no kernel at all
    return ran[0], got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_soup_same_bytes_with_and_without_kernels(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    spies: dict[str, int],
    dtype: torch.dtype,
) -> None:
    if dtype == torch.float16:  # the kernels read float16 while torch converts on one thread
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(before))
    paths = toy.make_ingredients(tmp_path / "in", KINDS, dtype=dtype, seed=1)
    _, xv, yv, xt, yt = toy.problem(1)
    vals = []

    def run(out: Path) -> Any:
        vals.append(toy.Accuracy(xv, yv))
        test = toy.Accuracy(xt, yt, key="test")
        return greedy_soup(paths, vals[-1], out, test_evaluator=test, progress=False, plot=False)

    ran, ((m_on, rep_on, r_on), (m_off, rep_off, r_off)) = on_and_off(
        monkeypatch, spies, tmp_path, run
    )
    # the first ingredient, one add and one candidate mean per accepted step at least
    assert ran["sum"] >= 3, ran
    assert len(r_on.ingredients) >= 3
    assert_same_bits(m_on, m_off)
    assert rep_on == rep_off
    assert len(vals[0].states) == len(vals[1].states)
    for a, b in zip(vals[0].states, vals[1].states):
        assert_same_bits(a, b)


def test_sweep_candidates_run_on_the_engines_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spies: dict[str, int]
) -> None:
    zs, ft, _ = opposite_pair(tmp_path / "in")
    for p in (zs, ft):  # bfloat16 checkpoints: the kernels convert and round
        sd = load_file(str(p / "model.safetensors"))
        toy.write(
            p, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
        )
    _, xv, yv, _, _ = toy.problem()
    vals = []

    def run(out: Path) -> Any:
        vals.append(toy.Accuracy(xv, yv))
        return sweep([zs, ft], vals[-1], GRID, out, method="wise_ft", plot=False, progress=False)

    ran, ((m_on, rep_on, _), (m_off, rep_off, _)) = on_and_off(monkeypatch, spies, tmp_path, run)
    # every float tensor of every candidate, and the written model
    assert ran["engine"] >= 2 * (len(GRID) + 1), ran
    assert_same_bits(m_on, m_off)
    assert rep_on == rep_off
    for a, b in zip(vals[0].states, vals[1].states, strict=True):
        assert_same_bits(a, b)


def test_learned_soup_mixture_runs_on_the_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spies: dict[str, int]
) -> None:
    kinds = ["good", "perm", "good", "noisy"]
    paths = toy.make_ingredients(tmp_path / "in", kinds, dtype=torch.bfloat16)
    _, xv, yv, _, _ = toy.problem()
    batches = [(xv[i : i + 100], yv[i : i + 100]) for i in range(0, 1000, 100)]
    models = []

    def run(out: Path) -> Any:
        models.append(ToyLinear().to(torch.bfloat16))
        return learned_soup(
            paths,
            batches,
            out,
            model=models[-1],
            steps=5,
            lr=0.1,
            per_tensor=True,
            loss_fn=lambda m, b: torch.nn.functional.cross_entropy(
                m(b[0].to(torch.bfloat16)).float(), b[1]
            ),
            plot=False,
            progress=False,
        )

    ran, ((m_on, rep_on, r_on), (m_off, rep_off, r_off)) = on_and_off(
        monkeypatch, spies, tmp_path, run
    )
    # 6 mixtures (5 steps and the final one) of 2 float tensors, 4 ingredients each
    assert ran["sum"] == 6 * 2 * 4, ran
    assert_same_bits(m_on, m_off)
    assert_same_bits(models[0].state_dict(), models[1].state_dict())
    assert r_on.losses == r_off.losses and r_on.coefficients == r_off.coefficients
    assert rep_on == rep_off
