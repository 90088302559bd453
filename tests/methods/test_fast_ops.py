"""The fast shared ops (float / int32 masks, in place) equal the straightforward ones bit for bit.

`reference_ops` is the module as first written (bool masks, ``masked_fill``, no in-place);
every fast function must give the same bytes on adversarial inputs: signed zeros, ties at the
threshold, NaN, +-Inf, huge values and zero or negative weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soupkit.methods import MagnitudeCut, _ops
from soupkit.methods._topk import TopKSelect, magnitude_bits

from . import reference_ops as ref
from .helpers import bits_equal

NASTY = [
    0.0,
    -0.0,
    0.5,
    -0.5,
    1.0,
    -1.0,
    2.0,
    1e-30,
    -1e-30,
    3e38,
    -3e38,
    float("inf"),
    float("-inf"),
    float("nan"),
]
FINITE = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 1e-30, 3e38]

vectors = st.lists(st.sampled_from(NASTY), min_size=1, max_size=60)
finite_vectors = st.lists(st.sampled_from(FINITE), min_size=1, max_size=60)
weights = st.sampled_from([1.0, 0.5, -1.0, 0.0, 3.0, 1e-3])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bits_equal(a, b)


@settings(max_examples=300, deadline=None)
@given(
    vals=vectors,
    thr=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3e38, math.inf, math.nan]),
    ties=st.sampled_from([None, 0, 1, 2, 5]),
)
def test_apply_cut(vals: list[float], thr: float, ties: int | None) -> None:
    x = torch.tensor(vals)
    cut = MagnitudeCut(thr, ties)
    assert same(_ops.apply_cut(x.clone(), cut), ref.apply_cut(x.clone(), cut))


@settings(max_examples=200, deadline=None)
@given(vals=vectors, density=st.floats(0.01, 0.99))
def test_trim_topk(vals: list[float], density: float) -> None:
    x = torch.tensor(vals)
    assert same(_ops.trim_topk(x.clone(), density), ref.trim_topk(x.clone(), density))


@settings(max_examples=300, deadline=None)
@given(vals=vectors, k_frac=st.floats(0.0, 1.0))
def test_streamed_topk_cut_equals_kthvalue_cut(vals: list[float], k_frac: float) -> None:
    x = torch.tensor(vals)
    n = x.numel()
    k = int(k_frac * n)
    want = ref.topk_cut(x.abs(), k)
    if not 0 < k < n:
        return
    sel = TopKSelect(n, (k,))
    pieces = [x[i : i + 7] for i in range(0, n, 7)]  # any chunking
    for p in pieces:
        sel.add_hi(magnitude_bits(p))
    sel.select_buckets()
    for p in pieces:
        sel.add_lo(magnitude_bits(p))
    got = sel.cut(k)
    assert want is not None
    if math.isnan(want.threshold):
        assert math.isnan(got.threshold) and got.ties == want.ties
    else:
        assert got == want
    assert same(ref.apply_cut(x, got), ref.apply_cut(x, want))


@settings(max_examples=150, deadline=None)
@given(
    vals=vectors,
    density=st.sampled_from([0.01, 0.3, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**31),
    rescale=st.sampled_from(["density", "l1", "none"]),
)
def test_dare_drop(vals: list[float], density: float, seed: int, rescale: str) -> None:
    x = torch.tensor(vals)
    got = _ops.dare_drop(x.clone(), density, torch.Generator().manual_seed(seed), rescale)  # type: ignore[arg-type]
    want = ref.dare_drop(x.clone(), density, torch.Generator().manual_seed(seed), rescale)  # type: ignore[arg-type]
    assert same(got, want)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(vectors, min_size=1, max_size=4).filter(lambda r: len({len(v) for v in r}) == 1),
    source=st.sampled_from(["unweighted", "weighted", "count"]),
    tie=st.sampled_from(["zero", "positive"]),
)
def test_elect_sign(rows: list[list[float]], source: str, tie: str) -> None:
    xs = [torch.tensor(r) for r in rows]
    got = _ops.elect_sign([x.clone() for x in xs], source, tie)  # type: ignore[arg-type]
    want = ref.elect_sign([x.clone() for x in xs], source, tie)  # type: ignore[arg-type]
    assert same(got, want)


def _rows(n_models: int, pool: list[float]) -> st.SearchStrategy[list[list[float]]]:
    return st.integers(1, 40).flatmap(
        lambda n: st.lists(
            st.lists(st.sampled_from(pool), min_size=n, max_size=n),
            min_size=n_models,
            max_size=n_models,
        )
    )


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    n_models=st.integers(1, 4),
    source=st.sampled_from(["unweighted", "weighted", "count"]),
    tie=st.sampled_from(["zero", "positive"]),
    agg=st.sampled_from(["mean", "weighted_mean", "sum"]),
    lam=st.sampled_from([1.0, 0.5, -2.0]),
    finite=st.booleans(),
)
def test_consensus_combine_and_disjoint_merge(
    data: st.DataObject, n_models: int, source: str, tie: str, agg: str, lam: float, finite: bool
) -> None:
    rows = data.draw(_rows(n_models, FINITE if finite else NASTY))
    ws = data.draw(st.lists(weights, min_size=n_models, max_size=n_models))
    xs = [torch.tensor(r) for r in rows]
    kw = dict(sign_source=source, sign_tie=tie, aggregation=agg, lam=lam)
    got = _ops.consensus_combine([x.clone() for x in xs], ws, **kw)  # type: ignore[arg-type]
    want = ref.consensus_combine([x.clone() for x in xs], ws, **kw)  # type: ignore[arg-type]
    assert same(got, want)
    sign = ref.elect_sign(xs, "unweighted", tie)  # type: ignore[arg-type]
    got_d = _ops.disjoint_merge(xs, ws, xs, sign, agg)  # type: ignore[arg-type]
    want_d = ref.disjoint_merge(xs, ws, xs, sign, agg)  # type: ignore[arg-type]
    assert same(got_d, want_d)


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    n_models=st.integers(1, 5),
    normalize=st.booleans(),
    lam=st.sampled_from([1.0, 0.3, -1.0]),
)
def test_linear_combine(data: st.DataObject, n_models: int, normalize: bool, lam: float) -> None:
    rows = data.draw(_rows(n_models, NASTY))
    ws = data.draw(st.lists(weights, min_size=n_models, max_size=n_models))
    if normalize and sum(ws) == 0:
        return
    xs = [torch.tensor(r) for r in rows]
    got = _ops.linear_combine([x.clone() for x in xs], ws, normalize=normalize, lam=lam)
    want = ref.linear_combine([x.clone() for x in xs], ws, normalize=normalize, lam=lam)
    assert same(got, want)


def test_helpers_leave_their_inputs_alone() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g)
    keep = x.clone()
    _ops.apply_cut(x, MagnitudeCut(0.5, None))
    _ops.trim_topk(x, 0.3)
    _ops.dare_drop(x, 0.3, torch.Generator().manual_seed(1))
    _ops.elect_sign([x, x], "unweighted", "zero")
    _ops.disjoint_merge([x], [1.0], [x], torch.sign(x), "mean")
    assert same(x, keep)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    chunk=st.integers(1, 40),
    density=st.sampled_from([0.1, 0.35, 0.5, 0.8]),
    piece=st.integers(1, 9),
    threads=st.integers(1, 3),
)
def test_streamed_per_tensor_ties_with_many_tied_magnitudes_equals_the_whole_tensor_method(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    chunk: int,
    density: float,
    piece: int,
    threads: int,
) -> None:
    # Deltas from a handful of values: most magnitudes tie at the cut, so the tie quota is spread
    # over many chunks (all-tied chunks, the boundary chunk, chunks past the quota); pieces of
    # `piece` elements, with the histogram passes shared between `threads` compute threads.
    from unittest import mock

    import soupkit
    from soupkit.engine import execute

    from .helpers import SHAPES, bits_equal, direct, write

    tmp = tmp_path_factory.mktemp("ties")
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([-2.0, -1.0, 0.0, 1.0, 1.0, 2.0])
    base = {k: torch.zeros(s) for k, s in SHAPES.items()}
    fts = [
        {k: levels[torch.randint(0, 6, s, generator=g)] for k, s in SHAPES.items()}
        for _ in range(3)
    ]
    recipe = {
        "merge_method": "ties",
        "base_model": str(write(tmp / "base", base)),
        "parameters": {"density": density, "trim_scope": "per_tensor"},
        "models": [{"model": str(write(tmp / f"ft{i}", s))} for i, s in enumerate(fts)],
    }
    with (
        mock.patch.object(execute, "COMPUTE_ELEMS", piece),
        mock.patch.object(execute, "_sizes_compute_threads", lambda: threads),
        mock.patch.object(execute, "_sizes_stream_threads", lambda: threads),
    ):
        res = soupkit.merge(
            recipe, tmp / "out", progress=False, chunk_elems=chunk, hash_inputs=False
        )
    from safetensors.torch import load_file

    got = load_file(str(res.out / "model.safetensors"))
    for job in res.plan.jobs:
        assert bits_equal(got[job.name], direct("ties", fts, base, job.params, job.name)), job.name


@pytest.mark.parametrize("start", [0, 1 << 16, 5 << 16, 0x7F80 << 16])
def test_lo_bins_place_every_pattern_like_the_wide_formula(start: int) -> None:
    """Bins of the radix select's second pass: 0 below the bucket, 1..65536 inside, 65537
    above, for the extreme patterns (zero, the bucket's edges, +Inf, the largest NaN)."""
    from soupkit.methods._topk import _lo_bins

    edges = [
        0,
        1,
        start - 1,
        start,
        start + 7,
        start + 65535,
        start + 65536,
        0x7F800000,
        0x7FFFFFFF,
    ]
    bits = torch.tensor([b for b in edges if 0 <= b <= 0x7FFFFFFF], dtype=torch.int32)
    out = torch.empty_like(bits)
    _lo_bins(start, bits, out)
    assert out.tolist() == ((bits.long() - start).clamp(-1, 65536) + 1).tolist()
