"""NearSwap: take the other model's value where it is close to the base, keep the base elsewhere.

    w     = clamp(t / max(|theta_0 - theta_1|, 1e-6), 0, 1)      (per entry)
    theta = w * theta_1 + (1 - w) * theta_0

theta_0 is the ``base_model`` and theta_1 the one other model. Where the two differ by at most
``t`` the entry becomes the other model's (w = 1); where they differ more it moves towards it
by t / |difference| only, so large changes are damped and small ones taken whole.

Alchemonaut, "QuartetAnemoi-70B-t0.0001" (model card that introduced it, no paper):
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001. ``t`` (required, as in mergekit)
is in the units of the weights, e.g. 0.0001.

Anchor: mergekit 0.1.5 ``nearswap``, the same operations in the same order, in the dtype of the
tensors given (bit for bit in float32, bfloat16 and float16). Elementwise, so it streams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soupkit.methods import method
from soupkit.methods._spec import Params


class NearswapParams(Params):
    """Parameters of `nearswap`.

    Attributes:
        t: the distance below which the other model's value is taken whole (required).
    """

    t: float


@method(
    "nearswap",
    kind="tensors",
    params=NearswapParams,
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    summary="NearSwap: take the model's value where it is within t of base_model, damp it elsewhere",
    needs_base=True,
    min_models=1,
    max_models=1,
)
def nearswap(
    tensors: Sequence[torch.Tensor],
    p: NearswapParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """NearSwap of ``tensors[0]`` into ``base`` with threshold ``p.t``."""
    if base is None:
        raise ValueError("nearswap needs the base tensor")
    other = tensors[0]
    w = (p.t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return w * other + (1 - w) * base
