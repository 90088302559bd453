"""Karcher mean: the weighted Riemannian (Fréchet) mean of the inputs' directions on the sphere.

    n_i   = |theta_i|,  u_i = theta_i / n_i              (each tensor one vector; all inputs,
                                                         the base_model included, weight 1/N)
    a_i   = 1/N over the inputs with n_i > tol, renormalised to sum to 1
    m     = sum_i a_i u_i / |sum_i a_i u_i|              (start; u_0 if that sum is ~0)
    repeat max_iter times (stop when |g| < tol):
        c_i   = clamp(<m, u_i>, -1, 1),  phi_i = acos(c_i)
        g     = sum_{i: phi_i >= tol} a_i phi_i / sin(phi_i) * (u_i - c_i m)     (log map)
        m     = cos(|g|) m + sin(|g|) g / |g|,   m <- m / |m|                    (exp map)
    theta = (sum_i n_i / N) * m

Karcher, "Riemannian center of mass and mollifier smoothing", CPAM 1977; for model merging
see https://arxiv.org/abs/2603.04972 (the reference mergekit gives). The iteration is the
fixed-point (gradient) iteration for the Karcher mean on the unit sphere; the output norm is
the mean of the input norms (all inputs, as mergekit scales by the unrenormalised weights).
Inputs with norm <= tol take no part in the direction; if every input has norm <= tol the
result is zero.

Anchor: mergekit 0.1.5 ``karcher`` (``max_iter`` = 10, ``tol`` = 1e-5), the same operations in
the same order: norms in float32 (float64 for float64 inputs), everything else in the dtype of
the tensors given, so a bfloat16 run matches mergekit's bfloat16 run bit for bit. As in
mergekit the ``base_model``, when the recipe names one, is one more input (where the recipe
lists it among the models, else after them), not an anchor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from pydantic import Field

from soupkit.methods import method
from soupkit.methods._spec import Params


class KarcherParams(Params):
    """Parameters of `karcher`.

    Attributes:
        max_iter: most fixed-point iterations (default 10).
        tol: stop when the tangent step is shorter than this; also the norm below which an
            input is left out of the direction (default 1e-5).
    """

    max_iter: int = Field(10, ge=0)
    tol: float = Field(1e-5, ge=0)


def karcher_mean(
    tensors: Sequence[torch.Tensor],
    alphas: Sequence[float],
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> torch.Tensor:
    """The weighted Karcher mean of ``tensors`` (each one vector), scaled by the
    ``alphas``-weighted sum of their norms, in the dtype of the tensors."""
    if len(tensors) == 1:
        return tensors[0]
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(t.to(acc)) for t in tensors]
    units = [
        torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype)
        for t, n in zip(tensors, norms)
    ]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return cast(
            torch.Tensor, sum(t * 0 for t in tensors)
        )  # Python's sum, as mergekit (0 + -0.0 = 0.0)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    dirs = [units[i] for i in valid]

    mean = torch.zeros_like(dirs[0])
    for a, u in zip(weights, dirs):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(acc))
    mean = dirs[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, dirs):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            phi = torch.arccos(dot)
            if phi.item() < tol:
                continue
            tangent += a * (phi / torch.sin(phi)) * (u - dot * mean)
        step = torch.linalg.vector_norm(tangent.to(acc))
        if step.item() < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(acc))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)

    scale = cast(torch.Tensor, sum(a * n for a, n in zip(alphas, norms)))
    return scale * mean


@method(
    "karcher",
    kind="tensors",
    params=KarcherParams,
    paper="https://arxiv.org/abs/2603.04972",
    summary="Karcher (Riemannian) mean of the inputs' directions on the sphere, scaled by their mean norm",
    base_as_input=True,
    elementwise=False,
)
def karcher(
    tensors: Sequence[torch.Tensor],
    p: KarcherParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Karcher mean of ``tensors`` with equal weights (the engine lists the base among them)."""
    if len(tensors) == 1:
        return tensors[0]
    alphas = [1.0 / len(tensors)] * len(tensors)
    return karcher_mean(tensors, alphas, max_iter=p.max_iter, tol=p.tol)
