"""Building blocks shared by the merge methods: small pure tensor functions.

Methods are 10-line compositions of these (the shape of PEFT's ``utils/merge_utils.py``):
trim (`trim_topk`, `trim_band`, `apply_cut`, `apply_band`), random drop (`dare_drop`, `della_drop`), sign
election (`elect_sign`), and aggregation (`weighted_sum`, `disjoint_merge`).

Conventions every function here keeps, so that results never depend on chunking or order:

- Sums over models run left to right in recipe order, one ``+=`` at a time. (PEFT and
  mergekit use ``torch.stack(...).sum(0)``, whose order depends on the number of models and
  the tensor size; for up to 4 models it is the same left-to-right order, bit for bit.)
- Products are formed before they are added (never ``add(alpha=)``), so no fused multiply-add
  changes a rounding.
- Magnitude trims keep *exactly* ``int(density * n)`` entries. Entries tied at the cut are
  ordered by position: among equal magnitudes the one with the lower flat (row-major) index
  ranks higher. `topk_cut` and `trim_band` both follow this one total order.
- Random numbers come only from the counter-based generator passed in (`CounterRNG`,
  Philox4x32-10, see `soupkit.methods._philox`): an element's draw depends only on the key,
  the model's position (its stream) and the element's flat index, so changing one model's
  density never changes another model's mask, and no draw depends on pieces or threads.

Speed without changing a bit: torch's boolean masks (comparisons into ``bool``,
``masked_fill``, ``float * bool``) run 5-20x slower than float arithmetic on CPU, so the hot
paths form masks as float 0/1 (``eq_`` into a float tensor: ``x * agree`` then multiplies by
exactly 1.0 or 0.0, as the bool promotes to) or as int32 all-ones/zero words (``where(keep, x,
+0.0)`` is ``bits(x) & mask``, bit for bit, NaN and -0.0 included). tests/methods/test_fast_ops.py
checks every such function against the straightforward formulation on adversarial inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch

from soupkit.methods import _philox
from soupkit.methods._philox import CounterRNG
from soupkit.methods._topk import MagnitudeCut

__all__ = [
    "Aggregation",
    "SignSource",
    "SignTie",
    "apply_band",
    "apply_cut",
    "band_ranks",
    "consensus_combine",
    "cut_mask",
    "dare_drop",
    "della_drop",
    "della_keep_probs",
    "disjoint_merge",
    "elect_sign",
    "l1_factor",
    "l1_norm",
    "l1_rescale",
    "l1_scale",
    "linear_combine",
    "scale_",
    "topk_cut",
    "trim_band",
    "trim_topk",
    "weighted_sum",
]

SignSource = Literal["unweighted", "weighted", "count"]
SignTie = Literal["zero", "positive"]
Aggregation = Literal["mean", "weighted_mean", "sum"]


# ---------------------------------------------------------------------------- magnitude trims


def topk_cut(magnitude: torch.Tensor, k: int) -> MagnitudeCut | None:
    """The cut that keeps exactly the ``k`` largest entries of ``magnitude`` (ties: lower index first).

    Args:
        magnitude (`torch.Tensor`): non-negative values (``|delta|``), any shape.
        k (`int`): how many entries to keep.

    Returns:
        A `MagnitudeCut`, or None when every entry is kept (``k >= numel``).
    """
    n = magnitude.numel()
    if k >= n:
        return None
    if k <= 0:
        return MagnitudeCut(math.inf, 0)
    flat = magnitude.reshape(-1)
    # the k-th largest is the (n - k + 1)-th smallest
    threshold = float(torch.kthvalue(flat, n - k + 1).values)
    above = int((flat > threshold).sum())
    equal = int((flat == threshold).sum())
    need = k - above
    return MagnitudeCut(threshold, None if need == equal else need)


def cut_mask(magnitude: torch.Tensor, cut: MagnitudeCut) -> torch.Tensor:
    """Boolean mask of the entries of ``magnitude`` that survive ``cut`` (same shape).

    NaN ranks above every number (as in ``torch.sort``/``topk`` and in the bit-pattern order of
    the global pre-pass), so a NaN survives any cut that keeps something and reaches the engine's
    non-finite check instead of vanishing.
    """
    keep = magnitude > cut.threshold
    if cut.ties != 0 or cut.threshold != math.inf:
        keep |= torch.isnan(magnitude)
    if cut.ties is None:
        keep |= magnitude == cut.threshold
    elif cut.ties > 0:
        equal = (magnitude == cut.threshold).reshape(-1)
        first = equal & (torch.cumsum(equal, 0) <= cut.ties)
        keep |= first.view(magnitude.shape)
    return keep


def _zero_where(x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``x.masked_fill(drop, 0.0)`` bit for bit, for float32 ``x`` and int32 ``drop`` of 0/1.

    ``drop - 1`` is 0 where dropped and all ones where kept, so a bitwise AND with the bits of
    ``x`` gives +0.0 or ``x`` unchanged (NaN payloads and -0.0 included). ``drop`` is consumed.
    """
    return torch.bitwise_and(x.view(torch.int32), drop.sub_(1)).view(torch.float32)


