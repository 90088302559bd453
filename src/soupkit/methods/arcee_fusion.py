"""Arcee Fusion: take the other model's value only where its change is unusually important.

    d     = theta_1 - theta_0                        (theta_0 = base_model, theta_1 = the model)
    P, Q  = softmax(theta_1) + 1e-8,  softmax(theta_0) + 1e-8   (along the last axis)
    I     = |d| * sum_last(P log(P / Q))             (change times the row's KL divergence)
    q_25, q_50, q_75 = quantiles of I (sorted entries at index floor(q (n - 1)))
    theta = theta_0 + d * [I >= q_50 + 1.5 (q_75 - q_25)]

Arcee AI, "Arcee Fusion" (mergekit's ``arcee_fusion``, https://arcee.ai; no paper): a
Tukey-fence outlier test on an importance score, so only the entries whose change stands out
are taken from the model, and everything else stays the base.

Anchor: mergekit 0.1.5 ``arcee_fusion``, the same operations in the same order, in the dtype
of the tensors given; like mergekit the mask is float32, so for bfloat16 / float16 inputs the
sum ``theta_0 + d * mask`` is formed in float32 before the cast to the output dtype. Bit for
bit equal to mergekit for tensors of up to 1,000,000 entries.

Deviation (randomness): for larger tensors mergekit estimates the quartiles from 1,000,000
entries drawn with replacement from torch's *global* generator, so its result depends on the
order tensors are merged in and cannot be reproduced. soupkit draws the same number of
entries, the same way, from the generator the engine seeds from (recipe seed, tensor name): the
same estimator, reproducible; the bytes differ from any given mergekit run only in which
entries near the fence are taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from soupkit.methods import method
from soupkit.methods._spec import Params

SAMPLE = 1_000_000
_QUARTILES = (0.25, 0.5, 0.75)


class ArceeFusionParams(Params):
    """`arcee_fusion` takes no parameters."""


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|theta - base| times the KL divergence of each row's softmax (last axis) from the base's."""
    diff = (theta - base).abs()
    eps = 1e-8
    p = F.softmax(theta, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fence(scores: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
    """Tukey's upper fence ``q_50 + 1.5 (q_75 - q_25)`` of ``scores`` (quartiles of at most
    `SAMPLE` entries, drawn with replacement from ``rng`` when there are more)."""
    flat = scores.reshape(-1)
    if flat.numel() > SAMPLE:
        if rng is None:
            raise ValueError(
                "arcee_fusion samples large tensors: pass rng=torch.Generator().manual_seed(...)"
            )
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=rng, device=flat.device)]
    ordered, _ = torch.sort(flat)
    idx = (torch.tensor(_QUARTILES) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[idx].unbind()
    return median + 1.5 * (q3 - q1)


@method(
    "arcee_fusion",
    kind="tensors",
    params=ArceeFusionParams,
    paper="https://arcee.ai",
    summary="Arcee Fusion: take the model's change only where its KL-weighted importance is an outlier",
    needs_base=True,
    exact_out_dtype="float32",  # its float32 mask promotes; mergekit writes what comes out
    elementwise=False,
    stochastic=True,
    min_models=1,
    max_models=1,
)
def arcee_fusion(
    tensors: Sequence[torch.Tensor],
    p: ArceeFusionParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Arcee Fusion of ``tensors[0]`` into ``base``."""
    if base is None:
        raise ValueError("arcee_fusion needs the base tensor")
    theta = tensors[0]
    scores = importance(theta, base)
    mask = (scores >= fence(scores, rng)).float()
    return base + (theta - base) * mask
