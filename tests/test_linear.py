"""linear / uniform soup: golden values, invariants, streaming == in-memory, swa_utils cross-check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from toymodels import tiny_state, write_model

import soupkit
from soupkit import methods
from soupkit.methods.linear import LinearParams, RunningSum

linear = methods.get("linear")


def run(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    return linear.call(
        [t.clone() for t in tensors], LinearParams(weight=tuple(weights), normalize=normalize)
    )


def test_golden_weighted_mean() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    # (1*1 + 3*3) / 4 = 2.5 ; (1*2 + 3*4) / 4 = 3.5
    assert torch.equal(run([a, b], [1, 3]), torch.tensor([2.5, 3.5]))
    assert torch.equal(run([a, b], [1, 3], normalize=False), torch.tensor([10.0, 14.0]))
    assert torch.equal(run([a, b], [1, 1]), torch.tensor([2.0, 3.0]))


def test_normalize_with_zero_weight_sum_is_a_config_error(models: list[Path]) -> None:
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(models[0]), "parameters": {"weight": 1.0}},
            {"model": str(models[1]), "parameters": {"weight": -1.0}},
        ],
    }
    with pytest.raises(soupkit.ConfigError, match="weights sum to zero"):
        soupkit.plan(recipe)


bf16_vals = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=16), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(vals=bf16_vals, n=st.integers(1, 9))
def test_identical_ingredients_are_a_fixed_point(vals: list[float], n: int) -> None:
    # bf16 inputs: every partial sum is exact in float32, so the mean returns x exactly.
    x = torch.tensor(vals, dtype=torch.bfloat16)
    out = soupkit.merge_state_dicts([{"x": x}] * n)["x"]
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)


# bf16 values m * 2**e with |m| < 256 and -8 <= e <= 4: the float32 running sum of up to six of
# them spans at most 2**-8 .. 2**15 (23 bits), so every partial sum is exact and the mean cannot
# depend on the order. Wider ranges round the running sum (float32 has 24 bits), so order can
# move the result by one bf16 step: the second test bounds that.
exact_bf16 = st.builds(lambda m, e: float(m) * 2.0**e, st.integers(-255, 255), st.integers(-8, 4))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(exact_bf16, min_size=4, max_size=4), min_size=2, max_size=6),
    data=st.data(),
)
def test_permutation_invariance(rows: list[list[float]], data: st.DataObject) -> None:
    states = [{"x": torch.tensor(r, dtype=torch.bfloat16)} for r in rows]
    perm = data.draw(st.permutations(range(len(states))))
    a = soupkit.merge_state_dicts(states)["x"]
    b = soupkit.merge_state_dicts([states[i] for i in perm])["x"]
    assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(bf16_vals.filter(lambda v: len(v) == 4), min_size=2, max_size=6), data=st.data()
)
def test_permutation_moves_a_rounded_mean_by_at_most_one_bf16_step(
    rows: list[list[float]], data: st.DataObject
) -> None:
    states = [{"x": torch.tensor(r, dtype=torch.bfloat16)} for r in rows]
    perm = data.draw(st.permutations(range(len(states))))
    a = soupkit.merge_state_dicts(states)["x"].float()
    b = soupkit.merge_state_dicts([states[i] for i in perm])["x"].float()
    step = torch.maximum(a.abs(), b.abs()) * 2.0**-7 + 2.0**-133  # one bf16 ulp, at most
    assert bool(((a - b).abs() <= step).all())


@settings(max_examples=40, deadline=None)
@given(
    w=st.lists(st.integers(1, 8), min_size=3, max_size=3),
    k=st.sampled_from([0.25, 0.5, 2.0, 4.0]),
    scale=st.floats(0.1, 10.0),
)
def test_normalized_weights_are_scale_invariant(w: list[int], k: float, scale: float) -> None:
    states = [tiny_state(i, torch.bfloat16, layers=1) for i in range(3)]
    mp = [{"weight": float(x)} for x in w]
    a = soupkit.merge_state_dicts(states, model_parameters=mp)
    # powers of two scale exactly: bitwise equal
    b = soupkit.merge_state_dicts(
        states, model_parameters=[{"weight": x["weight"] * k} for x in mp]
    )
    c = soupkit.merge_state_dicts(
        states, model_parameters=[{"weight": x["weight"] * scale} for x in mp]
    )
    for name in a:
        assert torch.equal(a[name], b[name])
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name].float(), c[name].float(), rtol=1e-2, atol=1e-2)


def test_streaming_equals_in_memory_bit_for_bit(tmp_path: Path, bf16_models: list[Path]) -> None:
    states = [load_file(str(p / "model.safetensors")) for p in bf16_models]
    weights = [0.2, 0.3, 0.5]
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(p), "parameters": {"weight": w}} for p, w in zip(bf16_models, weights)
        ],
    }
    soupkit.merge(recipe, tmp_path / "out", chunk_elems=7, max_shard_size=700, progress=False)
    streamed = soupkit.open_checkpoint(tmp_path / "out")
    assert len(streamed.files) > 2  # really sharded
    got = {n: t for f in streamed.files for n, t in load_file(str(f)).items()}
    ref = soupkit.merge_state_dicts(states, model_parameters=[{"weight": w} for w in weights])
    # and the plain formula, computed here without soupkit's engine
    for name, t in ref.items():
        assert torch.equal(got[name], t), name
        if t.is_floating_point():
            w = torch.tensor(weights)
            manual = torch.zeros_like(states[0][name], dtype=torch.float32)
            for s, wi in zip(states, w):  # mergekit's rounding: fused multiply-add from zeros
                manual.addcmul_(s[name].float(), wi)
            assert torch.equal((manual / w.sum()).to(torch.bfloat16), t), name
        else:
            assert torch.equal(t, states[0][name])


def test_uniform_soup_matches_swa_averaged_model(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    nets = [
        torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        for _ in range(4)
    ]
    paths = [write_model(tmp_path / f"n{i}", n.state_dict()) for i, n in enumerate(nets)]
    swa = AveragedModel(nets[0])
    for n in nets:  # the first update copies, later ones keep the running mean
        swa.update_parameters(n)
    soupkit.uniform_soup(paths, tmp_path / "soup", progress=False)
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))
    for name, p in swa.module.state_dict().items():
        # AveragedModel keeps a running mean (avg += (p - avg) / (n + 1)); same value up to rounding
        torch.testing.assert_close(soup[name], p, rtol=0, atol=2e-7)


def test_output_dtype_defaults_to_inputs_and_out_dtype_casts(
    tmp_path: Path, bf16_models: list[Path]
) -> None:
    r = soupkit.uniform_soup(bf16_models, tmp_path / "a", progress=False)
    assert {j.out_dtype for j in r.plan.jobs if not j.is_copy} == {"BF16"}
    r = soupkit.uniform_soup(bf16_models, tmp_path / "b", out_dtype="float32", progress=False)
    out = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert out["lm_head.weight"].dtype == torch.float32
    assert out["model.position_ids"].dtype == torch.int64  # non-float copied, never cast


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_running_sum_is_linear_uniform_soup_bit_for_bit(
    data: st.DataObject, n: int, dtype: torch.dtype
) -> None:
    # Greedy soup's candidates come from RunningSum; the written soup from the linear method:
    # they must agree to the bit, whatever the values (rounded sums included).
    width = 32 if dtype == torch.float32 else 16
    vals = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=width)
    states = [
        {
            "w": torch.tensor(data.draw(st.lists(vals, min_size=5, max_size=5)), dtype=dtype),
            "ids": torch.arange(3) + k,  # not float: taken from the first state dict
        }
        for k in range(n)
    ]
    total = RunningSum(states[0])
    assert total.names == ("w", "ids") and total.summed("w") and not total.summed("ids")
    for k in range(1, n + 1):
        want = run([s["w"].float() for s in states[:k]], [1.0] * k).to(dtype)
        if k > 1:  # the soup of k as a candidate: the sum of k - 1 plus one more, not added
            got = total.mean("w", states[k - 1]["w"])
            assert got.dtype == dtype and torch.equal(_bits(got), _bits(want))
            total.add("w", states[k - 1]["w"])
            total.added()
        got = total.mean("w")
        assert total.count == k and got.dtype == dtype and torch.equal(_bits(got), _bits(want))
        assert torch.equal(total.mean("ids"), states[0]["ids"])
