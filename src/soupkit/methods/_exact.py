"""mergekit 0.1.5's arithmetic, op for op, for exact mode (``compute: exact``).

In exact mode the engine hands a method its inputs already cast to the recipe's ``dtype`` (as
mergekit's loader does), forms the task vectors ``theta_i - base`` in that dtype, and casts the
result to ``out_dtype``. The functions here then compute what mergekit 0.1.5 computes, with the
same torch operations in the same order, the same internal casts (mergekit's ``linear`` and
``slerp`` go to float32, its magnitude ranks are taken on float32 magnitudes) and the same
choice among equal magnitudes (the order ``torch.argsort`` / ``torch.sort`` return), so that
bf16, fp16 and float32 recipes give mergekit's bytes (tests/methods/test_exact_mode.py runs
both tools on the same tensors).

They follow mergekit's ``merge_methods/generalized_task_arithmetic.py`` (task arithmetic, TIES,
DARE, Breadcrumbs, DELLA), ``sparsify.py``, ``linear.py``, ``slerp.py`` and
``model_stock.py``. What cannot be matched: the random masks of DARE and DELLA. mergekit draws
them from torch's global generator; here they come from the generator the engine seeds from
(recipe seed, tensor name), so the distribution (fraction kept, rescale) is mergekit's and the
masks are not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "Consensus",
    "Sparsify",
    "bernoulli",
    "della_magprune",
    "generalized_task_arithmetic",
    "gta_check",
    "gta_method",
    "linear",
    "magnitude",
    "magnitude_outliers",
    "mean_pairwise_cosine",
    "model_stock",
    "slerp",
    "stock_factor",
]

Sparsify = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
Consensus = Literal["sum", "count"]

_SLERP_CHUNK = 1024 * 1024


def _rescaled(
    tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7
) -> torch.Tensor:
    """``tensor * mask``, scaled back to ``tensor``'s L1 norm when ``rescale`` (mergekit's
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``), left alone when either norm < eps."""
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # mergekit: bernoulli is not implemented for float16 on CPU, so it works in float32
    return t.dtype if t.dtype == torch.bfloat16 else torch.float32


def magnitude(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` largest magnitudes (mergekit's ``magnitude``)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    w = tensor.abs().reshape(-1).float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    """Model Breadcrumbs' band (mergekit's ``magnitude_outliers``)."""
    if density >= 1:
        return tensor
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = tensor.abs().reshape(-1).float()
    indices = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=tensor.dtype)
    mask[indices[n_bot : n_bot + target]] = 1
    return _rescaled(tensor, mask.reshape_as(tensor), rescale)


def bernoulli(
    tensor: torch.Tensor, density: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DARE's random drop (mergekit's ``bernoulli``), drawing from ``generator``."""
    if density >= 1:
        return tensor
    work = _work_dtype(tensor)
    mask = torch.bernoulli(torch.full_like(tensor, density, dtype=work), generator=generator)
    return _rescaled(tensor.to(work), mask, rescale).to(tensor.dtype)


