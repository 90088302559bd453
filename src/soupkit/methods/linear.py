"""Linear (weighted) average: the uniform soup and its weighted form.

    theta = sum_i w_i * theta_i / sum_i w_i        (normalize: true, the default)
    theta = sum_i w_i * theta_i                    (normalize: false)

With no weights (all 1) this is the uniform soup of Wortsman et al., "Model soups: averaging
weights of multiple fine-tuned models improves accuracy without increasing inference time",
ICML 2022, https://arxiv.org/abs/2203.05482. Same name and semantics as mergekit's `linear`.

Order of operations (the same roundings as mergekit 0.1.5's `linear`, so the two agree bit for
bit): in float32, ``acc = w_0 * theta_0``, then ``acc.addcmul_(theta_i, w_i)`` for i = 1..n-1 in
recipe order (a fused multiply-add: one rounding per step, on every CPU kernel path, whatever the
chunking or thread count), then ``acc / sum(w)`` with the float32 sum of the weights. Weights are
not re-normalised silently: ``normalize: false`` keeps them as given.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

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
    # acc = w0 * t0 is what addcmul_ from zeros gives (fma(t0, w0, 0) rounds once, like a product)
    acc = tensors[0].mul_(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        acc.addcmul_(t, w)  # one rounding per step: a fused multiply-add, as mergekit does
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
