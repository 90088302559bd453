"""The native kernels of TIES, DARE, DELLA and Breadcrumbs equal their torch references byte
for byte (soupkit.kernels.sparsify), on adversarial inputs: every dtype, sizes around the
kernels' block edges, tied magnitudes, NaN payloads and infinities, pieces and threads."""

from __future__ import annotations

import concurrent.futures
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import soupkit.kernels as kernels
from soupkit.kernels import sparsify as K
from soupkit.methods import CounterRNG, MagnitudeCut, _ops, _philox
from soupkit.methods import get as get_method
from soupkit.methods._ops import topk_cut

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = st.sampled_from([0, 1, 2, 3, 5, 7, 64, 1023, 1024, 1025, 2047, 3001])
# few distinct magnitudes: ties at every cut
VALUES = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 0.25, 2.0, -3.0, 1e-3, 7.5]
SPECIAL = [math.inf, -math.inf, math.nan]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(_bits(a.reshape(-1)), _bits(b.reshape(-1)))


def _tensor(draw: Any, n: int, dtype: torch.dtype, special: bool, ties: bool) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    if ties:
        idx = torch.randint(0, len(VALUES), (n,), generator=g)
        x = torch.tensor(VALUES)[idx]
    else:
        x = torch.randn(n, generator=g) * 2.0 ** float(draw(st.integers(-8, 8)))
    if special and n:
        k = draw(st.integers(1, min(n, 4)))
        where = torch.randint(0, n, (k,), generator=g)
        for w in where.tolist():
            v = draw(st.sampled_from(SPECIAL))
            x[w] = v
        x = x.to(dtype)
        if dtype == torch.float32 and draw(st.booleans()):  # a NaN payload other than torch's
            bits = x.view(torch.int32)
            bits[where[0]] = 0x7FC00000 | draw(st.integers(1, 0x3FFFFF))
            bits[where[0]] |= draw(st.sampled_from([0, -(2**31)]))
        return x
    return x.to(dtype)


