"""Native kernels of the sparsifying task-vector methods: TIES, DARE, DELLA, Model Breadcrumbs.

Each function takes the models' tensors and the base **in their native dtype** (float32,
bfloat16 or float16; contiguous CPU tensors of the same number of elements), and returns the
float32 tensor that the method's ``MethodSpec.call`` returns for the same inputs converted to
float32 (``base + lambda * merged``), byte for byte: the C code (``_sparsify.c``) performs the
reference's float32 operations in the reference's order, and draws DARE's / DELLA's random
numbers with the same Philox4x32-10 stream (`soupkit.methods._philox`).

Without the extension (not built, or ``SOUPKIT_KERNELS=0``) every function runs the torch
reference instead, so callers need no second path; `native` says which one runs. The kernels
cover every switch of these methods, for the input dtypes that `soupkit.kernels.supports`
accepts (float16 needs the calibration of torch's conversion); `supported` is False otherwise
and the functions use the reference. ``rescale: l1`` (mergekit's default for DARE / DELLA) takes
two passes: per model, one draws the drops, records them (a byte per element) and sums the L1
norms of the delta and of the dropped delta in `soupkit.methods._ops.l1_norm`'s fixed order
(a float64 pairwise tree, so C gives the reference's bits); the fused pass then applies the recorded drops
and the factor. A piece whose factor is NaN (it holds a NaN) runs the reference: which of two
NaN operands torch's product keeps depends on its loop.

The engine streams TIES with `cut_piece`, given each piece's cuts by
``soupkit.methods._cuts.TensorCuts`` (each model's `MagnitudeCut`, its tie quota spent in flat
order across pieces, the ties counted by `count_equal`). `ties_piece` does the same in one call
(the cuts and the quota bookkeeping together), for tests and `benchmarks/kernels_sparsify.py`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import MutableSequence, Sequence
from types import ModuleType
from typing import Any

import torch

from soupkit.kernels import _calibrate, available, isa
from soupkit.kernels import supports as _supports_dtypes
from soupkit.methods import MagnitudeCut, Params
from soupkit.methods import get as get_method
from soupkit.methods._ops import band_ranks, l1_factor, topk_cut
from soupkit.methods._philox import CounterRNG, counter_rng, keep_threshold
from soupkit.methods._topk import TopKSelect

_ext: ModuleType | None
try:  # the extension is optional: without it, the torch reference runs
    _ext = importlib.import_module("soupkit.kernels._sparsify")
except ImportError:  # built without a C compiler, or a source tree without `make kernels`
    _ext = None

__all__ = [
    "METHODS",
    "NativeMagnitude",
    "count_equal",
    "cut_piece",
    "magnitude_cut",
    "magnitude_hist",
    "merge",
    "native",
    "supported",
    "ties_piece",
]

METHODS = (
    "ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MAX_MODELS = 64

# kinds, rescales and combine codes of _sparsify.c
_SP_NONE, _SP_CUT, _SP_BAND, _SP_DARE, _SP_DELLA, _SP_MASK = range(6)
_RS_NONE, _RS_DIV, _RS_PROB, _RS_MUL = range(4)
_SIGN_SOURCE = {"unweighted": 0, "weighted": 1, "count": 2}
_SIGN_TIE = {"zero": 0, "positive": 1}
_AGGREGATION = {"mean": 0, "weighted_mean": 1, "sum": 2}
_KEEP_ALL = MagnitudeCut(-math.inf, None)


def native() -> bool:
    """True when the C kernels run (built, and not disabled with ``SOUPKIT_KERNELS=0``)."""
    return _ext is not None and available()


def supported(name: str, p: Any, dtypes: Sequence[torch.dtype]) -> bool:
    """Whether the kernels compute method ``name`` with parameters ``p`` on inputs of these
    dtypes (the models' and the base's); else the functions here run the reference."""
    if name not in METHODS or not 2 <= len(dtypes) <= _MAX_MODELS + 1:
        return False
    numbers = [*p.weight, p.lambda_]  # NaN / Inf ones are left to the reference
    return native() and _supports_dtypes(dtypes, torch.float32, numbers)


_LEVELS = {"portable": 0, "avx2": 1, "avx512": 2}


def _isa() -> int:
    """The instruction set `soupkit.kernels.isa` uses (``SOUPKIT_KERNELS_ISA`` caps it), as
    the level the C entry points take."""
    return _LEVELS.get(isa() or "portable", 0)


def _conv(n: int) -> tuple[int, int]:
    """(first element of the float16 tail, the float32 bits of a NaN there) for a piece of n
    elements: where torch's float16 conversion takes its other path."""
    cal = _calibrate()
    if cal is None or cal.f16_block is None:
        return n, 0
    return n - n % cal.f16_block, cal.f16_tail_nan


