"""TIES: the paper's worked shape by hand, PEFT and mergekit cross-checks, global trim."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

import soupkit
from soupkit import methods
from soupkit.engine.prepass import global_stats
from soupkit.io.checkpoint import in_memory_checkpoint
from soupkit.io.reader import TensorReader
from soupkit.methods.ties import TiesParams
from soupkit.planning.plan import make_plan

from .helpers import base_state, finetunes

ties = methods.get("ties")

TAU = [
    torch.tensor([0.5, -0.125, 0.25, -0.75, 0.0625]),
    torch.tensor([-0.375, 0.1875, 0.625, -0.125, 0.6875]),
    torch.tensor([0.25, 0.875, -0.1875, 0.375, -0.5625]),
]


def params(n: int = 3, **kw: Any) -> TiesParams:
    kw.setdefault("weight", (1.0,) * n)
    kw.setdefault("density", (1.0,) * n)
    kw.setdefault(
        "convention", "paper"
    )  # these tests pin the paper's arithmetic (mergekit's is the default)
    return TiesParams.model_validate(kw)


def merged_delta(deltas: list[torch.Tensor], p: TiesParams) -> torch.Tensor:
    return ties.fn([d.clone() for d in deltas], p)


def test_paper_worked_example_trim_elect_disjoint_mean() -> None:
    # Trim (k = int(0.6 * 5) = 3 per task vector):
    #   tau1 -> [ 0.5,   0,     0.25,  -0.75, 0      ]
    #   tau2 -> [-0.375, 0,     0.625,  0,    0.6875 ]
    #   tau3 -> [ 0,     0.875, 0,      0.375,-0.5625]
    # Elect: sum = [0.125, 0.875, 0.875, -0.375, 0.125] -> signs [+, +, +, -, +]
    # Disjoint mean over agreeing entries: [0.5, 0.875, (0.25+0.625)/2, -0.75, 0.6875]
    p = params(density=(0.6,) * 3)
    assert merged_delta(TAU, p).tolist() == [0.5, 0.875, 0.4375, -0.75, 0.6875]
    # through the engine, with a base: theta = base + lambda * tau
    base = {"w": torch.ones(5)}
    states = [{"w": base["w"] + t} for t in TAU]
    out = soupkit.merge_state_dicts(
        states, "ties", base=base, parameters={"density": 0.6, "lambda": 2.0, "convention": "paper"}
    )
    assert out["w"].tolist() == [2.0, 2.75, 1.875, -0.5, 2.375]


def test_sign_tie_rule_paper_zero_versus_positive() -> None:
    a, b = torch.tensor([0.5, 0.25]), torch.tensor([-0.5, 0.25])
    assert merged_delta([a, b], params(2)).tolist() == [0.0, 0.25]
    assert merged_delta([a, b], params(2, sign_tie="positive")).tolist() == [0.5, 0.25]


def test_weights_mean_weighted_mean_and_sum() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    w = (1.0, 3.0)
    # paper / PEFT: weighted deltas over the count of agreeing models
    assert merged_delta([a, b], params(2, weight=w)).tolist() == [(1 + 9) / 2, 2.0]
    # mergekit: weighted sign vote (2 - 3 < 0 at index 1 elects -) and divide by the weights
    mk = params(2, weight=w, convention="mergekit")
    assert merged_delta([a, b], mk).tolist() == [(1 + 9) / 4, -3.0 / 3.0]
    # mergekit's normalize key selects the aggregation
    assert merged_delta([a, b], params(2, weight=w, normalize=False)).tolist() == [10.0, 2.0]
    with pytest.raises(ValueError, match="normalize: true means aggregation 'weighted_mean'"):
        params(2, normalize=True, aggregation="mean")


def mergekit_ties(
    deltas: list[torch.Tensor],
    weights: list[float],
    density: float,
    normalize: bool = True,
    lam: float = 1.0,
) -> torch.Tensor:
    """mergekit's GeneralizedTaskArithmeticMerge for `ties` (sparsify.magnitude + get_mask 'sum'),
    transcribed from mergekit/merge_methods/generalized_task_arithmetic.py and sparsify.py."""
    tvs = []
    for d in deltas:
        k = int(density * d.numel())
        mask = torch.zeros_like(d)
        topk = torch.argsort(d.abs().view(-1), descending=True)[:k]
        mask.view(-1)[topk] = 1
        tvs.append(d * mask)
    stacked = torch.stack(tvs, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype)
    while len(stacked.shape) > len(w.shape):
        w.unsqueeze_(-1)
    wd = stacked * w
    sign = wd.sign()
    majority = (wd.sum(dim=0) >= 0).to(wd.dtype) * 2 - 1
    mask = sign == majority
    mixed = (wd * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_mergekit_convention_matches_mergekit_bit_for_bit(n: int, density: float) -> None:
    g = torch.Generator().manual_seed(n)
    deltas = [torch.randn(17, 13, generator=g) for _ in range(n)]
    weights = [0.3, 1.0, 0.7, 1.5][:n]
    ours = merged_delta(
        deltas,
        params(
            n,
            weight=tuple(weights),
            density=(density,) * n,
            convention="mergekit",
            **{"lambda": 0.8},
        ),
    )
    assert torch.equal(ours, mergekit_ties(deltas, weights, density, lam=0.8))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_peft_convention_matches_peft_ties_bit_for_bit(
    n: int, density: float, sign_method: str
) -> None:
    g = torch.Generator().manual_seed(10 + n)
    deltas = [torch.randn(31, 7, generator=g) for _ in range(n)]
    weights = [0.5, 1.25, 0.75, 2.0][:n]
    want = merge_utils.ties(
        [d.clone() for d in deltas], torch.tensor(weights), density, sign_method
    )
    p = params(
        n,
        weight=tuple(weights),
        density=(density,) * n,
        convention="peft",
        sign_source="unweighted" if sign_method == "total" else "count",
    )
    assert torch.equal(merged_delta(deltas, p), want)


def test_peft_ties_beyond_four_models_agrees_to_rounding() -> None:
    # PEFT sums with torch.stack(...).sum(0), whose order differs from left to right beyond 4 models.
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(64, generator=g) for _ in range(7)]
    want = merge_utils.ties([d.clone() for d in deltas], torch.ones(7), 0.5)
    got = merged_delta(deltas, params(7, density=(0.5,) * 7, convention="peft"))
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(2, 5), density=st.floats(0.05, 1.0))
def test_permutation_and_negation_symmetry(data: st.DataObject, n: int, density: float) -> None:
    vals = st.lists(
        st.sampled_from([0.0, 0.25, -0.25, 0.5, -0.5, 1.0, -1.0, 2.0]), min_size=6, max_size=6
    )
    deltas = [torch.tensor(data.draw(vals)) for _ in range(n)]
    p = params(n, density=(density,) * n, trim_scope="per_tensor")
    perm = data.draw(st.permutations(range(n)))
    out = merged_delta(deltas, p)
    assert torch.equal(out, merged_delta([deltas[i] for i in perm], p))
    # the paper's sgn(0) = 0 rule makes TIES odd: ties(-tau) == -ties(tau)
    assert torch.equal(merged_delta([-d for d in deltas], p), -out)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), density=st.floats(0.05, 1.0))
def test_identical_task_vectors_and_zero_deltas(n: int, density: float) -> None:
    d = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.125, 0.0])
    trimmed = merged_delta([d], params(1, density=(density,)))
    assert torch.equal(merged_delta([d] * n, params(n, density=(density,) * n)), trimmed)
    assert torch.equal(
        merged_delta([torch.zeros(6)] * n, params(n, density=(density,) * n)), torch.zeros(6)
    )


# ---------------------------------------------------------------------------- global trim


def _plan(
    base: dict[str, torch.Tensor],
    fts: list[dict[str, torch.Tensor]],
    parameters: dict[str, Any],
    model_parameters: list[dict[str, Any]] | None = None,
) -> soupkit.MergePlan:
    cfg = soupkit.load_recipe(
        {
            "merge_method": "ties",
            "base_model": "b",
            "parameters": {"convention": "paper", **parameters},
            "models": [
                {"model": f"m{i}", "parameters": (model_parameters or [{}] * len(fts))[i]}
                for i in range(len(fts))
            ],
        }
    )
    return make_plan(
        cfg,
        [in_memory_checkpoint(s, f"m{i}") for i, s in enumerate(fts)],
        in_memory_checkpoint(base, "b"),
        chunk_elems=7,
    )


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.93])
def test_streaming_global_threshold_equals_kthvalue_of_the_concatenation(density: float) -> None:
    base = base_state()
    fts = finetunes(base, 3)
    p = _plan(base, fts, {"density": density})
    with TensorReader() as reader:
        cuts = global_stats(p, reader)
    names = sorted(j.name for j in p.jobs if not j.is_copy)
    assert sorted(cuts) == names
    for i, ft in enumerate(fts):
        everything = torch.cat([(ft[n] - base[n]).abs().reshape(-1) for n in names])
        k = int(density * everything.numel())
        kth_largest = torch.kthvalue(everything, everything.numel() - k + 1).values
        for n in names:  # every tensor is cut at the model's one global threshold
            cut = cuts[n].cuts[i][0]  # type: ignore[attr-defined]
            assert cut is not None and cut.threshold == float(kth_largest)
    # and the merge keeps exactly k entries of each model's whole task vector
    out = soupkit.merge_state_dicts(
        [fts[0]], "ties", base=base, parameters={"density": density, "convention": "paper"}
    )
    kept = sum(int((out[n] != base[n]).sum()) for n in names)
    assert kept == int(density * sum(base[n].numel() for n in names))


def test_global_versus_per_tensor_hand_example() -> None:
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    ft = {"a": torch.tensor([4.0, -3.0]), "b": torch.tensor([0.5, 2.0])}
    glob = soupkit.merge_state_dicts(
        [ft], "ties", base=base, parameters={"density": 0.5, "convention": "paper"}
    )
    assert glob["a"].tolist() == [4.0, -3.0] and glob["b"].tolist() == [0.0, 0.0]
    local = soupkit.merge_state_dicts(
        [ft],
        "ties",
        base=base,
        parameters={"density": 0.5, "trim_scope": "per_tensor", "convention": "paper"},
    )
    assert local["a"].tolist() == [4.0, 0.0] and local["b"].tolist() == [0.0, 2.0]


def test_global_ties_at_the_threshold_go_to_the_first_tensor_by_name_then_index() -> None:
    base = {"b": torch.zeros(3), "a": torch.zeros(3), "c": torch.zeros(2)}
    ft = {
        "b": torch.tensor([1.0, 1.0, 5.0]),
        "a": torch.tensor([1.0, -1.0, 0.5]),
        "c": torch.tensor([1.0, 1.0]),
    }
    # N = 8, density 0.5 -> k = 4: 5.0 plus three of the six 1.0s: a[0], a[1] then b[0]
    out = soupkit.merge_state_dicts(
        [ft], "ties", base=base, parameters={"density": 0.5, "convention": "paper"}, chunk_elems=2
    )
    assert out["a"].tolist() == [1.0, -1.0, 0.0]
    assert out["b"].tolist() == [1.0, 0.0, 5.0]
    assert out["c"].tolist() == [0.0, 0.0]


def test_global_trim_needs_one_density_per_model() -> None:
    base = base_state()
    fts = finetunes(base, 2)
    with pytest.raises(
        soupkit.ConfigError, match="trim_scope: global trims each model's whole task vector"
    ):
        _plan(base, fts, {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}]})
    # per-tensor densities are fine with per-tensor scope
    _plan(
        base,
        fts,
        {"density": [{"filter": "mlp", "value": 0.3}, {"value": 0.5}], "trim_scope": "per_tensor"},
    )


def test_global_trim_is_independent_of_chunking_and_tensor_order() -> None:
    base = base_state()
    fts = finetunes(base, 3)
    a = soupkit.merge_state_dicts(
        fts, "ties", base=base, parameters={"density": 0.3, "convention": "paper"}, chunk_elems=5
    )
    rev = {k: base[k] for k in reversed(list(base))}
    b = soupkit.merge_state_dicts(
        [{k: f[k] for k in rev} for f in fts],
        "ties",
        base=rev,
        parameters={"density": 0.3, "convention": "paper"},
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_a_nan_in_a_task_vector_is_not_trimmed_away(scope: str) -> None:
    # NaN ranks above every magnitude, so it survives the trim and the engine names the input
    base = {"a": torch.zeros(4)}
    ft = {"a": torch.tensor([1.0, float("nan"), 2.0, 3.0])}
    with pytest.raises(soupkit.NonFiniteError, match="state_dict 0 holds 1 NaN"):
        soupkit.merge_state_dicts(
            [ft],
            "ties",
            base=base,
            parameters={"density": 0.5, "trim_scope": scope, "convention": "paper"},
        )
