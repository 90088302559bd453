"""nuslerp, multislerp, karcher, sce, arcee_fusion, nearswap, ram, ramplus_tl: hand-computed
values, invariants (hypothesis), recipe handling and errors. Bit-identity with mergekit is in
test_mergekit_more_methods.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soupkit
from soupkit import methods

from .helpers import base_state, finetunes, write


def run(
    method: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
    **params: Any,
) -> torch.Tensor:
    spec = methods.get(method)
    p = spec.params.model_validate(
        {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    )
    xs = [t.clone() for t in tensors]
    return spec.call(xs, p, base=None if base is None else base.clone(), rng=rng)


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# --- hand-computed values ------------------------------------------------------------------


def test_nuslerp_hand_examples() -> None:
    e1, e2 = t(1, 0), t(0, 1)
    r = math.sqrt(0.5)
    torch.testing.assert_close(run("nuslerp", [e1, e2], weight=[1.0, 1.0]), t(r, r))
    # weights 2 : 1 -> t = 1/3 of the quarter circle: (cos 30deg, sin 30deg)
    torch.testing.assert_close(
        run("nuslerp", [e1, e2], weight=[2.0, 1.0]), t(math.sqrt(3) / 2, 0.5)
    )
    # around a base: the same arc, shifted
    b = t(5, -5)
    torch.testing.assert_close(
        run("nuslerp", [b + e1, b + e2], base=b, weight=[1.0, 1.0]), b + t(r, r)
    )
    # colinear inputs fall back to linear interpolation
    torch.testing.assert_close(run("nuslerp", [e1, 3 * e1], weight=[1.0, 1.0]), t(2, 0))
    # weights that cancel: t = 0.5, as mergekit
    torch.testing.assert_close(run("nuslerp", [e1, e2], weight=[1.0, -1.0]), t(r, r))


def test_nuslerp_rows_and_columns() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    r = math.sqrt(0.5)
    rows = run("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[r, r], [0.0, 2.0]]))  # row 2 colinear: linear
    cols = run(
        "nuslerp",
        [a.T.contiguous(), b.T.contiguous()],
        weight=[1.0, 1.0],
        nuslerp_flatten=False,
        nuslerp_row_wise=True,
    )
    torch.testing.assert_close(cols, rows.T)


def test_multislerp_hand_examples() -> None:
    e1, e2 = t(1, 0), t(0, 1)
    r = math.sqrt(0.5)
    torch.testing.assert_close(run("multislerp", [e1, e2], weight=[1.0, 1.0]), t(r, r))
    # the norm of the result is the weighted mean of the input norms
    torch.testing.assert_close(run("multislerp", [2 * e1, 4 * e2], weight=[1.0, 1.0]), 3 * t(r, r))
    # one model: that model, whatever the base
    assert torch.equal(run("multislerp", [t(1, 2)], base=t(9, 9), weight=[3.0]), t(1, 2))
    # two antipodal inputs with equal weights: mergekit's linear fall-back (the weighted sum, 0 here)
    torch.testing.assert_close(run("multislerp", [e1, -e1], weight=[1.0, 1.0]), t(0, 0))


def test_karcher_hand_examples() -> None:
    e1, e2 = t(1, 0), t(0, 1)
    r = math.sqrt(0.5)
    torch.testing.assert_close(run("karcher", [2 * e1, 2 * e2]), 2 * t(r, r))
    # colinear inputs: their direction, scaled by the mean norm
    torch.testing.assert_close(run("karcher", [t(1, 1), t(3, 3)]), t(2, 2))
    # the mean of three directions spread over a quarter circle is the middle one
    c, s = math.cos(math.pi / 4), math.sin(math.pi / 4)
    torch.testing.assert_close(run("karcher", [e1, t(c, s), e2], max_iter=50, tol=1e-7), t(c, s))
    # all zero: zero
    assert torch.equal(run("karcher", [t(0, 0), t(0, 0)]), t(0, 0))


def test_sce_hand_example() -> None:
    base = t(10, 10)
    d1, d2 = t(1, -1), t(3, 2)
    # energies 1 and 6.5 -> c = (1, 6.5) / 7.5; elected signs (+, +); d1's -1 is erased
    want = base + t((1 * 1 + 6.5 * 3) / 7.5, 2.0)
    torch.testing.assert_close(run("sce", [base + d1, base + d2], base=base), want)
    # select_topk 0.5 keeps the entry with the larger variance across models (the second)
    torch.testing.assert_close(
        run("sce", [base + d1, base + d2], base=base, select_topk=0.5),
        base + t(0, (1 * 0 + 6.5 * 2) / 7.5 / (6.5 / 7.5)),
    )


def test_arcee_fusion_hand_example() -> None:
    base = torch.zeros(1, 8)
    d = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 100]])
    # one row: importance = |d| * KL (one KL for the row); quartiles at sorted indices 1, 3, 5
    # are 2, 4, 6 (times KL), the fence is 4 + 1.5 * 4 = 10: only 100 stands out
    out = run("arcee_fusion", [base + d], base=base)
    assert torch.equal(out, torch.tensor([[0.0] * 7 + [100.0]]))


def test_nearswap_hand_example() -> None:
    base, other = t(0, 0, 0, 1), t(0.01, 0.5, -2, 1)
    # w = clamp(0.1 / |diff|): 1 (close: take it), 0.2, 0.05 (far: damped), and 1 for no change
    torch.testing.assert_close(run("nearswap", [other], base=base, t=0.1), t(0.01, 0.1, -0.1, 1))


def test_ram_hand_examples() -> None:
    base = t(1, 1, 1, 1)
    d1, d2 = t(1, 0, 2, 0), t(3, 0, 0, 4)
    # entry 0 shared (mean), 1 untouched, 2 and 3 unique (whole)
    assert torch.equal(run("ram", [base + d1, base + d2], base=base), base + t(2, 0, 2, 4))
    # RAM+: each model shares 1 entry and owns 1: rho = 1, lambda = 1 + 0.5 * min(1, 0.2) = 1.1
    torch.testing.assert_close(
        run("ramplus_tl", [base + d1, base + d2], base=base, r=0.5, alpha=0.2),
        base + t(2, 0, 2.2, 4.4),
    )
    # epsilon: a change of at most epsilon does not count (and is dropped)
    assert torch.equal(
        run("ram", [base + t(0.5, 0, 0, 0), base + t(3, 0, 0, 0)], base=base, epsilon=1.0),
        base + t(3, 0, 0, 0),
    )


# --- invariants ----------------------------------------------------------------------------

SYMMETRIC = ["multislerp", "karcher", "sce", "ram", "ramplus_tl"]
WITH_BASE = {"multislerp": True, "karcher": False, "sce": True, "ram": True, "ramplus_tl": True}


def _per_model(method: str, n: int, weights: list[float]) -> dict[str, Any]:
    return {"weight": weights[:n]} if method in ("multislerp", "nuslerp") else {}


vectors = st.integers(0, 10_000).map(lambda s: torch.Generator().manual_seed(s))


@settings(max_examples=30, deadline=None)
@given(g=vectors, n=st.integers(2, 4), method=st.sampled_from(SYMMETRIC), data=st.data())
def test_symmetric_methods_are_permutation_invariant(
    g: torch.Generator, n: int, method: str, data: st.DataObject
) -> None:
    base = torch.randn(7, 5, generator=g)
    xs = [
        base + 0.1 * torch.randn(7, 5, generator=g) * (torch.rand(7, 5, generator=g) < 0.6)
        for _ in range(n)
    ]
    weights = [0.5 + i for i in range(n)]
    perm = data.draw(st.permutations(range(n)))
    b = base if WITH_BASE[method] else None
    one = run(method, xs, base=b, **_per_model(method, n, weights))
    two = run(
        method, [xs[i] for i in perm], base=b, **_per_model(method, n, [weights[i] for i in perm])
    )
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(g=vectors, w=st.floats(0.1, 5.0), with_base=st.booleans())
def test_nuslerp_swapping_the_models_swaps_the_weights(
    g: torch.Generator, w: float, with_base: bool
) -> None:
    base = torch.randn(6, 4, generator=g)
    a, b = base + torch.randn(6, 4, generator=g), base + torch.randn(6, 4, generator=g)
    bb = base if with_base else None
    torch.testing.assert_close(
        run("nuslerp", [a, b], base=bb, weight=[1.0, w]),
        run("nuslerp", [b, a], base=bb, weight=[w, 1.0]),
        rtol=1e-5,
        atol=1e-6,
    )


IDENTICAL: dict[str, dict[str, Any]] = {
    "nuslerp": {"weight": [0.3, 0.7]},
    "multislerp": {"weight": [1.0, 2.0, 0.5]},
    "karcher": {},
    "sce": {},
    "ram": {},
    "ramplus_tl": {},
}


@settings(max_examples=30, deadline=None)
@given(g=vectors, method=st.sampled_from(sorted(IDENTICAL)), scale=st.floats(0.01, 10.0))
def test_identical_ingredients_are_a_fixed_point(
    g: torch.Generator, method: str, scale: float
) -> None:
    base = torch.randn(5, 6, generator=g)
    x = base + scale * torch.randn(5, 6, generator=g)
    n = len(IDENTICAL[method].get("weight", [0, 0, 0]))
    b = None if method == "karcher" else base
    torch.testing.assert_close(
        run(method, [x] * n, base=b, **IDENTICAL[method]), x, rtol=1e-5, atol=1e-5 * scale
    )


def test_sce_selection_drops_what_identical_models_agree_on() -> None:
    # select_topk ranks entries by their variance across models: identical models have none,
    # so nothing is selected and the result is the base (mergekit's and the paper's rule)
    base = t(1, 2, 3)
    assert torch.equal(run("sce", [base + t(1, 1, 1)] * 3, base=base, select_topk=0.5), base)


@settings(max_examples=20, deadline=None)
@given(g=vectors, t_=st.floats(0.0, 1.0))
def test_nearswap_and_arcee_fusion_of_the_base_itself_give_the_base(
    g: torch.Generator, t_: float
) -> None:
    base = torch.randn(4, 9, generator=g)
    assert torch.equal(run("arcee_fusion", [base], base=base), base)
    # w * b + (1 - w) * b: the base up to one rounding (w < 1 when t < 1e-6)
    torch.testing.assert_close(run("nearswap", [base], base=base, t=t_), base, rtol=5e-7, atol=0)


ZERO_DELTA: dict[str, dict[str, Any]] = {
    "nuslerp": {"weight": [1.0, 2.0]},
    "multislerp": {"weight": [1.0, 1.0, 1.0]},
    "sce": {"select_topk": 0.3},
    "ram": {},
    "ramplus_tl": {},
}


@settings(max_examples=20, deadline=None)
@given(g=vectors, method=st.sampled_from(sorted(ZERO_DELTA)))
def test_zero_task_vectors_give_the_base(g: torch.Generator, method: str) -> None:
    base = torch.randn(3, 8, generator=g)
    n = len(ZERO_DELTA[method].get("weight", [0, 0, 0]))
    assert torch.equal(run(method, [base] * n, base=base, **ZERO_DELTA[method]), base)


def test_multislerp_cancelling_directions_name_the_tensor(tmp_path: Path) -> None:
    base = base_state(0)
    a = {k: (v + 1 if v.is_floating_point() else v) for k, v in base.items()}
    b = {k: (v - 1 if v.is_floating_point() else v) for k, v in base.items()}
    c = {k: v.clone() for k, v in base.items()}
    c["model.norm.weight"] = c["model.norm.weight"] + 0.0
    with pytest.raises(
        soupkit.MethodInputError, match=r"tensor '.*': multislerp: the weighted mean direction"
    ):
        soupkit.merge_state_dicts(
            [a, b, c],
            "multislerp",
            base=base,
            model_parameters=[{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}],
        )


# --- recipes -------------------------------------------------------------------------------


def _models(tmp_path: Path, n: int) -> tuple[Path, list[Path]]:
    base = base_state(1)
    fts = finetunes(base, n, scale=0.3)
    return write(tmp_path / "base", base), [
        write(tmp_path / f"ft{i}", s) for i, s in enumerate(fts)
    ]


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_weight_defaults_to_one(method: str, tmp_path: Path) -> None:
    # mergekit requires `weight` here; soupkit, as for every weight, defaults it to 1.0
    base, fts = _models(tmp_path, 2)
    models = [{"model": str(f)} for f in fts]
    plan = soupkit.plan({"merge_method": method, "base_model": str(base), "models": models})
    assert {j.params.weight for j in plan.jobs if not j.is_copy} == {(1.0, 1.0)}


def test_nearswap_needs_t(tmp_path: Path) -> None:
    base, fts = _models(tmp_path, 1)
    with pytest.raises(soupkit.ConfigError, match="parameter t: Field required"):
        soupkit.plan(
            {
                "merge_method": "nearswap",
                "base_model": str(base),
                "models": [{"model": str(fts[0])}],
            }
        )


def test_optional_base_is_used_only_when_named(tmp_path: Path) -> None:
    base, fts = _models(tmp_path, 2)
    models = [{"model": str(f), "parameters": {"weight": 1.0}} for f in fts]
    with_base = soupkit.plan({"merge_method": "nuslerp", "base_model": str(base), "models": models})
    without = soupkit.plan({"merge_method": "nuslerp", "models": models})
    assert all(j.base is not None for j in with_base.jobs if not j.is_copy)
    assert all(j.base is None for j in without.jobs)
    # the base listed among the models is the base, not a third model
    listed = soupkit.plan(
        {
            "merge_method": "nuslerp",
            "base_model": str(base),
            "models": [{"model": str(base)}, *models],
        }
    )
    assert all(len(j.inputs) == 2 for j in listed.jobs if not j.is_copy)


def test_karcher_takes_the_base_as_one_more_input(tmp_path: Path) -> None:
    base, fts = _models(tmp_path, 2)
    appended = soupkit.plan(
        {
            "merge_method": "karcher",
            "base_model": str(base),
            "models": [{"model": str(f)} for f in fts],
        }
    )
    assert all(len(j.inputs) == 3 and j.base is None for j in appended.jobs if not j.is_copy)
    listed = soupkit.plan(
        {
            "merge_method": "karcher",
            "base_model": str(base),
            "models": [{"model": str(fts[0])}, {"model": str(base)}, {"model": str(fts[1])}],
        }
    )
    assert [m.label for m in listed.models] == [str(fts[0]), str(base), str(fts[1])]
    assert [m.label for m in appended.models] == [str(fts[0]), str(fts[1]), str(base)]


def test_optional_base_in_slices_must_be_a_source(tmp_path: Path) -> None:
    base, fts = _models(tmp_path, 2)
    recipe = {
        "merge_method": "nuslerp",
        "base_model": str(base),
        "slices": [
            {
                "sources": [
                    {"model": str(f), "layer_range": [0, 2], "parameters": {"weight": 1.0}}
                    for f in fts
                ]
            }
        ],
    }
    with pytest.raises(soupkit.ConfigError, match="is not one of its sources"):
        soupkit.plan(recipe)


def test_arcee_fusion_samples_large_tensors_reproducibly() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1001, 1000, generator=g)
    other = base + 0.01 * torch.randn(1001, 1000, generator=g)
    outs = [
        run("arcee_fusion", [other], base=base, rng=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(outs[0], outs[1])
    # another draw moves the fence a little: the same entries, give or take a few near it
    taken = [(o != base) for o in outs]
    assert 0 < int(taken[0].sum()) < 0.2 * base.numel()
    assert int((taken[0] ^ taken[2]).sum()) < 0.01 * int(taken[0].sum())
    with pytest.raises(ValueError, match="pass rng"):
        run("arcee_fusion", [other], base=base)


# --- CLI -----------------------------------------------------------------------------------

NEW = ("nuslerp", "multislerp", "karcher", "sce", "arcee_fusion", "nearswap", "ram", "ramplus_tl")


def test_cli_lists_and_runs_the_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from soupkit.cli import main

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    names = {line.split()[0] for line in listing.splitlines() if line and not line[0].isspace()}
    assert set(NEW) <= names
    assert "optional base" in listing and "base is one more input" in listing
    base, fts = _models(tmp_path, 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: karcher\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {f}\n" for f in fts)
    )
    assert main(["plan", str(recipe)]) == 0
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "with karcher" in capsys.readouterr().out


def test_cli_reports_a_tensor_multislerp_cannot_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from soupkit.cli import main

    base = base_state(0)
    dirs = [write(tmp_path / "base", base)]
    for i, shift in enumerate((1.0, -1.0, 0.0)):
        dirs.append(
            write(
                tmp_path / f"m{i}",
                {k: (v + shift if v.is_floating_point() else v) for k, v in base.items()},
            )
        )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: multislerp\nbase_model: {dirs[0]}\nmodels:\n"
        + "".join(f"  - model: {d}\n" for d in dirs[1:])
    )
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (
        "multislerp: the weighted mean direction of the 3 models is zero" in err
        and "tensor '" in err
    )
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