@st.composite
def cases(draw: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    n = draw(SIZES)
    m = draw(st.integers(1, 4))
    special = draw(st.booleans())
    ties = draw(st.booleans())
    base = _tensor(draw, n, draw(st.sampled_from(DTYPES)), special and draw(st.booleans()), ties)
    xs = [_tensor(draw, n, draw(st.sampled_from(DTYPES)), special, ties) for _ in range(m)]
    return xs, base


DENSITY = st.sampled_from([1e-4, 0.1, 0.3, 0.5, 0.77, 1.0])
WEIGHT = st.sampled_from([1.0, 0.5, -0.3, 2.0, 1e-3])


def _params(draw: Any, name: str, m: int) -> Any:
    spec = get_method(name)
    raw: dict[str, Any] = {
        "weight": [draw(WEIGHT) for _ in range(m)],
        "density": [draw(DENSITY) for _ in range(m)],
        "lambda": draw(st.sampled_from([1.0, 0.7, 1.5])),
    }
    if "convention" in spec.params.model_fields:
        conv = draw(st.sampled_from(sorted(getattr(spec.params, "presets", {}))))
        raw["convention"] = conv
    if name.startswith("della"):
        raw["density"] = [draw(st.sampled_from([0.3, 0.5, 0.8, 1.0])) for _ in range(m)]
        raw["epsilon"] = [draw(st.sampled_from([0.0, 0.1, 0.2])) for _ in range(m)]
    if name.startswith("breadcrumbs"):
        raw["gamma"] = [draw(st.sampled_from([0.0, 0.01, 0.2, 0.6])) for _ in range(m)]
    if "sign_source" in spec.params.model_fields:
        if draw(st.booleans()):
            raw["sign_source"] = draw(st.sampled_from(["unweighted", "weighted", "count"]))
            raw["sign_tie"] = draw(st.sampled_from(["zero", "positive"]))
            raw["aggregation"] = draw(st.sampled_from(["mean", "weighted_mean", "sum"]))
    if "rescale" in spec.params.model_fields:
        options = ["none", "l1", "density" if name.startswith("dare") else "probability"]
        raw["rescale"] = draw(st.sampled_from(options))
    if name in ("dare_linear", "della_linear", "breadcrumbs") and draw(st.booleans()):
        raw["normalize"] = True
        assume(sum(raw["weight"]) != 0)
    try:
        return spec.params.model_validate(raw)
    except ValueError:
        assume(False)


_LEVELS = ["portable", "avx2", "avx512"]
ISAS = _LEVELS[: _LEVELS.index(kernels.best_isa() or "portable") + 1]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(K.METHODS), isa=st.sampled_from(ISAS))
def test_each_method_equals_its_reference(data: Any, name: str, isa: str) -> None:
    """Every instruction set the CPU runs (``SOUPKIT_KERNELS_ISA`` caps it) gives the bytes."""
    xs, base = data.draw(cases())
    p = _params(data.draw, name, len(xs))
    n = base.numel()
    shape: tuple[int, ...] = (n,)
    if name.startswith("della") and n in (64, 1024, 3001 - 1):
        shape = (n // 8, 8) if n % 8 == 0 else shape
    if name.startswith("della") and n == 1025:
        shape = (25, 41)
    rng = CounterRNG(data.draw(st.integers(0, 2**64 - 1)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOUPKIT_KERNELS_ISA", isa)
        assert kernels.isa() == isa
        got = K.merge(name, xs, base, p, rng=rng, shape=shape)
    want = K._reference(name, [x.reshape(shape) for x in xs], base.reshape(shape), p, rng).reshape(
        -1
    )
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert _same(got, want), (name, p, int((_bits(got) != _bits(want)).sum()))


@settings(max_examples=200, deadline=None)
@given(
    key=st.integers(0, 2**64 - 1),
    offset=st.integers(0, 2**40),
    stream=st.integers(0, 63),
    n=SIZES,
)
def test_native_philox_draws_equal_the_reference(
    key: int, offset: int, stream: int, n: int
) -> None:
    out = torch.empty(n, dtype=torch.int32)
    K._ext.philox_draws(key, offset, n, stream, out.data_ptr(), K._isa())
    want = _philox.uniform24(CounterRNG(key, offset), stream, n)
    assert torch.equal(out.to(torch.int64), want)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("back", [0, 1, 5, 37, 63, 64, 200])
def test_vector_philox_carries_into_the_high_counter_word(isa: str, back: int) -> None:
    """The vector paths count 8 or 16 counters per vector: a counter crossing 2^32 inside one
    carries into the high word (element 4 * 2^32 is counter 2^32)."""
    offset = (4 << 32) - back
    out = torch.empty(1000, dtype=torch.int32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOUPKIT_KERNELS_ISA", isa)
        K._ext.philox_draws(2**64 - 1, offset, 1000, 7, out.data_ptr(), K._isa())
    want = _philox.uniform24(CounterRNG(2**64 - 1, offset), 7, 1000)
    assert torch.equal(out.to(torch.int64), want)


def test_native_philox_answers_the_known_answer_vector() -> None:
    # counter (0, 0, 0, 0), key (0, 0): Random123's first philox4x32-10 vector, >> 8
    out = torch.empty(4, dtype=torch.int32)
    K._ext.philox_draws(0, 0, 4, 0, out.data_ptr(), 0)
    assert out.tolist() == [w >> 8 for w in (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_magnitude_cut_equals_topk_cut(data: Any) -> None:
    xs, base = data.draw(cases())
    x = xs[0]
    n = base.numel()
    k = data.draw(st.integers(-1, n + 1))
    got = K.magnitude_cut(x, base, k)
    want = topk_cut((x.float() - base.float()).abs_(), k)
    if want is None or got is None:
        assert got == want
        return
    assert got.ties == want.ties
    assert got.threshold == want.threshold or (
        math.isnan(got.threshold) and math.isnan(want.threshold)
    )


def _pieces(draw: Any, n: int) -> list[tuple[int, int]]:
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=5))) | {0, n})
    return [(a, b) for a, b in zip(cuts, cuts[1:])] or [(0, 0)]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_ties_pieces_spend_the_tie_quota_as_the_whole_tensor(data: Any) -> None:
    xs, base = data.draw(cases())
    p = _params(data.draw, "ties", len(xs))
    n = base.numel()
    cuts: list[MagnitudeCut | None] = [
        K.magnitude_cut(x, base, int(d * n)) if d < 1 else None for x, d in zip(xs, p.density)
    ]
    quota = [c.ties if (c is not None and c.ties is not None) else 0 for c in cuts]
    quota_ref = list(quota)
    out = torch.empty(n, dtype=torch.float32)
    ref = torch.empty(n, dtype=torch.float32)
    pieces = _pieces(data.draw, n)
    for a, b in pieces:
        K.ties_piece([x[a:b] for x in xs], base[a:b], p, cuts, quota, out=out[a:b])
    # the torch path of the same function (the engine's _piece_cuts + the method)
    saved = K._ext
    try:
        K._ext = None
        for a, b in pieces:
            K.ties_piece([x[a:b] for x in xs], base[a:b], p, cuts, quota_ref, out=ref[a:b])
    finally:
        K._ext = saved
    assert quota == quota_ref
    assert _same(out, ref)
    # pieces give the whole tensor's result, except for a NaN delta in a piece without any
    # entry tied at a +Inf threshold: the engine's chunk_cut drops it there (ties 0 at +Inf
    # keeps nothing), the whole-tensor cut keeps it (the output is non-finite either way)
    deltas = [x.float() - base.float() for x in xs]
    if not any(bool(d.isnan().any()) for d in deltas):
        assert _same(out, K.merge("ties", xs, base, p))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(K.CUT_METHODS))
def test_cut_pieces_counted_on_threads_equal_the_pieces_in_order(data: Any, name: str) -> None:
    """What the engine does with the pieces of a unit: count each piece's ties at the
    thresholds (`TensorCuts.count`, the native `count_equal`) on several threads in any order,
    hand the cuts out in flat order (`piece_counted`), then run the pieces on several threads:
    the bytes, and the quotas left, of the pieces handed out one after another by
    `TensorCuts.piece` and merged by the torch reference (ties at the thresholds spread over
    the pieces, NaN / Inf, every dtype)."""
    from soupkit.methods._cuts import TensorCuts

    xs, base = data.draw(cases())
    p = _params(data.draw, name, len(xs))
    n = base.numel()
    cuts = []
    for x, d, g in zip(xs, p.density, getattr(p, "gamma", [None] * len(xs)), strict=True):
        keep = int(d * n)
        if g is None:
            cuts.append((K.magnitude_cut(x, base, keep) if d < 1 else None,))
        else:
            top = min(int(g * n), n - keep)
            cuts.append((K.magnitude_cut(x, base, top + keep), K.magnitude_cut(x, base, top)))
    pieces = _pieces(data.draw, n)
    threaded, ordered = TensorCuts(cuts), TensorCuts(cuts)
    order = data.draw(st.permutations(range(len(pieces))))

    def count(i: int) -> tuple[int, Any]:
        a, b = pieces[i]
        return i, threaded.count([x[a:b] for x in xs], base[a:b], K.count_equal)

    with concurrent.futures.ThreadPoolExecutor(data.draw(st.integers(1, 3))) as pool:
        counts = dict(pool.map(count, order))
        parts = [threaded.piece_counted(counts[i]) for i in range(len(pieces))]
        out = torch.empty(n, dtype=torch.float32)

        def run(i: int) -> None:
            a, b = pieces[i]
            K.cut_piece(name, [x[a:b] for x in xs], base[a:b], p, parts[i], out=out[a:b])

        list(pool.map(run, order))
    ref = torch.empty(n, dtype=torch.float32)
    for a, b in pieces:
        px, pb = [x[a:b].float() for x in xs], base[a:b].float()
        K._reference(name, px, pb, p, None, ordered.piece(px, pb), out=ref[a:b])
    assert threaded.quota == ordered.quota
    assert _same(out, ref), (name, p)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), name=st.sampled_from(["dare_linear", "dare_ties"]))