def _check(xs: Sequence[torch.Tensor], base: torch.Tensor) -> int:
    n = base.numel()
    for t in (*xs, base):
        if t.dtype not in _DTYPES:
            raise TypeError(f"kernel inputs must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("kernel inputs must be contiguous CPU tensors")
        if t.numel() != n:
            raise ValueError(f"kernel inputs differ in size: {t.numel()} and {n} elements")
    return n


def _reference(
    name: str,
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    p: Params,
    rng: CounterRNG | None,
    stat: Sequence[Sequence[MagnitudeCut | None]] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The method's torch function on float32 copies, flat (written into ``out`` if given)."""
    spec = get_method(name)
    f32 = [x.to(torch.float32, copy=True) for x in xs]
    res = spec.call(f32, p, base=base.to(torch.float32), rng=rng, stat=stat).reshape(-1)
    if out is None:
        return res
    out.copy_(res)
    return out


def _cut_spec(cut: MagnitudeCut | None) -> tuple[float, int, int]:
    """(threshold, ties (-1: None), keep NaN) of a whole-tensor cut, as `cut_mask` applies it."""
    if cut is None:
        cut = _KEEP_ALL
    ties = -1 if cut.ties is None else cut.ties
    keep_nan = not (cut.ties == 0 and cut.threshold == math.inf)
    return cut.threshold, ties, int(keep_nan)


def _spec(
    kind: int = _SP_NONE,
    rescale: int = _RS_NONE,
    div: float = 1.0,
    cut: tuple[float, int, int] = (0.0, -1, 1),
    low: tuple[float, int, int] | None = None,
    thresh: int = 0,
    probs: int = 0,
) -> tuple[Any, ...]:
    lo = low if low is not None else (0.0, -1, 1)
    return (kind, rescale, div, *cut, int(low is not None), *lo, thresh, probs)


def _combine(p: Any, consensus: bool) -> tuple[Any, ...]:
    weights = [float(w) for w in p.weight]
    lam = float(p.lambda_)
    if consensus:
        return (
            1,
            _SIGN_SOURCE[p.sign_source],
            _SIGN_TIE[p.sign_tie],
            _AGGREGATION[p.aggregation],
            0,
            1.0,
            int(lam != 1),
            lam,
            weights,
        )
    normalize = bool(getattr(p, "normalize", False))
    # linear_combine divides by the float32 sum torch computes
    divisor = float(torch.tensor(weights, dtype=torch.float32).sum()) if normalize else 1.0
    return (0, 0, 0, 0, int(normalize), divisor, int(lam != 1), lam, weights)


def _run(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    specs: Sequence[tuple[Any, ...]],
    combine: tuple[Any, ...],
    rng: CounterRNG | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    n = base.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32)
    assert _ext is not None
    used = _ext.gta(
        [x.data_ptr() for x in xs],
        [_DTYPES[x.dtype] for x in xs],
        base.data_ptr(),
        _DTYPES[base.dtype],
        n,
        out.data_ptr(),
        rng.key if rng is not None else 0,
        rng.offset if rng is not None else 0,
        list(specs),
        combine,
        *_conv(n),
        _isa(),
    )
    return out, used


# ---------------------------------------------------------------------------- magnitude cuts


def magnitude_hist(
    x: torch.Tensor, base: torch.Tensor, hist: torch.Tensor, bucket: int = -1
) -> None:
    """Add the bit patterns of ``|x - base|`` (float32 deltas) to ``hist`` (int64, in place):
    by their top 16 bits (``bucket < 0``, 32768 bins), or the low 16 bits of the patterns in
    top-16-bit bucket ``bucket`` (65536 bins): the two passes of the radix select of
    ``soupkit.methods._topk.TopKSelect`` (``add_hi`` / ``add_lo``), counted in one pass each."""
    n = _check([x], base)
    bins = 1 << 15 if bucket < 0 else 1 << 16
    if hist.dtype != torch.int64 or hist.numel() != bins or not hist.is_contiguous():
        raise ValueError(f"hist must be a contiguous int64 tensor of {bins} bins")
    if native() and _supports_dtypes([x.dtype, base.dtype], torch.float32):
        assert _ext is not None
        _ext.mag_hist(
            x.data_ptr(), _DTYPES[x.dtype], base.data_ptr(), _DTYPES[base.dtype], n,
            hist.data_ptr(), bucket, *_conv(n), _isa(),
        )  # fmt: skip
        return
    bits = (x.reshape(-1).float() - base.reshape(-1).float()).view(torch.int32) & 0x7FFFFFFF
    if bucket < 0:
        hist += torch.bincount(bits >> 16, minlength=bins)
    else:
        inside = bits[(bits >> 16) == bucket] & 0xFFFF
        hist += torch.bincount(inside, minlength=bins)


class NativeMagnitude:
    """A chunk's ``|x - base|`` patterns (float32 deltas) that the native kernel counts from
    the stored dtypes (`magnitude_hist`): a ``soupkit.methods._topk.MagnitudeHist`` for
    ``TopKSelect``."""

    def __init__(self, x: torch.Tensor, base: torch.Tensor) -> None:
        self.x, self.base = x, base

    def hist(self, out: torch.Tensor, bucket: int) -> None:
        magnitude_hist(self.x, self.base, out, bucket)


def magnitude_cut(x: torch.Tensor, base: torch.Tensor, k: int) -> MagnitudeCut | None:
    """The cut that keeps the ``k`` largest ``|x - base|`` (float32 deltas), ties by lower
    index: exactly ``soupkit.methods._ops.topk_cut(|delta|, k)``, found by
    ``soupkit.methods._topk.TopKSelect``'s radix select over the magnitudes' bit patterns (two
    native histogram passes) instead of a sort."""
    n = _check([x], base)
    if k >= n:
        return None
    if k <= 0:
        return MagnitudeCut(math.inf, 0)
    if not (native() and _supports_dtypes([x.dtype, base.dtype], torch.float32)):
        return topk_cut((x.float() - base.float()).abs_(), k)
    select, patterns = TopKSelect(n, (k,)), NativeMagnitude(x, base)
    select.add_hi(patterns)
    select.select_buckets()
    select.add_lo(patterns)
    return select.cut(k)


def count_equal(x: torch.Tensor, base: torch.Tensor, t: float) -> int:
    """How many entries have ``|x - base| == t`` (float32 deltas): the entries of a piece that
    a tie quota at threshold ``t`` may spend, so that a caller can start later pieces of a
    TIES merge on other threads with the quota the earlier ones leave."""
    n = _check([x], base)
    if not (native() and _supports_dtypes([x.dtype, base.dtype], torch.float32)):
        return int(((x.float() - base.float()).abs_() == t).sum())
    assert _ext is not None
    return int(
        _ext.count_equal(
            x.data_ptr(),
            _DTYPES[x.dtype],
            base.data_ptr(),
            _DTYPES[base.dtype],
            n,
            t,
            *_conv(n),
            _isa(),
        )  # fmt: skip
    )


# ---------------------------------------------------------------------------- TIES


def ties_piece(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    p: Any,
    cuts: Sequence[MagnitudeCut | None],
    quota: MutableSequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One piece of a streamed TIES merge (pieces in flat order).

    ``cuts`` are the models' whole-tensor cuts (from the pre-pass); ``quota[i]`` is how many
    entries equal to model i's threshold may still survive (``cut.ties`` before the first
    piece), spent here as ``soupkit.methods._topk.chunk_cut`` spends it. The result is what
    ``ties(deltas, p, stat=<the piece's cuts>)`` + base gives.
    """
    _check(xs, base)
    if not supported("ties", p, [x.dtype for x in (*xs, base)]):
        piece_cuts = []
        for i, c in enumerate(cuts):
            if c is None or c.ties is None or c.threshold != c.threshold:
                piece_cuts.append(c)
                continue
            equal = count_equal(xs[i], base, c.threshold) if quota[i] > 0 else 0
            take = min(equal, quota[i])
            ties = None if 0 < take == equal else take
            piece_cuts.append(MagnitudeCut(c.threshold, ties))
            quota[i] -= take
        return _reference("ties", xs, base, p, None, [(c,) for c in piece_cuts], out)
    specs = []
    for i, c in enumerate(cuts):
        if c is None:
            specs.append(_spec())
            continue
        if c.ties is None or c.threshold != c.threshold:
            specs.append(_spec(_SP_CUT, cut=_cut_spec(c)))
            continue
        keep_nan = 1
        if c.threshold == math.inf:  # NaN survives unless no tie of this piece does
            take = min(count_equal(xs[i], base, c.threshold), quota[i]) if quota[i] else 0
            keep_nan = int(take > 0)
        specs.append(_spec(_SP_CUT, cut=(c.threshold, quota[i], keep_nan)))
    res, used = _run(xs, base, specs, _combine(p, True), out=out)
    for i, c in enumerate(cuts):
        if c is not None and c.ties is not None and c.threshold == c.threshold:
            quota[i] -= used[i][0]
    return res


def _band_spec(upper: MagnitudeCut | None, lower: MagnitudeCut | None) -> tuple[Any, ...]:
    """The spec of ``apply_band(delta, upper, lower)`` (cuts of a whole tensor or a piece)."""
    low = None if lower is None or (lower.threshold == math.inf and lower.ties == 0) else lower
    if upper is None and low is None:
        return _spec()
    return _spec(_SP_BAND, cut=_cut_spec(upper), low=None if low is None else _cut_spec(low))


CUT_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")


def cut_piece(
    name: str,
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    p: Any,
    cuts: Sequence[Sequence[MagnitudeCut | None]],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One piece of a streamed TIES or Breadcrumbs merge (``name`` in `CUT_METHODS`), given
    the piece's own cuts: what the method's ``stat=`` argument holds for it (per model, TIES's
    one cut, Breadcrumbs' ``(upper, lower)`` band; the tie quotas already spent for the piece,
    as `soupkit.methods._cuts.TensorCuts.piece` hands them out). The result is the flat float32
    ``MethodSpec.call(..., stat=cuts)`` of the piece, byte for byte.
    """
    if name not in CUT_METHODS:
        raise ValueError(f"cut_piece serves {CUT_METHODS}, not {name!r}")
    _check(xs, base)
    if not supported(name, p, [x.dtype for x in (*xs, base)]):
        return _reference(name, xs, base, p, None, cuts, out)
    if name == "ties":
        specs = [_spec() if c[0] is None else _spec(_SP_CUT, cut=_cut_spec(c[0])) for c in cuts]
    else:
        specs = [_band_spec(upper, lower) for upper, lower in cuts]
    res, _ = _run(xs, base, specs, _combine(p, name != "breadcrumbs"), out=out)
    return res


# ---------------------------------------------------------------------------- whole calls


def _l1(
    spec: tuple[Any, ...],
    x: torch.Tensor,
    base: torch.Tensor,
    rng: CounterRNG | None,
    i: int,
    keep: list[torch.Tensor],
) -> tuple[Any, ...]:
    """``spec`` (a drop without rescale) with mergekit's L1 rescale: one pass draws the drops,
    records them (a byte per element, kept alive in ``keep``) and sums both L1 norms
    (`l1_norm`'s order); the returned spec applies the recorded drops and the factor
    (`l1_factor`), so the fused pass does not draw again."""
    assert _ext is not None and rng is not None
    n = base.numel()
    mask = torch.empty(n, dtype=torch.uint8)
    before, after = _ext.l1_drop(
        x.data_ptr(), _DTYPES[x.dtype], base.data_ptr(), _DTYPES[base.dtype], n, spec,
        rng.key, rng.offset, i, mask.data_ptr(), *_conv(n), _isa(),
    )  # fmt: skip
    scale = l1_factor(before, after)
    # a NaN factor (the piece holds NaN): which NaN torch's product keeps depends on its loop
    if scale is not None and scale.isnan():
        raise _UseReference
    keep.append(mask)
    rescale, factor = (_RS_NONE, 1.0) if scale is None else (_RS_MUL, float(scale))
    return (_SP_MASK, rescale, factor, *spec[3:-1], mask.data_ptr())


class _UseReference(Exception):
    """Raised while preparing a kernel call that the reference must make instead."""


def merge(
    name: str,
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    p: Any,
    *,
    rng: CounterRNG | torch.Generator | None = None,
    shape: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Method ``name`` (one of `METHODS`) on a whole tensor, or on a piece of one for the
    elementwise DARE methods (give ``rng`` the piece's offset: ``CounterRNG(key, start)``).

    Args:
        name: the method's registry name.
        xs: each model's tensor, native dtype, contiguous.
        base: the base tensor, native dtype.
        p: the method's validated parameters (per tensor).
        rng: the random source of the stochastic methods.
        shape: the tensor's shape (DELLA ranks within rows of the first dimension); default
            ``base.shape``.
        out: optional float32 output of ``base.numel()`` elements.

    Returns:
        The flat float32 result, byte for byte ``MethodSpec.call`` on float32 copies.
    """
    _check(xs, base)
    shape = tuple(shape) if shape is not None else tuple(base.shape)
    r = counter_rng(rng) if name.startswith(("dare", "della")) else None
    if supported(name, p, [x.dtype for x in (*xs, base)]):
        try:
            return _native(name, xs, base, p, r, shape, out)
        except _UseReference:
            pass
    return _reference(name, [x.reshape(shape) for x in xs], base.reshape(shape), p, r, out=out)


def _native(
    name: str,
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    p: Any,
    r: CounterRNG | None,
    shape: tuple[int, ...],
    out: torch.Tensor | None,
) -> torch.Tensor:
    n = base.numel()
    consensus = name in ("ties", "dare_ties", "della", "breadcrumbs_ties")
    keep: list[torch.Tensor] = []  # buffers the C code reads (DELLA's probabilities, masks)
    specs = []
    for i, x in enumerate(xs):
        d = p.density[i]
        if name == "ties":
            kk = int(d * n)
            cut = magnitude_cut(x, base, kk) if d < 1 else None
            specs.append(_spec() if cut is None else _spec(_SP_CUT, cut=_cut_spec(cut)))
        elif name.startswith("breadcrumbs"):
            top, keep_n = band_ranks(n, d, p.gamma[i])
            lower = magnitude_cut(x, base, top) if top > 0 else None
            specs.append(_band_spec(magnitude_cut(x, base, top + keep_n), lower))
        elif name.startswith("dare"):
            if d >= 1:
                specs.append(_spec())
                continue
            rs = _RS_DIV if p.rescale == "density" else _RS_NONE
            spec = _spec(_SP_DARE, rs, div=float(d), thresh=keep_threshold(d))
            specs.append(_l1(spec, x, base, r, i, keep) if p.rescale == "l1" else spec)
        else:  # della
            if d >= 1:
                specs.append(_spec())
                continue
            rows = 1 if len(shape) < 2 else shape[0]
            probs = torch.empty(n, dtype=torch.float32)
            assert _ext is not None
            _ext.della_probs(
                x.data_ptr(), _DTYPES[x.dtype], base.data_ptr(), _DTYPES[base.dtype],
                rows, n // rows if rows else 0, float(d), float(p.epsilon[i]), probs.data_ptr(),
                *_conv(n),
            )  # fmt: skip
            keep.append(probs)
            rs = _RS_PROB if p.rescale == "probability" else _RS_NONE
            spec = _spec(_SP_DELLA, rs, probs=probs.data_ptr())
            specs.append(_l1(spec, x, base, r, i, keep) if p.rescale == "l1" else spec)
    res, _ = _run(xs, base, specs, _combine(p, consensus), r, out)
    del keep
    return res
