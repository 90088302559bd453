"""SLERP and Model Stock: hand examples, mergekit's formulas, endpoints and fixed points."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import soupkit
from soupkit import methods
from soupkit.methods.model_stock import ModelStockParams
from soupkit.methods.slerp import SlerpParams

from .helpers import base_state, bits_equal, finetunes, write

slerp = methods.get("slerp")
stock = methods.get("model_stock")


def run_slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    return slerp.call([v1.clone()], SlerpParams(t=t), base=v0.clone())


def test_slerp_hand_examples() -> None:
    out = run_slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    out = run_slerp(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), 1 / 3)  # 30 degrees of 90
    assert torch.allclose(out, torch.tensor([2 * math.cos(math.pi / 6), 2 * math.sin(math.pi / 6)]))
    # near-parallel (|cos| > 0.9995): linear interpolation, as mergekit
    v0 = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(run_slerp(v0, 2 * v0, 0.25), v0 * 0.75 + (2 * v0) * 0.25)
    # a zero tensor (zero-initialised bias): linear interpolation
    assert torch.equal(run_slerp(torch.zeros(3), v0, 0.5), v0 * 0.5)


def mergekit_slerp(
    t: float, v0: np.ndarray, v1: np.ndarray, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> np.ndarray:
    """mergekit/merge_methods/slerp.py ``slerp`` (numpy float32, transcribed)."""
    c0, c1 = np.copy(v0), np.copy(v1)
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    v0 = v0 / n0 if n0 > eps else v0
    v1 = v1 / n1 if n1 > eps else v1
    dot = np.sum(v0 * v1)
    if np.abs(dot) > dot_threshold:
        return (1 - t) * c0 + t * c1
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return s0 * c0 + s1 * c1


@pytest.mark.parametrize("t", [0.1, 0.5, 0.77])
def test_slerp_agrees_with_mergekit_to_float32_rounding(t: float) -> None:
    g = torch.Generator().manual_seed(int(t * 100))
    v0, v1 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    want = torch.from_numpy(mergekit_slerp(t, v0.numpy(), v1.numpy()))
    assert torch.allclose(run_slerp(v0, v1, t), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.0, 10.0))
def test_slerp_endpoints_are_exact(seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    v0, v1 = torch.randn(7, 3, generator=g), scale * torch.randn(7, 3, generator=g)
    assert bits_equal(run_slerp(v0, v1, 0.0), v0)
    assert bits_equal(run_slerp(v0, v1, 1.0), v1)


def test_slerp_mergekit_recipe_with_both_models_listed(tmp_path: Path) -> None:
    base = base_state()
    (other,) = finetunes(base, 1, scale=1.0)
    a, b = write(tmp_path / "a", base), write(tmp_path / "b", other)
    recipe = {
        "merge_method": "slerp",
        "base_model": str(a),
        "models": [{"model": str(a)}, {"model": str(b)}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]},
    }
    r = soupkit.merge(recipe, tmp_path / "out", progress=False)
    assert any("used as the base only" in n for n in r.plan.notes)
    out = load_file(str(r.out / "model.safetensors"))
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(out[q0], base[q0]) and torch.equal(out[q1], other[q1])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(out[name], run_slerp(base[name], other[name], 0.5))
    with pytest.raises(soupkit.ConfigError, match="takes at most 1 model"):
        soupkit.merge_state_dicts([other, other], "slerp", base=base)


# ---------------------------------------------------------------------------- model stock


def run_stock(
    w0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool = False, **kw: str
) -> torch.Tensor:
    return stock.call(
        [w.clone() for w in ws],
        ModelStockParams.model_validate({"filter_wise": filter_wise, **kw}),
        base=w0.clone(),
    )


def test_model_stock_hand_examples() -> None:
    w0 = torch.zeros(2)
    # 60 degrees: cos 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3; avg = ([1, 0] + [0.5, sqrt(3)/2]) / 2
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    want = torch.tensor([0.75, math.sqrt(3) / 4]) * (2 / 3)
    assert torch.allclose(run_stock(w0, [w1, w2]), want)
    # orthogonal fine-tunes: t = 0, the base
    assert torch.equal(run_stock(w0, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]), w0)
    # obtuse angle (outside the paper's assumption): with convention paper, clamped to t = 0, the base
    assert torch.equal(
        run_stock(
            torch.ones(2), [torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.1])], convention="paper"
        ),
        torch.ones(2),
    )
    # mergekit (the default) extrapolates: offsets [1, 0] and [-1, 0.1], cos = -1 / sqrt(1.01),
    # t = 2 cos / (1 + cos), theta = t * avg + (1 - t) * theta_0
    cos = -1 / math.sqrt(1.01)
    t = 2 * cos / (1 + cos)
    want = torch.tensor([1.0, 1.05]) * t + (1 - t) * torch.ones(2)
    # (t = -19: close to the singularity, float32 rounding of cos is amplified 20x)
    assert torch.allclose(
        run_stock(torch.ones(2), [torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.1])]),
        want,
        rtol=1e-4,
    )


def mergekit_model_stock(
    w_0: torch.Tensor, ws: list[torch.Tensor], filter_wise: bool
) -> torch.Tensor:
    """mergekit/merge_methods/model_stock.py ``ModelStockMergeTask.execute`` (transcribed)."""
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.view(-1)
        ws = [w.view(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, a in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            b = offsets[j]
            norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos_thetas.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
    w_avg = sum(ws) / len(ws)
    w_h = t * w_avg + (1 - t) * w_0
    return w_h.reshape(out_shape)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit_bit_for_bit(n: int, filter_wise: bool) -> None:
    g = torch.Generator().manual_seed(n)
    w0 = torch.randn(12, 8, generator=g)
    shared = torch.randn(12, 8, generator=g)  # fine-tunes move in a common direction: cos > 0
    ws = [w0 + shared + 0.5 * torch.randn(12, 8, generator=g) for _ in range(n)]
    assert torch.equal(run_stock(w0, ws, filter_wise), mergekit_model_stock(w0, ws, filter_wise))
    b0, bs = w0[0], [w[0] for w in ws]  # a vector, as a bias
    assert torch.equal(run_stock(b0, bs, filter_wise), mergekit_model_stock(b0, bs, filter_wise))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), data=st.data())
def test_model_stock_fixed_point_and_permutation(seed: int, n: int, data: st.DataObject) -> None:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(9, generator=g)
    w = w0 + torch.tensor([1.0, -2.0, 0.5, 0.25, 4.0, -1.0, 2.0, 0.125, -0.5])
    # identical fine-tunes: cos = 1 up to float32 rounding of the norms, so t = 1 and the fine-tune
    assert torch.allclose(run_stock(w0, [w] * n), w, rtol=1e-6, atol=1e-6)
    ws = [w0 + torch.randn(9, generator=g) + 2 for _ in range(n)]
    perm = data.draw(st.permutations(range(n)))
    assert torch.allclose(
        run_stock(w0, ws), run_stock(w0, [ws[i] for i in perm]), rtol=1e-6, atol=1e-6
    )


def test_model_stock_needs_two_finetunes() -> None:
    base = base_state()
    with pytest.raises(soupkit.ConfigError, match="needs at least 2 model"):
        soupkit.merge_state_dicts(finetunes(base, 1), "model_stock", base=base)