def test_dare_pieces_on_threads_equal_the_whole_tensor(data: Any, name: str) -> None:
    xs, base = data.draw(cases())
    p = _params(data.draw, name, len(xs))
    assume(p.rescale != "l1")  # the L1 norm is per piece: pieces are another merge
    # a float16 NaN's float32 payload depends on where the piece's float16 tail starts
    # (torch's conversion, which the kernel reproduces per call): pieces give other payloads
    assume(not any(t.dtype == torch.float16 and bool(t.isnan().any()) for t in (*xs, base)))
    n = base.numel()
    rng = CounterRNG(data.draw(st.integers(0, 2**64 - 1)))
    whole = K.merge(name, xs, base, p, rng=rng)
    out = torch.empty(n, dtype=torch.float32)
    _on_threads(name, xs, base, p, rng, _pieces(data.draw, n), data.draw(st.integers(1, 3)), out)
    assert _same(out, whole)


def _on_threads(
    name: str,
    xs: list[torch.Tensor],
    base: torch.Tensor,
    p: Any,
    rng: CounterRNG,
    pieces: list[tuple[int, int]],
    threads: int,
    out: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """`K.merge` of each piece ``[a, b)`` (``rng.at(a)``), on ``threads`` threads at once."""

    def one(ab: tuple[int, int]) -> torch.Tensor:
        a, b = ab
        dest = None if out is None else out[a:b]
        return K.merge(name, [x[a:b] for x in xs], base[a:b], p, rng=rng.at(a), out=dest)

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, pieces))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    della=st.booleans(),
    isa=st.sampled_from(ISAS),
    density=st.sampled_from([1e-4, 0.1, 0.3, 0.77, 0.999]),
)
def test_l1_drop_sums_the_reference_norms_and_records_its_drops(
    data: Any, della: bool, isa: str, density: float
) -> None:
    """The L1 pass of ``rescale: l1``: both norms are `_ops.l1_norm`'s bits (NaN, Inf too) and
    the recorded keep flags are the reference's drops."""
    xs, base = data.draw(cases())
    x, n = xs[0], base.numel()
    rng = CounterRNG(data.draw(st.integers(0, 2**64 - 1)), data.draw(st.integers(0, 2**40)))
    stream = data.draw(st.integers(0, 63))
    delta = x.float() - base.float()
    if della:
        probs = _ops.della_keep_probs(delta, density, 0.1).contiguous()
        spec = K._spec(K._SP_DELLA, probs=probs.data_ptr())
        dropped = _ops.della_drop(delta, density, 0.1, rng, "none", stream=stream)
    else:
        spec = K._spec(K._SP_DARE, thresh=_philox.keep_threshold(density))
        dropped = _ops.dare_drop(delta, density, rng, "none", stream=stream)
    mask = torch.full((n,), 7, dtype=torch.uint8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOUPKIT_KERNELS_ISA", isa)
        before, after = K._ext.l1_drop(
            x.data_ptr(), K._DTYPES[x.dtype], base.data_ptr(), K._DTYPES[base.dtype], n, spec,
            rng.key, rng.offset, stream, mask.data_ptr(), *K._conv(n), K._isa(),
        )  # fmt: skip
    for got, want in ((before, _ops.l1_norm(delta)), (after, _ops.l1_norm(dropped))):
        assert got == want or (math.isnan(got) and math.isnan(want)), (got, want)
    v = _philox.uniform24(rng, stream, n)
    if della:
        keep = v.to(torch.float32).mul_(2.0**-24) < probs
    else:
        keep = v < _philox.keep_threshold(density)
    assert torch.equal(mask, keep.to(torch.uint8))  # every byte written, 0 or 1
    assert _same(delta.masked_fill(~mask.bool(), 0.0), dropped)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(["dare_linear", "dare_ties"]))