def apply_cut(delta: torch.Tensor, cut: MagnitudeCut | None) -> torch.Tensor:
    """Zero the entries of ``delta`` that do not survive ``cut`` (None keeps everything).

    Returns a new tensor (``delta`` itself when ``cut`` is None).
    """
    if cut is None:
        return delta
    finite_rule = cut.threshold == cut.threshold and (
        cut.ties is None or (cut.ties == 0 and cut.threshold != math.inf)
    )
    if delta.dtype != torch.float32 or not finite_rule:
        return delta.masked_fill(~cut_mask(delta.abs(), cut), 0.0)
    # keep |d| > t (ties == 0) or |d| >= t (ties is None), and NaN: drop exactly where the
    # opposite comparison holds (NaN fails every comparison, so it is never dropped)
    drop = torch.empty(delta.shape, dtype=torch.int32)
    if cut.ties is None:
        torch.lt(delta.abs(), cut.threshold, out=drop)
    else:
        torch.le(delta.abs(), cut.threshold, out=drop)
    return _zero_where(delta, drop)


def trim_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest-magnitude entries of ``delta``, zero the rest.

    Args:
        delta (`torch.Tensor`): a task vector (any shape).
        density (`float`): fraction to keep, in (0, 1]; 1 keeps everything.

    Returns:
        `torch.Tensor`: the trimmed tensor (a new tensor unless nothing is trimmed).
    """
    if density >= 1:
        return delta
    return apply_cut(delta, topk_cut(delta.abs(), int(density * delta.numel())))


def band_ranks(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Model Breadcrumbs' kept ranks ``[top, top + keep)`` of ``n`` entries (see `trim_band`)."""
    keep = int(density * n)
    return min(int(gamma * n), n - keep), keep


def apply_band(
    delta: torch.Tensor, upper: MagnitudeCut | None, lower: MagnitudeCut | None
) -> torch.Tensor:
    """Keep the entries of ``delta`` that survive ``upper`` but not ``lower`` (a new tensor).

    ``upper`` keeps the ``top + keep`` largest (None: everything), ``lower`` the ``top`` largest
    (None or keeping nothing: no outliers dropped); works on a whole tensor or, with each cut's
    share of the tie quota, on a piece of one.
    """
    magnitude = delta.abs()
    mask = (
        torch.ones_like(magnitude, dtype=torch.bool)
        if upper is None
        else cut_mask(magnitude, upper)
    )
    if lower is not None and not (lower.threshold == math.inf and lower.ties == 0):
        mask &= ~cut_mask(magnitude, lower)
    return delta.masked_fill(~mask, 0.0)


