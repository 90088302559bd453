"""Multi-SLERP: barycentric interpolation of N models on a hypersphere, optionally around a base.

    v_i   = theta_i - theta_0  with a base_model,  v_i = theta_i  without   (each flattened)
    w_i   = weight_i / sum_j weight_j               (normalize_weights: true, the default)
    u_i   = v_i / (|v_i| + eps)
    m     = sum_i w_i u_i,   m <- m / |m|           (the weighted mean direction)
    g     = sum_i w_i (u_i - <u_i, m> m)            (the mean in m's tangent space)
    r     = cos(|g| + eps) m + sin(|g| + eps) / (|g| + eps) * g    (exponential map back)
    theta = theta_0 + (sum_i w_i |v_i|) r   with a base_model,  (sum_i w_i |v_i|) r  without

Goddard, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (one
tangent-space step, not an iterated Karcher mean: see `karcher` for that). With one model the
result is that model's tensor. When the mean direction vanishes (|m| < eps, e.g. two
antipodal tensors of equal weight), two models fall back to the weighted sum
``w_0 v_0 + w_1 v_1``; with three or more the tensor cannot be merged and the merge stops with
an error naming it (as mergekit does).

Deviation: when every input (every task vector, with a base) is zero, e.g. a tensor no
fine-tune changed, three or more models give that zero (the base with a base_model) where
mergekit 0.1.5 stops with its antipodal error; every result mergekit does produce is matched.

Anchor: mergekit 0.1.5 ``multislerp`` (parameters ``weight`` per model, required by mergekit, default 1.0 here;
``normalize_weights``; ``eps``), the same operations in the same order, in the dtype of the
tensors given, so a bfloat16 run matches mergekit's bfloat16 run bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from soupkit.errors import MethodInputError
from soupkit.methods import method
from soupkit.methods._spec import Params


class MultislerpParams(Params):
    """Parameters of `multislerp`.

    Attributes:
        weight: per model, its weight (default 1.0).
        normalize_weights: divide the weights by their sum (default true).
        eps: the small constant added to the norms (default 1e-8).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0}
    weight: tuple[float, ...]
    normalize_weights: bool = True
    eps: float = Field(1e-8, ge=0)

    @model_validator(mode="after")
    def _nonzero_total(self) -> MultislerpParams:
        if self.normalize_weights and len(self.weight) > 1 and sum(self.weight) == 0:
            raise ValueError(
                f"weights sum to zero ({list(self.weight)}), so they cannot be "
                "normalized; set normalize_weights: false or change the weights"
            )
        return self


@method(
    "multislerp",
    kind="tensors",
    params=MultislerpParams,
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    summary="barycentric spherical interpolation of N models (tangent space of their mean)",
    optional_base=True,
    elementwise=False,
    work_per_input=5,  # stacked copies, masks and products, as mergekit forms them
)
def multislerp(
    tensors: Sequence[torch.Tensor],
    p: MultislerpParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-SLERP of ``tensors`` with weights ``p.weight``, around ``base`` if given."""
    if len(tensors) == 1:
        return tensors[0]
    eps = p.eps
    stacked = torch.stack(list(tensors), dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor(p.weight, dtype=stacked.dtype, device=stacked.device)
    if p.normalize_weights:
        weights = weights / weights.sum()
    norms: torch.Tensor = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm: torch.Tensor = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2 and not norms.any():
            # every input is zero (a tensor no fine-tune changed): mergekit stops; the mean is 0
            out = stacked[0].clone()
            return out + base if base is not None else out
        if stacked.shape[0] != 2:
            raise MethodInputError(
                f"multislerp: the weighted mean direction of the {stacked.shape[0]} models is zero "
                f"(norm {float(mean_norm):.3g} < eps {eps:g})\n"
                "    hint: antipodal tensors with weights that balance out; change the weights"
            )
        out = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
        return out + base if base is not None else out
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm: torch.Tensor = torch.norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = out * (norms.squeeze(-1) * weights).sum()
    out = out.view(stacked.shape[1:])
    return out + base if base is not None else out
