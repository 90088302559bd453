"""Task arithmetic: hand example, PEFT / mergekit cross-checks, properties, and `TaskVector`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils
from safetensors.torch import load_file

import soupkit
from soupkit import TaskVector, methods
from soupkit.methods.breadcrumbs import BreadcrumbsParams
from soupkit.methods.task_arithmetic import TaskArithmeticParams

from .helpers import base_state, finetunes, write

ta = methods.get("task_arithmetic")


def test_hand_example() -> None:
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    a = {"w": torch.tensor([2.0, 2.0, 2.0])}  # tau_a = [1, 0, -1]
    b = {"w": torch.tensor([1.0, 4.0, 3.0])}  # tau_b = [0, 2, 0]
    out = soupkit.merge_state_dicts(
        [a, b],
        "task_arithmetic",
        base=base,
        model_parameters=[{"weight": 1.0}, {"weight": -0.5}],
        parameters={"lambda": 2.0},
    )
    # base + 2 * (tau_a - 0.5 tau_b) = [1,2,3] + 2 * [1, -1, -1]
    assert out["w"].tolist() == [3.0, 0.0, 1.0]
    normalized = soupkit.merge_state_dicts(
        [a, b],
        "task_arithmetic",
        base=base,
        model_parameters=[{"weight": 3.0}, {"weight": 1.0}],
        parameters={"normalize": True},
    )
    assert normalized["w"].tolist() == [1.75, 2.5, 2.25]  # base + (3 tau_a + tau_b) / 4


def test_normalize_with_zero_weight_sum_is_a_config_error() -> None:
    base = {"w": torch.zeros(2)}
    with pytest.raises(soupkit.ConfigError, match="weights sum to zero"):
        soupkit.merge_state_dicts(
            [base, base],
            "task_arithmetic",
            base={"w": torch.ones(2)},
            model_parameters=[{"weight": 1.0}, {"weight": -1.0}],
            parameters={"normalize": True},
        )


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_peft_task_arithmetic_bit_for_bit(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    deltas = [torch.randn(23, 5, generator=g) for _ in range(n)]
    w = [0.4, 1.3, -0.7, 2.0][:n]
    want = merge_utils.task_arithmetic([d.clone() for d in deltas], torch.tensor(w))
    got = ta.fn([d.clone() for d in deltas], TaskArithmeticParams(weight=tuple(w)))
    assert torch.equal(got, want)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_magnitude_prune_is_breadcrumbs_without_outliers_bit_for_bit(density: float) -> None:
    # PEFT's magnitude_prune = per-tensor top-k trim + weighted sum (its docstring says
    # "task arithmetic"); in soupkit that is breadcrumbs with gamma 0.
    g = torch.Generator().manual_seed(7)
    deltas = [torch.randn(40, 3, generator=g) for _ in range(3)]
    w = [0.5, 1.0, 1.5]
    want = merge_utils.magnitude_prune([d.clone() for d in deltas], torch.tensor(w), density)
    p = BreadcrumbsParams(weight=tuple(w), density=(density,) * 3, gamma=(0.0,) * 3)
    assert torch.equal(methods.get("breadcrumbs").fn([d.clone() for d in deltas], p), want)


def mergekit_task_arithmetic(
    deltas: list[torch.Tensor], weights: list[float], normalize: bool, lam: float
) -> torch.Tensor:
    """mergekit's GTA with no sparsification and no consensus (transcribed)."""
    stacked = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype)
    while len(stacked.shape) > len(w.shape):
        w.unsqueeze_(-1)
    mixed = (stacked * w).sum(dim=0)
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_mergekit_task_arithmetic_bit_for_bit(normalize: bool) -> None:
    g = torch.Generator().manual_seed(11)
    deltas = [torch.randn(9, 9, generator=g) for _ in range(3)]
    w = [0.2, 0.5, 0.9]
    got = ta.fn(
        [d.clone() for d in deltas],
        TaskArithmeticParams.model_validate({"weight": w, "normalize": normalize, "lambda": 0.7}),
    )
    assert torch.equal(got, mergekit_task_arithmetic(deltas, w, normalize, 0.7))


bf16 = st.floats(-64, 64, allow_nan=False, width=16)


@settings(max_examples=60, deadline=None)
@given(vals=st.lists(bf16, min_size=1, max_size=8), n=st.integers(1, 8))
def test_identical_finetunes_with_lambda_one_over_n_give_that_finetune(
    vals: list[float], n: int
) -> None:
    base = {"x": torch.zeros(len(vals))}
    ft = {"x": torch.tensor(vals)}
    # lambda = 1/n is exact only for powers of two; normalize (divide by n) is the exact spelling
    out = soupkit.merge_state_dicts(
        [ft] * n, "task_arithmetic", base=base, parameters={"normalize": True}
    )
    assert torch.equal(out["x"], ft["x"])
    if n & (n - 1) == 0:
        out = soupkit.merge_state_dicts(
            [ft] * n, "task_arithmetic", base=base, parameters={"lambda": 1 / n}
        )
        assert torch.equal(out["x"], ft["x"])


