"""Linear (weighted) average: the uniform soup and its weighted form.

    theta = sum_i w_i * theta_i / sum_i w_i        (normalize: true, the default)
    theta = sum_i w_i * theta_i                    (normalize: false)

With no weights (all 1) this is the uniform soup of Wortsman et al., "Model soups: averaging
weights of multiple fine-tuned models improves accuracy without increasing inference time",
ICML 2022, https://arxiv.org/abs/2203.05482. Same name and semantics as mergekit's `linear`.

Order of operations (the same roundings as mergekit 0.1.5's `linear`, so the two agree bit for
bit): in float32, ``acc = w_0 * theta_0``, then ``acc.addcmul_(theta_i, w_i)`` for i = 1..n-1 in
recipe order (torch's vectorised CPU kernels, AVX2 and AVX-512, fuse it into one rounding per
step; its portable kernel rounds the product and the sum separately; either way the result does
not depend on chunking or thread count, and `soupkit.kernels` measures which one this process's
torch does and follows it), then ``acc / sum(w)`` with the float32 sum of the weights. Weights are
not re-normalised silently: ``normalize: false`` keeps them as given.

`RunningSum` is the same arithmetic one ingredient at a time, for whole state dicts: greedy soup
keeps the float32 sum of the accepted ingredients and evaluates ``(sum + next) / (k + 1)``, which
equals this method's uniform soup of those ingredients bit for bit (``w_i = 1``: the fused
multiply-add adds exactly, and the divisor is the same float32 sum of ones).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch
from pydantic import model_validator

from soupkit.methods import _exact, method
from soupkit.methods._spec import Params


class LinearParams(Params):
    """Parameters of `linear`.

    Attributes:
        weight: per model, the weight w_i (default 1.0).
        normalize: divide by the sum of the weights (default true).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0}
    weight: tuple[float, ...]
    normalize: bool = True

    @model_validator(mode="after")
    def _nonzero_total(self) -> LinearParams:
        if self.normalize and sum(self.weight) == 0:
            raise ValueError(
                f"weights sum to zero ({list(self.weight)}), so they cannot be "
                "normalized; set normalize: false or change the weights"
            )
        return self