def test_l1_rescaled_blocks_on_threads_equal_one_thread(data: Any, name: str) -> None:
    """``rescale: l1`` is per block (the engine's RNG block): blocks merged on several threads
    at once give each block's one-thread bytes."""
    xs, base = data.draw(cases())
    p = _params(data.draw, name, len(xs)).model_copy(update={"rescale": "l1"})
    n = base.numel()
    rng = CounterRNG(data.draw(st.integers(0, 2**64 - 1)))
    blocks = _pieces(data.draw, n)
    want = [K.merge(name, [x[a:b] for x in xs], base[a:b], p, rng=rng.at(a)) for a, b in blocks]
    got = _on_threads(name, xs, base, p, rng, blocks * 2, data.draw(st.integers(2, 3)))
    assert all(_same(g, w) for g, w in zip(got, want * 2))


def test_disabled_kernels_run_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOUPKIT_KERNELS", "0")
    assert not K.native()
    spec = get_method("dare_ties")
    p = spec.params.model_validate({"weight": [1.0, 1.0], "density": [0.5, 0.5]})
    base = torch.randn(100)
    xs = [base + torch.randn(100), base - torch.randn(100)]
    got = K.merge("dare_ties", xs, base, p, rng=CounterRNG(1))
    assert _same(got, K._reference("dare_ties", xs, base, p, CounterRNG(1)))
    monkeypatch.setenv("SOUPKIT_KERNELS", "1")
    assert K.native()


