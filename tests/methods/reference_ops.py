"""The straightforward formulation of `soupkit.methods._ops` (bool masks, no in-place): the
reference the fast functions are checked against bit for bit (tests/methods/test_fast_ops.py).

A frozen copy of the module as it was before the fast paths; do not optimise it.

Original module docstring: Building blocks shared by the merge methods: small pure tensor functions.

Methods are 10-line compositions of these (the shape of PEFT's ``utils/merge_utils.py``):
trim (`trim_topk`, `trim_band`, `apply_cut`), random drop (`dare_drop`, `della_drop`), sign
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
- Random numbers come only from the counter-based stream passed in (one stream per model,
  see `soupkit.methods._philox`), so changing one model's density never changes another
  model's mask.
"""

from __future__ import annotations

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
    "apply_cut",
    "consensus_combine",
    "cut_mask",
    "dare_drop",
    "della_drop",
    "della_keep_probs",
    "disjoint_merge",
    "elect_sign",
    "l1_rescale",
    "linear_combine",
    "scale_",
    "uniform",
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


def apply_cut(delta: torch.Tensor, cut: MagnitudeCut | None) -> torch.Tensor:
    """Zero the entries of ``delta`` that do not survive ``cut`` (None keeps everything)."""
    if cut is None:
        return delta
    return delta.masked_fill(~cut_mask(delta.abs(), cut), 0.0)


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
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    if top <= 0 and keep >= n:
        return delta
    magnitude = delta.abs()
    upper = topk_cut(magnitude, top + keep)
    mask = (
        torch.ones_like(magnitude, dtype=torch.bool)
        if upper is None
        else cut_mask(magnitude, upper)
    )
    lower = topk_cut(magnitude, top)
    if top > 0 and lower is not None:
        mask &= ~cut_mask(magnitude, lower)
    return delta.masked_fill(~mask, 0.0)


# ---------------------------------------------------------------------------- random drops


def uniform(rng: CounterRNG | torch.Generator, stream: int, shape: torch.Size) -> torch.Tensor:
    """The draws ``u = v / 2^24`` in float64 (exact), of soupkit's counter-based stream."""
    v = _philox.uniform24(_philox.counter_rng(rng), stream, math.prod(shape))
    return (v.to(torch.float64) / 2**24).view(shape)


def l1_rescale(original: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``masked`` so its L1 norm matches ``original``'s (mergekit's ``rescale_norm: l1``).

    Left unscaled when either norm is below ``eps``, as mergekit does.

    The norms are soupkit's fixed-order float64 sums (rows of 8 by flat index, the rows summed
    as a pairwise tree padded with zero rows to a power of two, then the lanes pairwise), each
    rounded once to float32: written here as plain recursion (issue 17 replaced torch's float32
    ``sum()``, whose order C cannot follow at full speed).
    """
    before = _l1_norm(original)
    after = _l1_norm(masked)
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _l1_norm(x: torch.Tensor) -> torch.Tensor:
    flat = [abs(v) for v in x.reshape(-1).tolist()]
    rows = [flat[j : j + 8] + [0.0] * (8 - len(flat[j : j + 8])) for j in range(0, len(flat), 8)]

    def tree(lo: int, size: int) -> list[float]:
        if size == 1:
            return rows[lo] if lo < len(rows) else [0.0] * 8
        half = size // 2
        return [a + b for a, b in zip(tree(lo, half), tree(lo + half, half))]

    lane = tree(0, 1 << (len(rows) - 1).bit_length()) if rows else [0.0] * 8
    total = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + (
        (lane[4] + lane[5]) + (lane[6] + lane[7])
    )
    return torch.tensor(total, dtype=torch.float64).to(torch.float32)


def dare_drop(
    delta: torch.Tensor,
    density: float,
    generator: CounterRNG | torch.Generator,
    rescale: Literal["density", "l1", "none"] = "density",
    *,
    stream: int = 0,
) -> torch.Tensor:
    """DARE: drop each entry independently with probability ``1 - density``, rescale survivors.

    An entry survives when ``u < density`` for its draw ``u ~ U[0, 1)`` (``torch.rand``), so each
    element's decision depends only on its own draw: the operation is elementwise.

    Args:
        delta (`torch.Tensor`): a task vector.
        density (`float`): survival probability, in (0, 1]; 1 keeps everything (no draws).
        generator (`torch.Generator`): the only source of randomness.
        rescale: ``"density"`` divides survivors by ``density`` (the paper, PEFT); ``"l1"``
            matches the L1 norm of ``delta`` (mergekit); ``"none"`` leaves them.

    Returns:
        `torch.Tensor`: the sparsified tensor.
    """
    if density >= 1:
        return delta
    keep = uniform(generator, stream, delta.shape) < density  # real numbers: no rounding
    dropped = delta.masked_fill(~keep, 0.0)
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
    generator: CounterRNG | torch.Generator,
    rescale: Literal["probability", "l1", "none"] = "probability",
    *,
    stream: int = 0,
) -> torch.Tensor:
    """DELLA: drop entries with magnitude-ranked probabilities (`della_keep_probs`), rescale.

    Args:
        delta (`torch.Tensor`): a task vector.
        density (`float`): mean keep probability, in (0, 1]; 1 keeps everything (no draws).
        epsilon (`float`): half-width of the keep-probability range.
        generator (`torch.Generator`): the only source of randomness.
        rescale: ``"probability"`` divides each survivor by its own keep probability (the
            paper's ``1 / (1 - p_i)``); ``"l1"`` matches the L1 norm (mergekit); ``"none"``.

    Returns:
        `torch.Tensor`: the sparsified tensor.
    """
    if density >= 1:
        return delta
    probs = della_keep_probs(delta, density, epsilon)
    keep = uniform(generator, stream, delta.shape) < probs.double()
    dropped = delta.masked_fill(~keep, 0.0)
    if rescale == "probability":
        return dropped.div_(probs)
    if rescale == "l1":
        return l1_rescale(delta, dropped)
    return dropped


# ---------------------------------------------------------------------------- aggregation


def _as_f32(w: float) -> torch.Tensor:
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
        for s in signed[1:]:
            total += torch.sign(s)
    else:
        total = signed[0].clone()
        for s in signed[1:]:
            total += s
    if tie == "positive":
        return torch.where(total >= 0, 1.0, -1.0)
    return torch.sign(total)


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
    acc = torch.zeros_like(deltas[0])
    div = torch.zeros_like(deltas[0])
    for d, w, s in zip(deltas, weights, signed):
        agree = torch.sign(s) == sign
        acc += (d * _as_f32(w)) * agree
        if aggregation == "mean":
            div += agree
        elif aggregation == "weighted_mean":
            div += agree * _as_f32(w)
    if aggregation == "sum":
        return acc
    if aggregation == "mean":
        return acc.div_(div.clamp_(min=1.0))
    return acc.div_(div.masked_fill_(div == 0, 1.0))


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
    """
    merged = weighted_sum(deltas, weights)
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
    paper's Algorithm 1 (which has no weights) and PEFT do.
    """
    if sign_source == "weighted":
        signed: Sequence[torch.Tensor] = [d * _as_f32(w) for d, w in zip(trimmed, weights)]
    else:
        signed = trimmed
    sign = elect_sign(signed, sign_source, sign_tie)
    return scale_(disjoint_merge(trimmed, weights, signed, sign, aggregation), lam)
