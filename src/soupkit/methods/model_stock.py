"""Model Stock: interpolate between the base and the average of N fine-tunes by their angle.

    d_i   = theta_i - theta_0                                   (i = 1..N, N >= 2)
    cos   = mean over pairs i < j of <d_i, d_j> / (|d_i| |d_j|)
    t     = N cos / (1 + (N - 1) cos)
    theta = t * mean_i(theta_i) + (1 - t) * theta_0

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
https://arxiv.org/abs/2403.19522 (computed per tensor, i.e. layer-wise as in the paper). The
paper states the angle for N = 2; for N > 2 the mean of the pairwise cosines is used, as
mergekit does.

Anchor: mergekit ``model_stock``, same float32 sequence of operations: norms and dot products
in float32, each norm product clamped to at least 1e-6, each cosine clamped to [-1, 1],
``sum(thetas) / N`` left to right, then ``t * avg + (1 - t) * theta_0``. ``filter_wise: true``
(mergekit's switch) computes one angle per row of the last dimension instead of per tensor.

Negative mean cosines (``negative_cos``): the paper's formula assumes fine-tunes at an acute
angle; below 0 it extrapolates away from the fine-tunes and diverges at cos = -1/(N-1).
By default soupkit does what mergekit 0.1.5 does (``extrapolate``: the formula as is, the base
kept only within 1e-6 of that singularity), so a recipe gives mergekit's model;
``negative_cos: keep_base`` (or ``convention: paper``) clamps the mean cosine to 0 instead, so
t = 0 and the tensor stays the base. For cos >= 0 the two agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import model_validator

from soupkit.methods import _exact, method
from soupkit.methods._conventions import DEFAULT_CONVENTION, Convention
from soupkit.methods._spec import Params

_PRESETS = {"mergekit": "extrapolate", "paper": "keep_base"}


class ModelStockParams(Params):
    """Parameters of `model_stock`.

    Attributes:
        filter_wise: one angle per row (last dimension) instead of per tensor (default false).
        negative_cos: ``extrapolate`` (mergekit, the default) or ``keep_base`` (clamp a negative
            mean cosine to 0).
        convention: ``mergekit`` (default) or ``paper``: sets ``negative_cos`` unless given.
    """

    filter_wise: bool = False
    negative_cos: Literal["extrapolate", "keep_base"] = "extrapolate"
    convention: Convention = DEFAULT_CONVENTION

    @model_validator(mode="before")
    @classmethod
    def _apply_convention(cls, data: Any) -> Any:
        if isinstance(data, dict) and "negative_cos" not in data:
            conv = data.get("convention", DEFAULT_CONVENTION)
            if conv == "peft":
                raise ValueError(
                    "convention 'peft' is not defined for this method (it has no counterpart "
                    "there); use one of: mergekit, paper"
                )
            if conv in _PRESETS:
                data = {**data, "negative_cos": _PRESETS[conv]}
        return data


@method(
    "model_stock",
    kind="tensors",
    params=ModelStockParams,
    paper="https://arxiv.org/abs/2403.19522",
    summary="Model Stock: move from base_model toward the fine-tunes' mean by their angle",
    needs_base=True,
    elementwise=False,
    min_models=2,
    exact=lambda tensors, p, *, base, rng=None: _exact.model_stock(tensors, base, p.filter_wise),
)
def model_stock(
    tensors: Sequence[torch.Tensor],
    p: ModelStockParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Model Stock of ``tensors`` (the fine-tunes) around ``base`` (the pretrained model)."""
    if base is None:
        raise ValueError("model_stock needs the base tensor")
    shape = base.shape
    if p.filter_wise and base.dim() >= 1:
        w0 = base.reshape(-1, shape[-1]) if base.dim() >= 2 else base.reshape(1, -1)
    else:
        w0 = base.reshape(1, -1)
    ws = [w.reshape(w0.shape) for w in tensors]
    cos = _exact.mean_pairwise_cosine([w - w0 for w in ws])
    n = len(ws)
    if p.negative_cos == "keep_base":
        cos = cos.clamp(min=0)
        t = (n * cos) / (1 + (n - 1) * cos)
    else:  # mergekit 0.1.5: keep the base only at the singularity
        t = _exact.stock_factor(cos, n)
    avg = ws[0].clone()
    for w in ws[1:]:
        avg += w
    avg /= n
    return (t * avg + (1 - t) * w0).reshape(shape)