def test_bad_inputs_are_refused() -> None:
    p = get_method("ties").params.model_validate({"weight": [1.0], "density": [0.5]})
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        K.merge("ties", [torch.zeros(3, dtype=torch.float64)], torch.zeros(3), p)
    with pytest.raises(ValueError, match="differ in size"):
        K.merge("ties", [torch.zeros(4)], torch.zeros(3), p)
    with pytest.raises(ValueError, match="contiguous"):
        K.merge("ties", [torch.zeros(3, 2).t()], torch.zeros(2, 3), p)


@pytest.mark.parametrize("name", K.METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_realistic_tensor_equals_the_reference(name: str, dtype: torch.dtype) -> None:
    # many blocks of the kernel, rows of DELLA longer than a block, bf16-like ties
    g = torch.Generator().manual_seed(7)
    shape = (37, 1029)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(4)]
    raw: dict[str, Any] = {"weight": [1.0, 0.5, 0.25, 2.0], "density": [0.3, 0.5, 0.9, 1.0]}
    if name.startswith("della"):
        raw["epsilon"] = [0.1, 0.2, 0.05, 0.0]
    if name.startswith("breadcrumbs"):
        raw["gamma"] = [0.01, 0.1, 0.0, 0.05]
    p = get_method(name).params.model_validate(raw)  # DARE / DELLA: mergekit's L1 rescale
    rng = CounterRNG(2**63 + 12345, 0)
    got = K.merge(name, xs, base, p, rng=rng)
    assert _same(got, K._reference(name, xs, base, p, rng))


PORTABLE_CHECK = r"""
import torch
import soupkit.kernels as k
from soupkit.kernels import sparsify as K
from soupkit.methods import CounterRNG, get
assert K.native() and k.best_isa() == "portable", k.best_isa()
g = torch.Generator().manual_seed(3)
for n in (0, 1, 17, 2049):
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        base = torch.randn(n, generator=g).to(dt)
        xs = [(base.float() + 0.1 * torch.randn(n, generator=g)).to(dt) for _ in range(3)]
        for name in K.METHODS:
            raw = {"weight": [1.0, 0.5, 2.0], "density": [0.3, 0.5, 0.9]}
            if name.startswith("della"):
                raw["epsilon"] = [0.1, 0.2, 0.05]
            if name.startswith("breadcrumbs"):
                raw["gamma"] = [0.01, 0.1, 0.0]
            p = get(name).params.model_validate(raw)
            got = K.merge(name, xs, base, p, rng=CounterRNG(9))
            want = K._reference(name, xs, base, p, CounterRNG(9)).reshape(-1)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (name, n, dt)
print("ok")
"""


