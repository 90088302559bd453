"""The shared building blocks: magnitude cuts and their tie rule, band trims, drops, signs."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soupkit.methods import CounterRNG, MagnitudeCut, _ops


def test_topk_keeps_exactly_k_and_breaks_ties_by_lower_index() -> None:
    a = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0])
    cut = _ops.topk_cut(a, 3)
    assert cut == MagnitudeCut(2.0, 2)  # 3 > 2 kept; two of the three 2s
    assert _ops.cut_mask(a, cut).tolist() == [False, True, True, False, True]
    assert _ops.topk_cut(a, 4) == MagnitudeCut(2.0, None)  # every tie survives: no quota needed
    assert _ops.topk_cut(a, 5) is None
    assert _ops.topk_cut(a, 0) == MagnitudeCut(math.inf, 0)
    assert not _ops.cut_mask(a, MagnitudeCut(math.inf, 0)).any()


@settings(max_examples=150, deadline=None)
@given(
    vals=st.lists(st.sampled_from([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0]), min_size=1, max_size=40),
    density=st.floats(0.01, 1.0),
)
def test_trim_topk_equals_a_stable_sort_reference(vals: list[float], density: float) -> None:
    x = torch.tensor(vals)
    k = int(density * x.numel())
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    want = torch.zeros_like(x)
    want[order[:k]] = x[order[:k]]
    got = _ops.trim_topk(x, density)
    assert torch.equal(got, want)
    assert int((got != 0).sum()) <= k


@settings(max_examples=150, deadline=None)
@given(
    vals=st.lists(
        st.sampled_from([0.25, -0.25, 1.0, -1.0, 2.0, 4.0, -4.0]), min_size=1, max_size=40
    ),
    density=st.floats(0.01, 1.0),
    gamma=st.floats(0.0, 0.99),
)
def test_trim_band_keeps_ranks_top_to_top_plus_keep(
    vals: list[float], density: float, gamma: float
) -> None:
    x = torch.tensor(vals)
    n = x.numel()
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    order = torch.sort(x.abs(), descending=True, stable=True).indices
    want = torch.zeros_like(x)
    sel = order[top : top + keep]
    want[sel] = x[sel]
    assert torch.equal(_ops.trim_band(x, density, gamma), want)


def test_trim_band_hand_example() -> None:
    # n = 10, density 0.5 -> keep 5; gamma 0.2 -> drop the 2 largest, then the 3 smallest
    x = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])
    assert _ops.trim_band(x, 0.5, 0.2).tolist() == [0, 0, 8, -7, 6, -5, 4, 0, 0, 0]
    # gamma too large for the density: fewer outliers go, density holds (mergekit's rule)
    assert _ops.trim_band(x, 0.9, 0.5).tolist() == [0, -9, 8, -7, 6, -5, 4, -3, 2, -1]
    # int(gamma * n) == 0 still keeps `keep` entries (mergekit before 0.1.5: indices[n_bot:-0], none)
    assert _ops.trim_band(x, 0.3, 0.05).tolist() == [10, -9, 8, 0, 0, 0, 0, 0, 0, 0]


def test_dare_drop_keeps_density_fraction_and_rescales_exactly() -> None:
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    y = _ops.dare_drop(x, 0.3, g, "density")
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert torch.equal(y[kept], x[kept] / 0.3)
    z = _ops.dare_drop(x, 0.3, torch.Generator().manual_seed(1), "none")
    assert torch.equal(z[kept], x[kept]) and torch.equal(z != 0, kept)  # same draws, same mask
    l1 = _ops.dare_drop(x, 0.3, torch.Generator().manual_seed(1), "l1")
    assert torch.allclose(l1.abs().sum(), x.abs().sum(), rtol=1e-5)
    assert _ops.dare_drop(x, 1.0, g) is x


def test_each_models_draws_are_its_own_stream_and_do_not_depend_on_pieces() -> None:
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    rng = CounterRNG(5)
    m0 = _ops.dare_drop(x, 0.5, rng, "none", stream=0) != 0
    m1 = _ops.dare_drop(x, 0.5, rng, "none", stream=1) != 0
    assert not torch.equal(m0, m1)  # other model, other mask
    m1_low = _ops.dare_drop(x, 0.3, rng, "none", stream=1) != 0
    assert not (m1_low & ~m1).any() and m1_low.sum() < m1.sum()  # the same draws, lower bar
    # pieces at any offsets give the whole tensor's mask
    pieces = [(0, 3), (3, 515), (515, 1001)]
    joined = torch.cat(
        [_ops.dare_drop(x[a:b], 0.5, rng.at(a), "none", stream=1) for a, b in pieces]
    )
    assert torch.equal(joined != 0, m1)
    # a torch.Generator stands for its seed
    g = torch.Generator().manual_seed(5)
    assert torch.equal(_ops.dare_drop(x, 0.5, g, "none", stream=1) != 0, m1)


def test_della_keep_probabilities_ramp_within_rows() -> None:
    x = torch.tensor([[0.1, -0.4, 0.3, 0.2, -0.5], [5.0, 1.0, 1.0, 3.0, 2.0]])
    p = _ops.della_keep_probs(x, 0.5, 0.2)
    # row 0 ranks by |x|: 0.1 -> 0, 0.2 -> 1, 0.3 -> 2, 0.4 -> 3, 0.5 -> 4
    assert torch.allclose(p[0], torch.tensor([0.3, 0.6, 0.5, 0.4, 0.7]))
    # row 1 ties (1.0, 1.0) rank by position: index 1 -> 0, index 2 -> 1
    assert torch.allclose(p[1], torch.tensor([0.7, 0.3, 0.4, 0.6, 0.5]))
    assert torch.allclose(p.mean(dim=1), torch.tensor([0.5, 0.5]))
    assert torch.equal(_ops.della_keep_probs(torch.tensor([3.0]), 0.5, 0.2), torch.tensor([0.5]))


def test_elect_sign_tie_rules() -> None:
    a, b = torch.tensor([0.5, 0.0, 1.0]), torch.tensor([-0.5, 0.0, -0.25])
    assert _ops.elect_sign([a, b], "unweighted", "zero").tolist() == [0.0, 0.0, 1.0]
    assert _ops.elect_sign([a, b], "unweighted", "positive").tolist() == [1.0, 1.0, 1.0]
    # by count: +1 and -1 tie at index 2 although the sum is positive
    assert _ops.elect_sign([a, b], "count", "zero").tolist() == [0.0, 0.0, 0.0]


def _lane_sum(values: list[float]) -> float:
    """The documented order of `_ops.l1_norm`, written as plain recursion over Python floats."""
    rows = [[0.0] * 8 for _ in range(-(-len(values) // 8))]
    for j, v in enumerate(values):
        rows[j // 8][j % 8] = abs(v)

    def tree(lo: int, size: int) -> list[float]:  # rows [lo, lo + size), zero past the end
        if size == 1:
            return rows[lo] if lo < len(rows) else [0.0] * 8
        left, right = tree(lo, size // 2), tree(lo + size // 2, size // 2)
        return [a + b for a, b in zip(left, right)]

    if not rows:
        return 0.0
    lane = tree(0, 1 << (len(rows) - 1).bit_length())
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))


@settings(max_examples=200, deadline=None)
@given(
    n=st.sampled_from([0, 1, 2, 7, 8, 9, 15, 16, 17, 1023, 1024, 1025, 3001]),
    seed=st.integers(0, 2**31),
    spread=st.integers(0, 60),
    special=st.sampled_from([None, math.inf, -math.inf, math.nan]),
)
def test_l1_norm_is_the_documented_float64_tree(
    n: int, seed: int, spread: int, special: float | None
) -> None:
    g = torch.Generator().manual_seed(seed)
    # magnitudes over 2^-spread .. 2^spread: a float32 sum would lose the small ones
    scale = torch.randint(-spread, spread + 1, (n,), generator=g).float()
    x = torch.randn(n, generator=g) * torch.pow(2.0, scale)
    if special is not None and n:
        x[int(torch.randint(0, n, (1,), generator=g))] = special
    got, want = _ops.l1_norm(x), _lane_sum(x.tolist())
    assert got == want or (math.isnan(got) and math.isnan(want))


def test_l1_norm_and_factor_hand_example() -> None:
    # float32 left to right: 2^24 + 1 -> 2^24 (round to even), twice; float64 lanes: exact
    x = torch.tensor([2.0**24, 1.0, -1.0])
    assert _ops.l1_norm(x) == 2.0**24 + 2
    m = x.abs()
    assert float((m[0] + m[1]) + m[2]) == 2.0**24
    # the factor: each norm rounded once to float32, then their float32 quotient
    half = _ops.l1_factor(3.0, 2.0)
    assert half is not None and half.item() == 1.5 and half.dtype == torch.float32
    third = _ops.l1_factor(1.0, 3.0)
    assert third is not None and third.item() == float(torch.tensor(1.0) / torch.tensor(3.0))
    assert _ops.l1_factor(1.0, 0.0) is None and _ops.l1_factor(5e-8, 1.0) is None  # below eps
    scale = _ops.l1_scale(x, torch.tensor([0.0, 1.0, 0.0]))
    assert scale is not None and scale.item() == 2.0**24 + 2
    assert _ops.l1_norm(torch.empty(0)) == 0.0 and _ops.l1_scale(x, torch.zeros(3)) is None
