"""Invariants of exact mode's ports of mergekit's arithmetic (`soupkit.methods._exact`); their
bytes against mergekit itself are pinned in tests/ecosystem/test_mergekit_exact.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soupkit import methods
from soupkit.methods import _exact

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    density=st.floats(0.001, 0.999),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(DTYPES),
)
def test_magnitude_keeps_max_1_int_density_n_entries_in_the_input_dtype(
    n: int, density: float, seed: int, dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g) + 0.5).to(dtype)  # no exact zeros in practice
    t[t == 0] = 1
    out = _exact.magnitude(t, density, rescale=False)
    assert out.dtype == dtype
    assert int((out != 0).sum()) == max(1, int(density * n))
    kept = out != 0
    assert torch.equal(out[kept], t[kept])
    if (~kept).any():  # what is kept is never smaller than what is dropped
        assert t[kept].abs().min() >= t[~kept].abs().max()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 200),
    density=st.floats(0.05, 0.95),
    gamma=st.floats(0, 0.3),
    seed=st.integers(0, 2**16),
)
def test_magnitude_outliers_keeps_int_density_n_entries(
    n: int, density: float, gamma: float, seed: int
) -> None:
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed)) + 0.5
    t[t == 0] = 1
    out = _exact.magnitude_outliers(t, density, gamma, rescale=False)
    assert int((out != 0).sum()) == int(density * n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gta_of_one_task_vector_with_weight_one_is_that_vector(dtype: torch.dtype) -> None:
    d = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    for consensus in (None, "sum"):
        out = _exact.generalized_task_arithmetic(
            [d.clone()],
            [1.0],
            sparsify=None,
            consensus=consensus,  # type: ignore[arg-type]
            normalize=consensus is not None,
            lam=1.0,
        )
        assert out.dtype == dtype and torch.equal(out, d)


def test_rescale_restores_the_l1_norm() -> None:
    d = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    out = _exact.bernoulli(d, 0.3, rescale=True, generator=torch.Generator().manual_seed(2))
    assert abs(float(out.abs().sum() / d.abs().sum()) - 1) < 1e-5
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.06


def test_exact_functions_are_registered_for_mergekits_methods() -> None:
    have = {s.name for s in methods.all_methods() if s.exact is not None}
    assert have >= {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "slerp",
        "model_stock",
    }
    assert methods.get("wise_ft").exact is None  # not a mergekit method