@method(
    "linear",
    kind="tensors",
    params=LinearParams,
    paper="https://arxiv.org/abs/2203.05482",
    summary="weighted mean of the models (uniform soup when no weights are given)",
    exact=lambda tensors, p, *, base=None, rng=None: _exact.linear(tensors, p.weight, p.normalize),
)
def linear(
    tensors: Sequence[torch.Tensor],
    p: LinearParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Weighted sum (or mean) of ``tensors`` with weights ``p.weight``.

    Works in place on ``tensors`` (the engine hands every method tensors it owns).
    """
    weights, total = _weights(p.weight)
    acc = RunningSum.first(tensors[0], weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        RunningSum.step(acc, t, w)
    if p.normalize:
        acc.div_(total)
    return acc


@functools.lru_cache(maxsize=256)
def _weights(weight: tuple[float, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The weights as 0-d float32 tensors and their float32 sum, made once per recipe (the
    engine calls the method per cache-sized piece; callers only read them). Made outside
    inference mode, so that they also serve calls that autograd records."""
    with torch.inference_mode(False):
        w = torch.tensor(weight, dtype=torch.float32)
        return tuple(w.unbind()), w.sum()


class SumOps(Protocol):
    """Faster forms of `RunningSum`'s operations with the same bytes (`soupkit.kernels.
    RunningSumOps`, which this layer does not import: the callers above pass it). Each returns
    None / False when it cannot do a call; `RunningSum` then runs torch."""

    def scaled(self, x: torch.Tensor, w: float) -> torch.Tensor | None:
        """``x.to(float32) * w``, a new tensor."""

    def step(self, acc: torch.Tensor, x: torch.Tensor, w: float) -> bool:
        """``acc.addcmul_(x.to(float32), w)`` in place."""

    def mean(
        self,
        acc: torch.Tensor,
        divisor: float,
        dtype: torch.dtype,
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``((acc + extra) / divisor).to(dtype)`` (``acc`` alone without ``extra``)."""


class RunningSum:
    """Float32 running sum of whole state dicts with `linear`'s operations: the uniform soup of
    the ingredients added so far, and of those plus one more, without holding them all.

    The first state dict fixes the names, their order and the soup's dtypes: its floating-point
    tensors are summed in float32 and cast back to their own dtype; its other tensors (integer
    buffers, masks) are taken as they are, as the engine takes them from the first model. An
    ingredient is added in place (`add`, tensor by tensor); `mean` gives the soup of the added
    ingredients, optionally with one more that is not added (greedy soup's candidate). Pure
    tensors: reading the ingredients is the caller's.

    Args:
        first: the first ingredient's state dict.
        ops: `SumOps` that run the adds and means where they can (the native kernels), with
            the same bytes; None: torch.

    Attributes:
        count: ingredients added.
        names: every tensor name, in the first state dict's order.
    """

    def __init__(self, first: Mapping[str, torch.Tensor], *, ops: SumOps | None = None) -> None:
        self._acc: dict[str, torch.Tensor] = {}
        self._fixed: dict[str, torch.Tensor] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._ops = ops
        for name, t in first.items():
            if t.is_floating_point():
                self._acc[name] = RunningSum.scaled(t, _ONE, ops)
                self._dtype[name] = t.dtype
            else:
                self._fixed[name] = t
        self.names: tuple[str, ...] = tuple(first)
        self.count = 1

    @staticmethod
    def first(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w * t`` in place in ``t`` (float32, owned): what ``addcmul_`` from zeros gives
        (``fma(t, w, 0)`` rounds once, like a product)."""
        return t.mul_(w)

    @staticmethod
    def step(acc: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> None:
        """``acc += w * t`` in place with ``addcmul_``, as mergekit does (one rounding per step
        on torch's AVX2 / AVX-512 kernels, two on its portable one)."""
        acc.addcmul_(t, w)

    @staticmethod
    def scaled(t: torch.Tensor, w: torch.Tensor, ops: SumOps | None = None) -> torch.Tensor:
        """`first` of a float32 copy of ``t`` (any floating dtype; a new tensor): by ``ops``
        where they can, else torch (the same bytes)."""
        got = None if ops is None else ops.scaled(t, float(w))
        return got if got is not None else RunningSum.first(t.to(torch.float32, copy=True), w)

    @staticmethod
    def step_any(
        acc: torch.Tensor, t: torch.Tensor, w: torch.Tensor, ops: SumOps | None = None
    ) -> None:
        """`step` of ``t`` in any floating dtype (converted to float32): by ``ops`` where they
        can, else torch (the same bytes)."""
        if ops is None or not ops.step(acc, t, float(w)):
            RunningSum.step(acc, t.to(torch.float32), w)

    def summed(self, name: str) -> bool:
        """Whether ``name`` is summed (a floating-point tensor); the others need not be read."""
        return name in self._acc

    def add(self, name: str, t: torch.Tensor) -> None:
        """Add the next ingredient's tensor ``name`` (call for every summed name, then `added`)."""
        RunningSum.step_any(self._acc[name], t, _ONE, self._ops)

    def added(self) -> None:
        """Count the ingredient whose tensors were just added."""
        self.count += 1

    def mean(self, name: str, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name`` of the uniform soup of the added ingredients, plus ``extra`` (one more
        ingredient's tensor, not added to the sum) when given; in the first ingredient's dtype."""
        fixed = self._fixed.get(name)
        if fixed is not None:
            return fixed
        n = self.count
        if self._ops is not None:
            got = self._ops.mean(
                self._acc[name],
                float(_count(n if extra is None else n + 1)),
                self._dtype[name],
                extra,
            )
            if got is not None:
                return got
        if extra is None:
            return (self._acc[name] / _count(n)).to(self._dtype[name])
        c = torch.addcmul(self._acc[name], extra.to(torch.float32), _ONE)
        c /= _count(n + 1)
        return c.to(self._dtype[name])


with torch.inference_mode(False):
    _ONE = torch.tensor(1.0, dtype=torch.float32)


def _count(n: int) -> torch.Tensor:
    # Exactly what `linear` divides a uniform soup of n by: the float32 sum of n weights of 1.0.
    return _weights((1.0,) * n)[1]