def test_portable_only_build(tmp_path: Path) -> None:
    """Built with -DSOUPKIT_NO_SIMD (the portable path alone, as on aarch64), the sparsifying
    kernels give the reference's bytes too."""
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "SOUPKIT_REQUIRE_KERNELS": "1", "CFLAGS": "-DSOUPKIT_NO_SIMD"}
    r = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp"), "--force"],
        cwd=root, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    pkg = tmp_path / "pkg"
    shutil.copytree(
        root / "src" / "soupkit", pkg / "soupkit", ignore=shutil.ignore_patterns("*.so")
    )
    for so in (tmp_path / "lib").rglob("*.so"):
        shutil.copy(so, pkg / "soupkit" / "kernels" / so.name)
    r = subprocess.run(
        [sys.executable, "-c", PORTABLE_CHECK],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(pkg), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_the_extension_refuses_malformed_calls() -> None:
    x = torch.zeros(4)
    none = (0, 0, 1.0, 0.0, -1, 1, 0, 0.0, -1, 1, 0, 0)
    comb = (0, 0, 0, 0, 0, 1.0, 0, 1.0, [1.0])
    args = ([x.data_ptr()], [0], x.data_ptr(), 0, 4, x.data_ptr(), 0, 0)
    with pytest.raises(ValueError, match="null address"):
        K._ext.gta([0], [0], x.data_ptr(), 0, 4, x.data_ptr(), 0, 0, [none], comb, 4, 0, 0)
    with pytest.raises(ValueError, match="unknown dtype"):
        K._ext.gta(
            [x.data_ptr()], [7], x.data_ptr(), 0, 4, x.data_ptr(), 0, 0, [none], comb, 4, 0, 0
        )
    with pytest.raises(ValueError, match="malformed sparsify spec"):
        K._ext.gta(*args, [(9, *none[1:])], comb, 4, 0, 0)
    with pytest.raises(ValueError, match="malformed sparsify spec"):  # DELLA without probabilities
        K._ext.gta(*args, [(4, *none[1:])], comb, 4, 0, 0)
    with pytest.raises(ValueError, match="malformed combine spec"):
        K._ext.gta(*args, [none], (0, 5, 0, 0, 0, 1.0, 0, 1.0, [1.0]), 4, 0, 0)
    with pytest.raises(ValueError, match="1 to 64 models"):
        K._ext.gta([], [], x.data_ptr(), 0, 4, x.data_ptr(), 0, 0, [], comb, 4, 0, 0)


@pytest.mark.parametrize("name", K.CUT_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cut_piece_equals_the_reference_piece_by_piece(name: str, dtype: torch.dtype) -> None:
    """Pieces in flat order, each given its cuts by `TensorCuts.piece` (tie quotas spent across
    pieces): the kernel's piece is the reference's piece, and the pieces together are the
    whole-tensor merge."""
    from soupkit.methods._cuts import TensorCuts

    g = torch.Generator().manual_seed(3)
    n = 5003
    base = torch.randn(n, generator=g).to(dtype)
    # coarse deltas: many entries tie at each threshold, so the quotas matter
    xs = [(base.float() + torch.randint(-3, 4, (n,), generator=g) / 64).to(dtype) for _ in range(3)]
    spec = get_method(name)
    per = {"density": [0.4, 0.55, 0.7]} | ({"gamma": [0.02, 0.0, 0.05]} if name != "ties" else {})
    p = spec.params.model_validate({"weight": [1.0, 0.5, 0.8], "lambda": 0.8} | per)
    cuts = []
    for i, x in enumerate(xs):
        k = int(per["density"][i] * n)
        if name == "ties":
            cuts.append((K.magnitude_cut(x, base, k),))
        else:
            top = min(int(per["gamma"][i] * n), n - k)
            cuts.append((K.magnitude_cut(x, base, top + k), K.magnitude_cut(x, base, top)))
    assert any(c is not None and c.ties is not None for cc in cuts for c in cc)
    stat_k, stat_r = TensorCuts(cuts), TensorCuts(cuts)
    whole = K.merge(name, xs, base, p)
    pieces = []
    for s in range(0, n, 777):
        e = min(n, s + 777)
        px, pb = [x[s:e] for x in xs], base[s:e]
        got = K.cut_piece(name, px, pb, p, stat_k.piece(px, pb))
        f32 = [x.float() for x in px]
        want = K._reference(name, px, pb, p, None, stat_r.piece(f32, pb.float()))
        assert _same(got, want), (name, s)
        pieces.append(got)
    assert _same(torch.cat(pieces), whole)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_global_topk_counted_natively_equals_the_torch_counts(data: Any) -> None:
    """`GlobalTopK` (TIES ``trim_scope: global``) fed the native histograms of several tensors'
    chunks (`magnitude_hist` from the stored dtypes) gives the cuts of the torch counts over the
    float32 patterns, the third pass (surplus ties counted per tensor) included."""
    from soupkit.methods._cuts import GlobalTopK
    from soupkit.methods._topk import magnitude_bits

    tensors = [data.draw(cases()) for _ in range(data.draw(st.integers(1, 3)))]
    m = min(len(xs) for xs, _ in tensors)
    total = sum(base.numel() for _, base in tensors)
    ks = [data.draw(st.integers(-1, total + 1)) for _ in range(m)]
    accs = {"native": GlobalTopK(total, ks), "torch": GlobalTopK(total, ks)}
    for step in range(3):
        for kind, acc in accs.items():
            if not acc.wants(step):
                continue
            for part, (xs, base) in enumerate(tensors):
                for a, b in _pieces(data.draw, base.numel()):
                    if kind == "native":
                        seen: dict[int, Any] = {
                            i: K.NativeMagnitude(xs[i][a:b], base[a:b]) for i in acc.models
                        }
                    else:
                        d = {i: xs[i][a:b].float() - base[a:b].float() for i in acc.models}
                        seen = {i: magnitude_bits(v) for i, v in d.items()}
                    acc.add(step, part, seen)
            acc.end_pass(step)
    assert accs["native"].wants(2) == accs["torch"].wants(2)
    for part in range(len(tensors)):
        got, want = (accs[k].result(part) for k in ("native", "torch"))
        assert got.quota == want.quota
        assert [[repr(c) for c in cc] for cc in got.cuts] == [
            [repr(c) for c in cc] for cc in want.cuts
        ]
