"""DARE: statistics against PEFT (which draws from the global RNG), exact rescale, seeded bytes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.utils import merge_utils

import soupkit
from soupkit import methods
from soupkit.engine import RNG_BLOCK
from soupkit.methods.dare import DareLinearParams, DareTiesParams

from .helpers import base_state, bits_equal, finetunes

N = 400_000


def _deltas(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=g) for _ in range(n)]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_linear_statistics_match_peft(density: float) -> None:
    (d,) = _deltas(1)
    torch.manual_seed(12345)  # PEFT draws from the global RNG (not from _deltas' seed: correlated)
    peft_out = merge_utils.dare_linear([d.clone()], torch.tensor([1.0]), density)
    p = DareLinearParams(weight=(1.0,), density=(density,), convention="paper")
    ours = methods.get("dare_linear").fn([d.clone()], p, rng=torch.Generator().manual_seed(777))
    for out in (peft_out, ours):
        kept = out != 0
        frac = kept.float().mean().item()
        assert abs(frac - density) < 4 * (density * (1 - density) / N) ** 0.5 + 1e-9
        assert torch.equal(out[kept], d[kept] / density)  # survivors rescaled exactly by 1/density
        assert abs(out.mean().item() - d.mean().item()) < 0.02  # unbiased
    assert not torch.equal(
        peft_out != 0, ours != 0
    )  # different generators: compare statistics only


def test_dare_ties_statistics_match_peft() -> None:
    deltas = _deltas(3, seed=1)
    w = torch.tensor([1.0, 0.5, 2.0])
    torch.manual_seed(54321)
    peft_out = merge_utils.dare_ties([d.clone() for d in deltas], w, 0.3)
    p = DareTiesParams.model_validate(
        {"weight": w.tolist(), "density": [0.3] * 3, "convention": "peft"}
    )
    ours = methods.get("dare_ties").fn(
        [d.clone() for d in deltas], p, rng=torch.Generator().manual_seed(888)
    )
    nonzero = [(o != 0).float().mean().item() for o in (peft_out, ours)]
    assert abs(nonzero[0] - nonzero[1]) < 0.01
    assert abs(peft_out.abs().mean().item() - ours.abs().mean().item()) < 0.01
    assert abs(peft_out.std().item() - ours.std().item()) < 0.02


def test_dare_ties_with_everything_kept_is_ties_consensus() -> None:
    deltas = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, -1.0, 0.25])]
    p = DareTiesParams(weight=(1.0, 1.0), density=(1.0, 1.0), convention="paper")
    out = methods.get("dare_ties").fn(
        [d.clone() for d in deltas], p, rng=torch.Generator().manual_seed(0)
    )
    assert out.tolist() == [0.0, -1.5, 0.375]  # sign tie -> 0 (paper), mean of agreeing


def test_bool_rescale_and_conventions() -> None:
    paper = {"weight": [1], "density": [0.5], "convention": "paper"}
    assert DareLinearParams.model_validate({**paper, "rescale": False}).rescale == "none"
    assert DareLinearParams.model_validate({**paper, "rescale": True}).rescale == "density"
    # mergekit's `rescale: true` is its L1 rescale (the default convention)
    assert (
        DareLinearParams.model_validate({"weight": [1], "density": [0.5], "rescale": True}).rescale
        == "l1"
    )
    assert (
        DareLinearParams.model_validate({"weight": [1], "density": [0.5], "rescale": False}).rescale
        == "none"
    )
    mk = DareTiesParams.model_validate({"weight": [1], "density": [0.5], "convention": "mergekit"})
    assert (mk.rescale, mk.sign_source, mk.sign_tie, mk.aggregation) == (
        "l1",
        "weighted",
        "positive",
        "sum",
    )
    with pytest.raises(ValueError, match="greater than 0"):
        DareLinearParams(weight=(1.0,), density=(0.0,))


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    base = base_state()
    fts = finetunes(base, 3)
    a = soupkit.merge_state_dicts(fts, "dare_ties", base=base, parameters={"density": 0.5}, seed=3)
    b = soupkit.merge_state_dicts(
        fts, "dare_ties", base=base, parameters={"density": 0.5}, seed=3, chunk_elems=5
    )
    c = soupkit.merge_state_dicts(fts, "dare_ties", base=base, parameters={"density": 0.5}, seed=4)
    assert all(bits_equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_one_models_density_does_not_change_another_models_mask() -> None:
    base = {"w": torch.zeros(1000)}
    fts = [{"w": torch.ones(1000)}, {"w": torch.full((1000,), 2.0)}]

    def model0_kept(density1: float) -> torch.Tensor:
        # weight 0 on model 1 isolates model 0's contribution; model 1 still draws its mask
        out = soupkit.merge_state_dicts(
            fts,
            "dare_linear",
            base=base,
            model_parameters=[{"density": 0.5}, {"density": density1, "weight": 0.0}],
        )
        return out["w"] != 0

    assert torch.equal(model0_kept(0.3), model0_kept(0.9))
    assert 400 < int(model0_kept(0.3).sum()) < 600


def test_blocks_make_large_tensors_chunk_invariant() -> None:
    n = RNG_BLOCK + 1000  # two RNG blocks
    base = {"w": torch.zeros(n)}
    fts = [{"w": torch.randn(n, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    a = soupkit.merge_state_dicts(
        fts, "dare_linear", base=base, parameters={"density": 0.5}, chunk_elems=333_333
    )
    b = soupkit.merge_state_dicts(fts, "dare_linear", base=base, parameters={"density": 0.5})
    assert bits_equal(a["w"], b["w"])


@settings(max_examples=30, deadline=None)
@given(
    vals=st.lists(st.floats(-4, 4, allow_nan=False, width=16), min_size=1, max_size=16),
    n=st.integers(1, 4),
    density=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31),
)
def test_zero_deltas_give_the_base(vals: list[float], n: int, density: float, seed: int) -> None:
    base = {"x": torch.tensor(vals)}
    for method in ("dare_linear", "dare_ties"):
        out = soupkit.merge_state_dicts(
            [base] * n,
            method,
            base={"x": torch.tensor(vals)},
            parameters={"density": density},
            seed=seed,
        )
        assert torch.equal(out["x"], base["x"])


def test_a_mergekit_dare_ties_recipe_runs_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from .helpers import write

    base = base_state(dtype=torch.bfloat16)
    fts = finetunes(base, 2)
    b = write(tmp_path / "base", base)
    m = [write(tmp_path / f"ft{i}", s) for i, s in enumerate(fts)]
    recipe = f"""
models:
  - model: {b}
    # no parameters necessary for base model
  - model: {m[0]}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {m[1]}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {b}
parameters:
  int8_mask: true
  normalize: true
dtype: bfloat16
"""
    r = soupkit.merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    assert len(r.plan.models) == 2 and any("base model is also listed" in n for n in r.plan.notes)
    p = next(j.params for j in r.plan.jobs if j.params is not None)
    assert p.aggregation == "weighted_mean" and p.int8_mask