def trim_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs' trim: drop the largest ``gamma`` fraction and the smallest entries.

    With ``n = numel``: ``keep = int(density * n)`` entries survive; the ``top = int(gamma * n)``
    largest are dropped first (fewer if ``top + keep > n``: then ``top = n - keep``), and the
    entries ranked below ``top + keep`` are dropped too, exactly as mergekit's
    ``magnitude_outliers`` counts them. Ranks follow the module's total order (magnitude,
    then lower index first), so the kept band is ranks ``[top, top + keep)``.

    Args:
        delta (`torch.Tensor`): a task vector.
        density (`float`): fraction kept, in (0, 1].
        gamma (`float`): fraction of largest-magnitude entries dropped, in [0, 1).

    Returns:
        `torch.Tensor`: the trimmed tensor.
    """
    n = delta.numel()
    top, keep = band_ranks(n, density, gamma)
    if top <= 0 and keep >= n:
        return delta
    magnitude = delta.abs()
    lower = topk_cut(magnitude, top) if top > 0 else None
    return apply_band(delta, topk_cut(magnitude, top + keep), lower)


# ---------------------------------------------------------------------------- random drops


L1_LANES = 8


def l1_norm(x: torch.Tensor) -> float:
    """The L1 norm of ``x`` in soupkit's fixed order, as a float64 (NaN if ``x`` holds NaN).

    The magnitudes as float64, in rows of 8 (flat element ``j`` in row ``j // 8``, lane
    ``j % 8``; the last row padded with zeros), the rows padded with zero rows to a power of two
    and summed as a pairwise tree (adjacent rows, then adjacent pairs, ...; ``x + 0`` is exact,
    so the padding changes nothing), then the lanes as
    ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``. The order depends only on the size,
    so the native kernel (`soupkit.kernels.sparsify`, which builds the same tree as the rows
    stream in) computes the same bits, on any number of threads; and float64 sums of float32
    magnitudes carry no float32 rounding. (Before issue 17: a float32 ``sum()`` in torch's
    own order, which C does not reproduce at full speed.)
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    rows = -(-n // L1_LANES)
    if rows == 0:
        return 0.0
    power = 1 << (rows - 1).bit_length()
    a = torch.empty(power * L1_LANES, dtype=torch.float64)
    a[:n].copy_(flat).abs_()
    a[n:].zero_()
    r = a.view(power, L1_LANES)
    while r.shape[0] > 1:
        pairs = r.view(-1, 2, L1_LANES)
        r = pairs[:, 0] + pairs[:, 1]
    lane: list[float] = r[0].tolist()
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))


def l1_factor(before: float, after: float, eps: float = 1e-7) -> torch.Tensor | None:
    """The float32 factor (0-d) ``f32(before) / f32(after)`` of two `l1_norm` values (each
    rounded once to float32), or None when either is below ``eps`` (mergekit's rule)."""
    b, a = torch.tensor([before, after], dtype=torch.float64).to(torch.float32).unbind()
    if b < eps or a < eps:
        return None
    factor: torch.Tensor = b / a
    return factor