def della_magprune(
    tensor: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DELLA's magnitude-ranked random drop (mergekit's ``della_magprune``): ranks along
    dimension 1 (a vector is one row)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    shape = tensor.shape
    work = _work_dtype(tensor)
    if tensor.dim() < 2:
        tensor = tensor.unsqueeze(0)
    ranks = torch.argsort(tensor.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(work)
    return _rescaled(tensor.to(work), mask, rescale).to(tensor.dtype).reshape(shape)


def generalized_task_arithmetic(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    sparsify: Sparsify | None,
    consensus: Consensus | None,
    normalize: bool,
    lam: float,
    rescale: bool = False,
    density: Sequence[float] = (),
    gamma: Sequence[float] = (),
    epsilon: Sequence[float] = (),
    int8_mask: bool = False,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group`` on task vectors: sparsify each,
    weight them (weights in the tensors' dtype), elect and mask (``consensus``), sum over the
    models with one ``sum(dim=0)``, divide, scale by ``lambda``. Returns the merged delta."""
    stacked = deltas[0].new_empty((len(deltas), *deltas[0].shape))
    for i, d in enumerate(deltas):
        if sparsify == "magnitude":
            d = magnitude(d, density[i], rescale)
        elif sparsify == "magnitude_outliers":
            d = magnitude_outliers(d, density[i], gamma[i], rescale)
        elif sparsify == "random":
            d = bernoulli(d, density[i], rescale, _need(rng))
        elif sparsify == "della_magprune":
            d = della_magprune(d, density[i], epsilon[i], rescale, _need(rng))
        stacked[i] = d
    w = torch.tensor(list(weights), dtype=stacked.dtype)
    while stacked.dim() > w.dim():
        w.unsqueeze_(-1)
    stacked.mul_(w)
    if consensus is not None:
        mask_dtype = torch.int8 if int8_mask else stacked.dtype
        sign = stacked.sign().to(mask_dtype)
        if consensus == "sum":
            majority = (stacked.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        else:
            majority = (sign.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        mask = sign == majority
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return mixed


def _need(rng: torch.Generator | None) -> torch.Generator:
    if rng is None:
        raise ValueError("this method is stochastic: pass rng=torch.Generator().manual_seed(...)")
    return rng


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool
) -> torch.Tensor:
    """mergekit's ``linear``: float32 (float64 for float64 inputs) fused multiply-adds from
    zero, the division by the summed weights, then back to the inputs' dtype."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(list(weights), dtype=dtype)
    result = torch.zeros_like(first, dtype=dtype)
    for t, c in zip(tensors, w.unbind(0)):
        result.addcmul_(t, c)
    if normalize:
        result.div_(w.sum())
    return result.to(first.dtype)


def slerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """mergekit's ``slerp`` for one tensor: norms of chunk norms and the normalised dot product
    in float32 (float64 for float64 inputs), the result written in the inputs' dtype.

    mergekit packs tensors of one shape into a batch and chunks each row by ``2^20 / batch``
    elements; here the batch is one tensor, so tensors above ``2^20 / batch`` elements that
    mergekit batched may differ in the last bits of the norms."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunk = max(1, _SLERP_CHUNK // a.shape[0])
    na, nb = [], []
    for s in range(0, a.shape[1], chunk):
        na.append(torch.linalg.vector_norm(a[:, s : s + chunk].to(dtype), dim=1, keepdim=True))
        nb.append(torch.linalg.vector_norm(b[:, s : s + chunk].to(dtype), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(na), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(nb), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    parts = []
    for s in range(0, a.shape[1], chunk):
        x = a[:, s : s + chunk].to(dtype) / norm_a
        y = b[:, s : s + chunk].to(dtype) / norm_b
        parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in range(0, a.shape[1], chunk):
        result[:, s : s + chunk] = coef_a * a[:, s : s + chunk].to(dtype) + coef_b * b[
            :, s : s + chunk
        ].to(dtype)
    return result.reshape(v0.shape)


def model_stock(
    tensors: Sequence[torch.Tensor], base: torch.Tensor, filter_wise: bool
) -> torch.Tensor:
    """mergekit's ``model_stock`` in the inputs' dtype (its singular-denominator guard
    included; no clamp of negative cosines)."""
    w0, ws = base, list(tensors)
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0 = w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    n = len(ws)
    t = stock_factor(mean_pairwise_cosine([w - w0 for w in ws]), n)
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


def mean_pairwise_cosine(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock's angle: the mean over pairs of the cosine along the last dimension (norm
    products clamped to >= 1e-6, cosines to [-1, 1]), with a trailing dimension of 1."""
    cosines = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1 :]:
            norms = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cosines.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0).unsqueeze(-1)


def stock_factor(cos: torch.Tensor, n: int) -> torch.Tensor:
    """Model Stock's ``t = n cos / (1 + (n - 1) cos)``, 0 within 1e-6 of the singularity
    (mergekit 0.1.5)."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), (n * cos) / safe)


# ------------------------------------------------------------------ soupkit parameters -> mergekit's


def gta_method(
    sparsify: Sparsify | None, consensus: Consensus | None
) -> Callable[..., torch.Tensor]:
    """The exact-mode function of a task-vector method that mergekit builds from
    ``GeneralizedTaskArithmeticMerge(sparsify, consensus)``, reading soupkit's parameters
    (``rescale: l1`` is mergekit's ``rescale: true``; ``aggregation: weighted_mean`` its
    ``normalize: true`` on consensus methods). `gta_check` refuses what has no counterpart."""

    def run(
        deltas: Sequence[torch.Tensor],
        p: Any,
        *,
        rng: torch.Generator | None = None,
        trim: object = None,
    ) -> torch.Tensor:
        normalize = p.aggregation == "weighted_mean" if consensus is not None else p.normalize
        return generalized_task_arithmetic(
            deltas,
            p.weight,
            sparsify=sparsify,
            consensus=consensus,
            normalize=normalize,
            lam=p.lambda_,
            rescale=getattr(p, "rescale", "none") == "l1",
            density=getattr(p, "density", ()),
            gamma=getattr(p, "gamma", ()),
            epsilon=getattr(p, "epsilon", ()),
            int8_mask=p.int8_mask,
            rng=rng,
        )

    return run


def gta_check(p: Any) -> str | None:
    """Why parameters ``p`` of a task-vector method cannot be computed as mergekit does."""
    wrong: list[str] = []
    expect = {
        "sign_source": ("weighted",),
        "sign_tie": ("positive",),
        "aggregation": ("weighted_mean", "sum"),
        "trim_scope": ("per_tensor",),
        "rescale": ("l1", "none"),
    }
    for key, allowed in expect.items():
        value = getattr(p, key, None)
        if value is not None and value not in allowed:
            wrong.append(f"{key}={value}")
    eps = getattr(p, "epsilon", None)
    if eps is not None:
        wrong += [
            f"density {d} + epsilon {e} = {d + e:g} >= 1 (mergekit requires < 1)"
            for d, e in zip(p.density, eps)
            if d < 1 and d + e >= 1
        ]
    if not wrong:
        return None
    return (
        f"mergekit has no {', '.join(wrong)}, so exact mode cannot reproduce it; drop these "
        "settings (and `convention: paper`/`peft`, which sets switches like them) or set "
        "`compute: float32`"
    )
