"""NuSLERP: spherical interpolation between two models, by weights, optionally around a base.

    t      = w_1 / (w_0 + w_1)                       (t = 0.5 when |w_0 + w_1| < 1e-6)
    v_i    = theta_i - theta_0   with a base_model,   v_i = theta_i   without
    u_i    = v_i / max(|v_i|, 1e-7)                  (norms over the last axis, see below)
    cos    = clamp(<u_0, u_1>, -1, 1),   Omega = acos(cos)
    slerp  = sin((1 - t) Omega) / sin(Omega) * v_0  +  sin(t Omega) / sin(Omega) * v_1
    slerp  = (1 - t) v_0 + t v_1                     when 1 - cos^2 <= 1e-16 (colinear)
    theta  = theta_0 + slerp    with a base_model,    theta = slerp   without

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (reference:
https://en.wikipedia.org/wiki/Slerp); mergekit's "NuSLERP" generalises its `slerp` in three
ways, all kept here: the position comes from two per-model ``weight`` values (mergekit
requires them; soupkit's default is 1.0, i.e. t = 0.5, as for every weight), the interpolation may run on task vectors around a ``base_model`` (optional), and
the sphere may be per row or per column instead of the whole tensor. ``nuslerp_flatten``
(default true) treats the tensor as one vector; with ``nuslerp_flatten: false`` each row of
the last axis is its own vector, or each column with ``nuslerp_row_wise: true`` (that is
mergekit's naming: the norms run along axis 0).

Anchor: mergekit 0.1.5 ``nuslerp``, the same operations in the same order and in the dtype of
the tensors given (so a bfloat16 run matches mergekit's bfloat16 run bit for bit). Unlike
soupkit's `slerp`, nothing is accumulated in float64 and the colinear fall-back uses mergekit's
test (1 - cos^2 <= eps^2, eps = 1e-8), not slerp's |cos| > 0.9995.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from soupkit.methods import method
from soupkit.methods._spec import Params

EPS = 1e-8
NORM_EPS = 1e-7


class NuslerpParams(Params):
    """Parameters of `nuslerp`.

    Attributes:
        weight: per model, its weight; ``t = w_1 / (w_0 + w_1)`` (default 1.0).
        nuslerp_row_wise: one sphere per column (norms along axis 0) instead of per row.
        nuslerp_flatten: one sphere for the whole tensor (default true; overrides row_wise).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0}
    weight: tuple[float, ...]
    nuslerp_row_wise: bool = False
    nuslerp_flatten: bool = True


def slerp_vectors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    dim: int = -1,
    flatten: bool = False,
    eps: float = EPS,
) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), per vector along ``dim``
    (or over the whole tensor with ``flatten``), in the dtype of the inputs."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    # acos(0) on the colinear rows keeps the unused spherical branch finite where it can be
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@method(
    "nuslerp",
    kind="tensors",
    params=NuslerpParams,
    paper="https://en.wikipedia.org/wiki/Slerp",
    summary="spherical interpolation of two models by weight, optionally of task vectors around base_model",
    optional_base=True,
    elementwise=False,
    work_per_input=3,  # stacked copies, masks and products, as mergekit forms them
    min_models=2,
    max_models=2,
)
def nuslerp(
    tensors: Sequence[torch.Tensor],
    p: NuslerpParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """NuSLERP of the two ``tensors`` at ``t = w_1 / (w_0 + w_1)``, around ``base`` if given."""
    total = sum(p.weight)
    t = 0.5 if abs(total) < 1e-6 else p.weight[1] / total
    dim = 0 if p.nuslerp_row_wise else -1
    if base is None:
        return slerp_vectors(t, tensors[0], tensors[1], dim=dim, flatten=p.nuslerp_flatten)
    return base + slerp_vectors(
        t, tensors[0] - base, tensors[1] - base, dim=dim, flatten=p.nuslerp_flatten
    )