def l1_scale(
    original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor | None:
    """The float32 factor (0-d) that gives ``masked`` the L1 norm of ``original`` (`l1_norm`,
    `l1_factor`), or None when either norm is below ``eps`` (then ``masked`` stays as it is,
    as mergekit does)."""
    return l1_factor(l1_norm(original), l1_norm(masked), eps)


def l1_rescale(original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm matches ``original``'s (mergekit's ``rescale_norm: l1``).

    Left unscaled when either norm is below ``eps``, as mergekit does (`l1_scale`).
    """
    scale = l1_scale(original, masked, eps)
    return masked if scale is None else masked * scale


def dare_drop(
    delta: torch.Tensor,
    density: float,
    rng: CounterRNG | torch.Generator,
    rescale: Literal["density", "l1", "none"] = "density",
    *,
    stream: int = 0,
) -> torch.Tensor:
    """DARE: drop each entry independently with probability ``1 - density``, rescale survivors.

    An entry survives when its draw ``u = v / 2^24`` (``v`` = `_philox.uniform24` of the
    entry's flat index ``rng.offset + j`` in stream ``stream``) is below ``density``, i.e. when
    ``v < keep_threshold(density)``. Each element's decision depends only on its own draw: the
    operation is elementwise, and a piece of a tensor given ``rng.at(start)`` gets the same
    decisions as the whole tensor.

    Args:
        delta (`torch.Tensor`): a task vector.
        density (`float`): survival probability, in (0, 1]; 1 keeps everything (no draws).
        rng: the only source of randomness (a ``torch.Generator`` stands for its seed, see
            `_philox.counter_rng`).
        rescale: ``"density"`` divides survivors by ``density`` (the paper, PEFT); ``"l1"``
            matches the L1 norm of ``delta`` (mergekit); ``"none"`` leaves them.
        stream: the model's position in the recipe (its own sequence of draws).

    Returns:
        `torch.Tensor`: the sparsified tensor.
    """
    if density >= 1:
        return delta
    v = _philox.uniform24(_philox.counter_rng(rng), stream, delta.numel()).view(delta.shape)
    threshold = _philox.keep_threshold(density)
    if delta.dtype == torch.float32:
        drop = torch.empty(delta.shape, dtype=torch.int32)
        dropped = _zero_where(
            delta, torch.ge(v, threshold, out=drop)
        )  # = masked_fill(~(v < threshold))
    else:
        dropped = delta.masked_fill(~(v < threshold), 0.0)
    if rescale == "density":
        return dropped.div_(density)
    if rescale == "l1":
        return l1_rescale(delta, dropped)
    return dropped


def della_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities, ranked by magnitude within each row.

    Rows are the first dimension (``delta.reshape(shape[0], -1)``; a vector is one row). In a
    row of ``m`` entries ranked ``r = 0 .. m-1`` from the smallest magnitude (ties: lower index
    ranks lower), ``p = density - epsilon + 2 * epsilon * r / (m - 1)``: from
    ``density - epsilon`` to ``density + epsilon``, mean ``density`` (mergekit's
    parameterisation; a row of one entry gets ``density``).

    Returns:
        `torch.Tensor`: float32 probabilities shaped like ``delta``.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, dtype=order.dtype).expand_as(order))
    if m > 1:
        rank_norm = ranks.to(torch.float32) / (m - 1)
    else:
        rank_norm = torch.full(rows.shape, 0.5)
    # mergekit's expression order: (density - epsilon) + rank_norm * 2 * epsilon
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.reshape(delta.shape)


def della_drop(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rng: CounterRNG | torch.Generator,
    rescale: Literal["probability", "l1", "none"] = "probability",
    *,
    stream: int = 0,
) -> torch.Tensor:
    """DELLA: drop entries with magnitude-ranked probabilities (`della_keep_probs`), rescale.

    Args:
        delta (`torch.Tensor`): a task vector.
        density (`float`): mean keep probability, in (0, 1]; 1 keeps everything (no draws).
        epsilon (`float`): half-width of the keep-probability range.
        rng: the only source of randomness; entry ``j`` survives when its draw
            ``u = v / 2^24`` (as in `dare_drop`, stream ``stream``) is below its probability.
        rescale: ``"probability"`` divides each survivor by its own keep probability (the
            paper's ``1 / (1 - p_i)``); ``"l1"`` matches the L1 norm (mergekit); ``"none"``.

    Returns:
        `torch.Tensor`: the sparsified tensor.
    """
    if density >= 1:
        return delta
    probs = della_keep_probs(delta, density, epsilon)
    v = _philox.uniform24(_philox.counter_rng(rng), stream, delta.numel()).view(delta.shape)
    keep = v.to(torch.float32).mul_(2.0**-24) < probs  # exact: v has 24 bits
    dropped = delta.masked_fill(~keep, 0.0)
    if rescale == "probability":
        return dropped.div_(probs)
    if rescale == "l1":
        return l1_rescale(delta, dropped)
    return dropped


# ---------------------------------------------------------------------------- aggregation


@functools.lru_cache(maxsize=1024)
def _as_f32(w: float) -> torch.Tensor:
    """``w`` as a 0-d float32 tensor, made once per value: the methods run per cache-sized piece,
    thousands of times per tensor (callers only read it). Made outside inference mode, so
    that it also serves calls that autograd records."""
    with torch.inference_mode(False):
        return torch.tensor(w, dtype=torch.float32)


def weighted_sum(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``sum_i w_i * delta_i``, left to right (a new tensor)."""
    acc = deltas[0] * _as_f32(weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        acc += d * _as_f32(w)
    return acc


def elect_sign(signed: Sequence[torch.Tensor], source: SignSource, tie: SignTie) -> torch.Tensor:
    """TIES' elected sign per entry: the sign of the summed (trimmed) task vectors.

    Args:
        signed (`Sequence[torch.Tensor]`): the tensors whose signs vote: trimmed deltas, or
            the weighted trimmed deltas (mergekit).
        source: ``"unweighted"``/``"weighted"`` elect ``sgn(sum_i signed_i)`` (which of the two
            the caller passed); ``"count"`` elects ``sgn(sum_i sgn(signed_i))``, the majority
            by count (PEFT ``frequency``, mergekit ``count``).
        tie: where the sum is exactly 0, ``"zero"`` elects 0 (``sgn(0) = 0`` as in the paper's
            Algorithm 1: only zero entries agree, so the merged entry is 0); ``"positive"``
            elects +1 (PEFT, mergekit: ``sum >= 0``).

    Returns:
        `torch.Tensor`: float32 of -1, 0, +1.
    """
    if source == "count":
        total = torch.sign(signed[0])
        tmp = torch.empty_like(total)
        for s in signed[1:]:
            total += torch.sign(s, out=tmp)
    else:
        # the same left-to-right sums as clone-then-add, one pass fewer
        total = torch.add(signed[0], signed[1]) if len(signed) > 1 else signed[0].clone()
        for s in signed[2:]:
            total += s
    if tie == "positive":
        # where(total >= 0, 1, -1): 2 * 1.0 - 1 and 2 * 0.0 - 1 are exact (NaN: -1, as where)
        return total.ge_(0).mul_(2.0).sub_(1.0)
    return total.sign_()


def disjoint_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    signed: Sequence[torch.Tensor],
    sign: torch.Tensor,
    aggregation: Aggregation,
) -> torch.Tensor:
    """TIES' disjoint merge: combine only the entries whose sign agrees with the elected sign.

    Entry ``i`` of model ``t`` agrees when ``sgn(signed_t[i]) == sign[i]`` (a zero entry never
    agrees with +1 or -1). With ``A`` the agreeing models of an entry:

    - ``"mean"``: ``sum_A w_t delta_t / |A|`` (the paper; PEFT's ``disjoint_merge``);
    - ``"weighted_mean"``: ``sum_A w_t delta_t / sum_A w_t`` (mergekit with ``normalize``);
    - ``"sum"``: ``sum_A w_t delta_t`` (mergekit without ``normalize``).

    An empty ``A`` (or a zero divisor) gives 0.

    Returns:
        `torch.Tensor`: the merged task vector (float32).
    """
    return _disjoint(
        [torch.mul(d, _as_f32(w)) for d, w in zip(deltas, weights)],
        weights,
        signed,
        sign,
        aggregation,
    )


def _weighted(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> list[torch.Tensor]:
    """``delta_t * w_t`` (new tensors), and ``delta_t`` itself where ``w_t`` is 1: ``x * 1.0``
    is ``x`` bit for bit (a delta is a difference, so never a signalling NaN that the product
    would quiet)."""
    return [d if w == 1 else d * _as_f32(w) for d, w in zip(deltas, weights)]


def _disjoint(
    products: Sequence[torch.Tensor],
    weights: Sequence[float],
    signed: Sequence[torch.Tensor],
    sign: torch.Tensor,
    aggregation: Aggregation,
) -> torch.Tensor:
    """`disjoint_merge` given ``products[t] = deltas[t] * w_t`` (consumed: overwritten, each
    only after its own sign has been read, so a product may also be ``signed[t]``).

    The agreement mask is float 1.0 / 0.0 (``eq_`` into a float tensor), which is what the
    bool mask promotes to in ``product * agree`` and ``div += agree``: the same roundings.
    (``acc.addcmul_(prod, agree)`` would save a pass, and the product is exact, but where
    ``acc`` and the product are both NaN it keeps the other NaN's bits.)
    """
    acc = torch.zeros_like(products[0])
    div = torch.zeros_like(products[0]) if aggregation != "sum" else None
    agree = torch.empty_like(products[0])
    for prod, w, s in zip(products, weights, signed):
        torch.sign(s, out=agree).eq_(sign)
        acc += prod.mul_(agree)
        if aggregation == "mean":
            assert div is not None
            div += agree
        elif aggregation == "weighted_mean":
            assert div is not None
            div += agree.mul_(_as_f32(w))
    if div is None:
        return acc
    if aggregation == "mean":
        return acc.div_(div.clamp_(min=1.0))
    # div.masked_fill_(div == 0, 1.0): adding (div == 0) as 1.0 / 0.0 gives 1 there and leaves
    # every other value (NaN included) unchanged
    return acc.div_(div.add_(torch.eq(div, 0, out=agree)))


# ---------------------------------------------------------------------------- compositions


def scale_(merged: torch.Tensor, lam: float) -> torch.Tensor:
    """Multiply the merged task vector by ``lambda`` in place (skipped for 1, which is exact)."""
    if lam != 1:
        merged.mul_(_as_f32(lam))
    return merged


def linear_combine(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool, lam: float
) -> torch.Tensor:
    """``lambda * sum_i w_i delta_i`` (divided by ``sum_i w_i`` when ``normalize``).

    The order of operations is mergekit's: weighted sum, then the division, then ``lambda``.
    The methods own their task vectors, so ``deltas`` are consumed (overwritten in place).
    """
    merged = deltas[0].mul_(_as_f32(weights[0]))
    for d, w in zip(deltas[1:], weights[1:]):
        merged += d.mul_(_as_f32(w))  # multiply, then add: as `weighted_sum`, no fused multiply-add
    if normalize:
        merged.div_(torch.tensor(list(weights), dtype=torch.float32).sum())
    return scale_(merged, lam)


def consensus_combine(
    trimmed: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sign_source: SignSource,
    sign_tie: SignTie,
    aggregation: Aggregation,
    lam: float,
) -> torch.Tensor:
    """TIES' elect-and-merge on already sparsified task vectors, then ``lambda``.

    ``sign_source="weighted"`` votes (and tests agreement) with ``w_i * delta_i`` as mergekit
    does; ``"unweighted"`` and ``"count"`` vote with the trimmed ``delta_i`` themselves, as the
    paper's Algorithm 1 (which has no weights) and PEFT do. The methods own their trimmed task
    vectors, so ``trimmed`` is consumed (a weight of 1 uses, and overwrites, the tensor itself).
    """
    if sign_source == "weighted":
        # the weighted deltas vote, and they are the products the disjoint merge sums
        signed: Sequence[torch.Tensor] = _weighted(trimmed, weights)
        sign = elect_sign(signed, sign_source, sign_tie)
        products = list(signed)
    else:
        signed = trimmed
        sign = elect_sign(signed, sign_source, sign_tie)
        products = _weighted(trimmed, weights)
    return scale_(_disjoint(products, weights, signed, sign, aggregation), lam)