@settings(max_examples=40, deadline=None)
@given(vals=st.lists(bf16, min_size=1, max_size=8), n=st.integers(1, 5), lam=st.floats(-3, 3))
def test_zero_deltas_give_the_base(vals: list[float], n: int, lam: float) -> None:
    base = {"x": torch.tensor(vals)}
    out = soupkit.merge_state_dicts(
        [base] * n, "task_arithmetic", base={"x": torch.tensor(vals)}, parameters={"lambda": lam}
    )
    assert torch.equal(out["x"], base["x"])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-8, 8), min_size=4, max_size=4), min_size=2, max_size=4),
    data=st.data(),
)
def test_permutation_invariance_with_exact_sums(rows: list[list[int]], data: st.DataObject) -> None:
    base = {"x": torch.zeros(4)}
    states = [{"x": torch.tensor(r, dtype=torch.float32)} for r in rows]
    perm = data.draw(st.permutations(range(len(states))))
    a = soupkit.merge_state_dicts(states, "task_arithmetic", base=base)["x"]
    b = soupkit.merge_state_dicts([states[i] for i in perm], "task_arithmetic", base=base)["x"]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------- TaskVector


@pytest.fixture
def three(
    tmp_path: Path,
) -> tuple[Path, list[Path], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = base_state()
    fts = finetunes(base, 3)
    return (
        write(tmp_path / "base", base),
        [write(tmp_path / f"ft{i}", s) for i, s in enumerate(fts)],
        base,
        fts,
    )


def test_algebra_combines_coefficients(three) -> None:  # type: ignore[no-untyped-def]
    base_p, ft_p, _, _ = three
    a = TaskVector.from_checkpoints(ft_p[0], base_p)
    b = TaskVector.from_checkpoints(ft_p[1], base_p)
    c = TaskVector.from_checkpoints(ft_p[2], base_p)
    assert dict((Path(k).name, v) for k, v in (a + b).terms) == {
        "ft0": 1.0,
        "base": -2.0,
        "ft1": 1.0,
    }
    assert dict((Path(k).name, v) for k, v in TaskVector.analogy(a, b, c).terms) == {
        "ft0": 1.0,
        "base": -1.0,
        "ft1": -1.0,
        "ft2": 1.0,
    }
    assert (a - a).terms == []
    assert dict((Path(k).name, v) for k, v in (-(2 * a) / 4).terms) == {"ft0": -0.5, "base": 0.5}
    assert sum([a, b]).terms == (a + b).terms
    # the same folder under another spelling is the same term
    same = TaskVector.from_checkpoints(str(ft_p[0]) + "/", base_p)
    assert len((a - same).terms) == 0


def test_apply_to_equals_the_compiled_recipe_and_the_formula(three, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base_p, ft_p, base, fts = three
    a = TaskVector.from_checkpoints(ft_p[0], base_p)
    b = TaskVector.from_checkpoints(ft_p[1], base_p)
    edit = a - 0.5 * b
    r = edit.apply_to(base_p, tmp_path / "out", scale=0.8, progress=False)
    via_recipe = soupkit.merge(
        edit.to_recipe(base_p, scale=0.8), tmp_path / "recipe", progress=False
    )
    got = load_file(str(r.out / "model.safetensors"))
    want = load_file(str(via_recipe.out / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    for name, t in base.items():
        if not t.is_floating_point():
            assert torch.equal(got[name], t)
            continue
        formula = t + 0.8 * ((fts[0][name] - t) - 0.5 * (fts[1][name] - t))
        assert torch.allclose(got[name], formula, rtol=1e-6, atol=1e-6)


def test_in_memory_terms_and_a_different_target(three) -> None:  # type: ignore[no-untyped-def]
    _, _, base, fts = three
    tau = TaskVector.from_checkpoints(fts[0], base)
    delta = tau.state_dict()
    for name, t in base.items():
        if t.is_floating_point():
            assert torch.equal(delta[name], fts[0][name] - t)
    assert "model.position_ids" not in delta
    # apply a task vector taken on one model to another one
    other = fts[2]
    out = tau.apply_to_state_dict(other, scale=1.0)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(out[name], other[name] + (fts[0][name] - base[name]), atol=1e-6)
    with pytest.raises(
        soupkit.UsageError, match="in-memory state dicts, which a recipe cannot name"
    ):
        tau.to_recipe("somewhere")
    with pytest.raises(soupkit.UsageError, match="this task vector is zero"):
        (tau - tau).apply_to_state_dict(base)


def test_negation_forgets_and_restores(three) -> None:  # type: ignore[no-untyped-def]
    _, _, base, fts = three
    tau = TaskVector.from_checkpoints(fts[0], base)
    name = "model.layers.1.self_attn.q_proj.weight"
    back = (-tau).apply_to_state_dict(fts[0])  # ft - tau = base
    assert torch.allclose(back[name], base[name], atol=1e-6)
