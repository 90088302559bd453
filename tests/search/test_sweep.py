"""Sweeps: the known optimum, the engine's bits, every registered sweepable method, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soup_toy as toy
import torch
from safetensors.torch import load_file

from soupkit import merge_state_dicts, methods
from soupkit.errors import ConfigError, UsageError
from soupkit.search.sweeps import sweep, sweep_recipes

GRID = [0.0, 0.25, 0.5, 0.75, 1.0]


def opposite_pair(root: Path, seed: int = 0) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Zero-shot ``W + e`` and fine-tuned ``W - e``: the midpoint (alpha = 0.5) is exactly ``W``."""
    w = toy.problem(seed)[0]
    e = 0.9 * torch.randn(toy.C, toy.D, generator=torch.Generator().manual_seed(seed + 5))
    bias = torch.zeros(toy.C)
    zs = toy.write(
        root / "zero-shot", {"fc.weight": w + e, "fc.bias": bias, "fc.steps": torch.tensor([0])}
    )
    ft = toy.write(
        root / "fine-tuned", {"fc.weight": w - e, "fc.bias": bias, "fc.steps": torch.tensor([1])}
    )
    return zs, ft, {"fc.weight": w, "fc.bias": bias}


@pytest.mark.parametrize("method", ["wise_ft", "linear"])
def test_alpha_sweep_finds_the_known_optimum_and_writes_exactly_it(
    tmp_path: Path, method: str
) -> None:
    if method not in methods.REGISTRY:
        pytest.skip(f"{method} is not registered")
    zs, ft, _ = opposite_pair(tmp_path)
    _, xv, yv, xt, yt = toy.problem()
    r = sweep(
        [zs, ft],
        toy.Accuracy(xv, yv),
        GRID,
        tmp_path / "out",
        method=method,
        shift_evaluator=toy.Accuracy(xt, yt, key="shift"),
    )
    assert r.param == "alpha" and r.method == method
    assert r.best.value == 0.5 and r.best.score == 1.0
    assert [p.value for p in r.points] == GRID
    assert all(p.score < 1.0 for p in r.points if p.value != 0.5)
    assert all(p.shift_score is not None for p in r.points)
    # alpha = 0 and 1 are the two inputs themselves.
    assert r.points[0].score == toy.accuracy(load_file(str(zs / "model.safetensors")), xv, yv)
    assert r.points[-1].score == toy.accuracy(load_file(str(ft / "model.safetensors")), xv, yv)
    # The written model is the evaluated candidate, bit for bit, and the engine's own merge.
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    states = [load_file(str(x / "model.safetensors")) for x in (zs, ft)]
    if method == "wise_ft":
        ref = merge_state_dicts([states[1]], "wise_ft", base=states[0], parameters={"alpha": 0.5})
    else:
        ref = merge_state_dicts(
            states,
            "linear",
            parameters={"normalize": False},
            model_parameters=[{"weight": 0.5}, {"weight": 0.5}],
        )
    for k in ref:
        assert torch.equal(written[k], ref[k]), k
    report = json.loads((tmp_path / "out" / "soupkit-report.json").read_text())
    assert report["sweep"]["best"]["value"] == 0.5 and len(report["sweep"]["points"]) == len(GRID)
    assert report["recipe"]["merge_method"] == method
    assert (tmp_path / "out" / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_alpha_sweep_takes_base_plus_one_fine_tune(tmp_path: Path) -> None:
    zs, ft, _ = opposite_pair(tmp_path)
    _, xv, yv, _, _ = toy.problem()
    a = sweep([ft], toy.Accuracy(xv, yv), GRID, base=zs)
    b = sweep([zs, ft], toy.Accuracy(xv, yv), GRID)
    assert [p.score for p in a.points] == [p.score for p in b.points]
    with pytest.raises(UsageError, match="interpolates two models"):
        sweep([zs, ft], toy.Accuracy(xv, yv), GRID, base=zs)


def test_lambda_sweep_of_task_arithmetic(tmp_path: Path) -> None:
    if "task_arithmetic" not in methods.REGISTRY:
        pytest.skip("task_arithmetic is not registered")
    zs, ft, _ = opposite_pair(tmp_path)  # base + 0.5 * (ft - base) = W
    _, xv, yv, _, _ = toy.problem()
    r = sweep([ft], toy.Accuracy(xv, yv), [0.0, 0.5, 1.0, 1.5], method="task_arithmetic", base=zs)
    assert r.param == "lambda" and r.best.value == 0.5 and r.best.score == 1.0


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_density_sweep_scores_equal_the_in_memory_merge(tmp_path: Path, method: str) -> None:
    if method not in methods.REGISTRY:
        pytest.skip(f"{method} is not registered")
    kinds = ["good", "good", "good"]
    states = toy.states(kinds + ["perm"])
    base = toy.write(tmp_path / "base", states[3])
    paths = [toy.write(tmp_path / f"ft{i}", s) for i, s in enumerate(states[:3])]
    _, xv, yv, _, _ = toy.problem()
    grid = [0.2, 0.5, 0.8, 1.0]
    r = sweep(paths, toy.Accuracy(xv, yv), grid, method=method, base=base, seed=3)
    assert r.param == "density"
    for v, pt in zip(grid, r.points):
        ref = merge_state_dicts(
            states[:3], method, base=states[3], parameters={"density": v}, seed=3
        )
        assert pt.score == toy.accuracy(ref, xv, yv), v
    assert r.best.score == max(p.score for p in r.points)


def test_sweep_cache_and_tie_rule(tmp_path: Path) -> None:
    zs, ft, _ = opposite_pair(tmp_path)
    _, xv, yv, _, _ = toy.problem()
    ev = toy.Accuracy(xv, yv)
    cache = tmp_path / "c.jsonl"
    first = sweep([zs, ft], ev, GRID, cache=cache)
    assert ev.calls == len(GRID) and first.cache_hits == 0
    ev2 = toy.Accuracy(xv, yv)
    again = sweep([zs, ft], ev2, GRID[::-1], cache=cache)
    assert ev2.calls == 0 and again.cache_hits == len(GRID) and all(p.cached for p in again.points)
    assert {p.value: p.score for p in again.points} == {p.value: p.score for p in first.points}

    def flat(state):  # type: ignore[no-untyped-def]
        return 0.5

    tie = sweep([zs, ft], flat, [0.75, 0.25, 0.5])
    assert tie.best.value == 0.75  # equal scores: the value listed first


def test_configuration_problems_surface_before_any_evaluation(tmp_path: Path) -> None:
    zs, ft, _ = opposite_pair(tmp_path)
    called = []

    def ev(state):  # type: ignore[no-untyped-def]
        called.append(1)
        return 0.0

    with pytest.raises(UsageError, match="no values"):
        sweep([zs, ft], ev, [])
    with pytest.raises(UsageError, match="repeat"):
        sweep([zs, ft], ev, [0.5, 0.5])
    with pytest.raises(UsageError, match="needs a method"):
        sweep([zs, ft], ev, [0.5], param="density")
    if "ties" in methods.REGISTRY:
        with pytest.raises(ConfigError, match="density"):
            sweep([ft], ev, [0.0, 1.5], method="ties", base=zs)  # density must be in (0, 1]
    if "task_arithmetic" in methods.REGISTRY:
        with pytest.raises(ConfigError, match="unknown parameter 'gamma'"):
            sweep([ft], ev, [0.5], method="task_arithmetic", param="gamma", base=zs)
    assert not called


def test_sweep_recipes_are_plain_recipes(tmp_path: Path) -> None:
    zs, ft, _ = opposite_pair(tmp_path)
    name, param, recipes = sweep_recipes([zs, ft], [0.3], method="linear")
    assert (name, param) == ("linear", "alpha")
    cfg = recipes[0]
    assert [m.parameters["weight"] for m in cfg.models] == [pytest.approx(0.7), 0.3]
    assert cfg.parameters["normalize"] is False
