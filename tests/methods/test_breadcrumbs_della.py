"""Model Breadcrumbs and DELLA: hand examples, mergekit's counts and ranges, statistics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soupkit
from soupkit import methods
from soupkit.methods.breadcrumbs import BreadcrumbsParams, BreadcrumbsTiesParams
from soupkit.methods.della import DellaLinearParams, DellaParams

from .helpers import base_state, bits_equal, finetunes


def test_breadcrumbs_hand_example() -> None:
    # n = 10, density 0.6 (keep 6), gamma 0.1 (drop the largest): ranks 1..6 survive
    a = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    b = torch.tensor([1.0, 2.0, -3.0, 4.0, -5.0, 6.0, 7.0, -8.0, 9.0, 10.0])
    p = BreadcrumbsParams(weight=(1.0, 0.5), density=(0.6, 0.6), gamma=(0.1, 0.1))
    out = methods.get("breadcrumbs").fn([a.clone(), b.clone()], p)
    ta = [0, -9, 8, -7, 6, -5, 4, 0, 0, 0]
    tb = [0, 0, 0, 4, -5, 6, 7, -8, 9, 0]
    assert out.tolist() == [x + 0.5 * y for x, y in zip(ta, tb)]
    # with TIES consensus (paper convention): elect sgn(ta + tb) = [0 - + - + + + - + 0], then the
    # weighted agreeing entries over their count: index 5 keeps 0.5 * 6, index 6 (4 + 0.5 * 7) / 2
    pt = BreadcrumbsTiesParams(
        weight=(1.0, 0.5), density=(0.6, 0.6), gamma=(0.1, 0.1), convention="paper"
    )
    tied = methods.get("breadcrumbs_ties").fn([a.clone(), b.clone()], pt)
    assert tied.tolist() == [0, -9, 8, -7, 6, 3, 3.75, -4, 4.5, 0]


def test_breadcrumbs_mergekit_convention() -> None:
    p = BreadcrumbsTiesParams.model_validate(
        {"weight": [1, 1], "density": [1, 1], "gamma": [0, 0], "convention": "mergekit"}
    )
    assert (p.sign_source, p.sign_tie, p.aggregation) == ("weighted", "positive", "sum")
    with pytest.raises(ValueError, match="convention 'peft' is not defined for this method"):
        BreadcrumbsTiesParams.model_validate({"weight": [1], "density": [1], "convention": "peft"})


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 1000), density=st.floats(0.05, 1.0), gamma=st.floats(0.0, 0.5))
def test_breadcrumbs_keeps_exactly_density(seed: int, density: float, gamma: float) -> None:
    d = torch.randn(257, generator=torch.Generator().manual_seed(seed))
    p = BreadcrumbsParams(weight=(1.0,), density=(density,), gamma=(gamma,))
    out = methods.get("breadcrumbs").fn([d.clone()], p)
    assert int((out != 0).sum()) == int(density * 257)


def test_della_keep_rate_and_rescale() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(256, 512, generator=g)
    p = DellaLinearParams(weight=(1.0,), density=(0.4,), epsilon=(0.2,), convention="paper")
    out = methods.get("della_linear").fn([d.clone()], p, rng=torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.4) < 0.01
    # larger magnitudes survive more often: top quarter of each row vs bottom quarter
    ranks = d.abs().argsort(dim=1).argsort(dim=1)
    top = kept[ranks >= 384].float().mean().item()
    bottom = kept[ranks < 128].float().mean().item()
    assert abs(top - 0.55) < 0.02 and abs(bottom - 0.25) < 0.02
    # each survivor is divided by its own keep probability (the paper's rescale)
    from soupkit.methods._ops import della_keep_probs

    probs = della_keep_probs(d, 0.4, 0.2)
    assert torch.equal(out[kept], (d / probs)[kept])
    assert abs(out.mean().item() - d.mean().item()) < 0.02


def test_della_parameter_range_is_checked() -> None:
    with pytest.raises(ValueError, match=r"density \+/- epsilon must lie in \(0, 1\]"):
        DellaParams(weight=(1.0,), density=(0.1,), epsilon=(0.15,))
    DellaParams(weight=(1.0,), density=(1.0,), epsilon=(0.15,))  # no drop: epsilon unused
    base = base_state()
    with pytest.raises(soupkit.ConfigError, match="epsilon"):
        soupkit.merge_state_dicts(
            finetunes(base, 1), "della", base=base, parameters={"density": 0.9}
        )


def test_della_conventions_and_determinism() -> None:
    mk = DellaParams.model_validate(
        {"weight": [1], "density": [0.5], "epsilon": [0.1], "convention": "mergekit"}
    )
    assert (mk.rescale, mk.sign_source, mk.aggregation, mk.sign_tie) == (
        "l1",
        "weighted",
        "weighted_mean",
        "positive",
    )
    base = base_state()
    fts = finetunes(base, 3)
    kw = {"base": base, "parameters": {"density": 0.5, "epsilon": 0.1}, "seed": 9}
    a = soupkit.merge_state_dicts(fts, "della", **kw)
    b = soupkit.merge_state_dicts(fts, "della", chunk_elems=3, **kw)
    assert all(bits_equal(a[k], b[k]) for k in a)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_zero_deltas_give_the_base(n: int, seed: int) -> None:
    base = base_state(seed % 7)
    for method, params in [
        ("breadcrumbs", {"density": 0.5}),
        ("breadcrumbs_ties", {"density": 0.5}),
        ("della", {"density": 0.5}),
        ("della_linear", {"density": 0.5}),
    ]:
        out = soupkit.merge_state_dicts([base] * n, method, base=base, parameters=params, seed=seed)
        assert all(torch.equal(out[k], base[k]) for k in base)
