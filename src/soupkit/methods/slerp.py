"""SLERP: spherical linear interpolation between the base model and one other model.

    cos(Omega) = <v0, v1> / (|v0| |v1|)          (each tensor flattened to one vector)
    theta      = sin((1 - t) Omega) / sin(Omega) * v0  +  sin(t Omega) / sin(Omega) * v1
    theta      = (1 - t) * v0 + t * v1           when |cos(Omega)| > 0.9995 (near-parallel)

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (reference:
https://en.wikipedia.org/wiki/Slerp). v0 is the recipe's ``base_model`` (``t = 0``) and v1 the
one other model (``t = 1``); ``t`` is usually a gradient across layers with filters, e.g.
``t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {value: 0.5}]``.

Anchor: mergekit ``slerp`` (the same recipe: both models under ``models:``, one of them as
``base_model``, global ``t``), including its fall-back to linear interpolation for
near-parallel tensors (``|cos| > 0.9995``, mergekit's ``DOT_THRESHOLD``). Deviations: the dot
product and norms accumulate in float64 and the coefficients are computed in float64 (mergekit
works in float32), so results agree with mergekit 0.1.5 to float32 rounding, not bit for bit; a
tensor with norm <= 1e-8 (e.g. a zero-initialised bias) falls back to linear interpolation
(mergekit would leave it unnormalised and scale the other endpoint by sin(t*pi/2)); ``t = 0``
and ``t = 1`` return the endpoints' exact bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from soupkit.methods import _exact, method
from soupkit.methods._spec import Params

DOT_THRESHOLD = 0.9995
EPS = 1e-8
_BLOCK = 1 << 20


class SlerpParams(Params):
    """Parameters of `slerp`.

    Attributes:
        t: interpolation position in [0, 1]: 0 = ``base_model``, 1 = the other model.
    """

    t: float = Field(0.5, ge=0, le=1)


def _dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> accumulated in float64, a block at a time (no full float64 copies)."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for i in range(0, fa.numel(), _BLOCK):
        total += float(torch.dot(fa[i : i + _BLOCK].double(), fb[i : i + _BLOCK].double()))
    return total


def _lerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    out = v0 * torch.tensor(1.0 - t, dtype=torch.float32)
    out += v1 * torch.tensor(t, dtype=torch.float32)
    return out


@method(
    "slerp",
    kind="tensors",
    params=SlerpParams,
    paper="https://en.wikipedia.org/wiki/Slerp",
    summary="spherical interpolation between base_model (t=0) and one other model (t=1)",
    needs_base=True,
    elementwise=False,
    min_models=1,
    max_models=1,
    exact=lambda tensors, p, *, base, rng=None: _exact.slerp(p.t, base, tensors[0]),
)
def slerp(
    tensors: Sequence[torch.Tensor],
    p: SlerpParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Spherical interpolation from ``base`` (t=0) to ``tensors[0]`` (t=1)."""
    if base is None:
        raise ValueError("slerp needs the base tensor (t = 0)")
    v0, v1, t = base, tensors[0], p.t
    if t == 0:
        return v0.clone()
    if t == 1:
        return v1.clone()
    n0, n1 = math.sqrt(_dot64(v0, v0)), math.sqrt(_dot64(v1, v1))
    if n0 <= EPS or n1 <= EPS:
        return _lerp(v0, v1, t)
    dot = _dot64(v0, v1) / (n0 * n1)
    if abs(dot) > DOT_THRESHOLD:
        return _lerp(v0, v1, t)
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    s0 = math.sin((1.0 - t) * omega) / sin_omega
    s1 = math.sin(t * omega) / sin_omega
    out = v0 * torch.tensor(s0, dtype=torch.float32)
    out += v1 * torch.tensor(s1, dtype=torch.float32)
    return out
