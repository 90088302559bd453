"""SCE: Select, Calculate, Erase: fuse task vectors by their variance and energy, sign-consensus.

    tau_i  = theta_i - theta_0                                  (i = 1..N)
    Select (select_topk < 1):  keep, in every tau_i, only the k = int(nnz(var) * select_topk)
           entries where the variance across models, var_j = Var_i(tau_ij) (population), is
           largest (torch.topk on |var|); the rest are zero
    Calculate:  c_i  = mean_j(tau_ij^2) / sum_l mean_j(tau_lj^2)     (c_i = 1/N if the sum < 1e-6)
    Erase:      s_j  = sign(sum_i tau_ij) (0 counts as +),  e_ij = [sign(tau_ij) == s_j]
    theta  = theta_0 + sum_i c_i e_ij tau_ij / max(sum_i c_i e_ij, 1e-6)

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024, https://arxiv.org/abs/2408.07990
(section 3.3, "SCE"). The selection statistic, the energy weights and the sign election are
per tensor, as in the paper.

Anchor: mergekit 0.1.5 ``sce`` (``select_topk`` = 1, ``int8_mask`` = false), the same
operations in the same order, in the dtype of the tensors given, and the same choice among
equal variances (torch.topk's), so a bfloat16 run matches mergekit's bfloat16 run bit for bit.
``int8_mask`` is accepted; it only changes the dtype of mergekit's masks, never the result.
Because the selection ranks entries by their variance *across* models, entries on which all
models agree exactly (variance 0) are never selected: with ``select_topk < 1``, identical
models give the base. Note that an entry whose sign is 0 is erased unless the elected sign of its column is also 0,
which never happens (0 counts as +), as in mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from soupkit.methods import method
from soupkit.methods._spec import Params


class SceParams(Params):
    """Parameters of `sce`.

    Attributes:
        select_topk: fraction of the entries (of those with nonzero variance) kept, by largest
            variance across the models (default 1: keep all).
        int8_mask: mergekit's memory switch for its masks; accepted, no effect on the result.
    """

    select_topk: float = Field(1.0, ge=0)
    int8_mask: bool = False


def variance_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """1 where the variance across models (axis 0 of ``tvs``) is among the ``density``
    fraction of largest nonzero variances, else 0, in the dtype of ``tvs``."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k == 0:
        return mask
    _, idx = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask.view(-1)[idx] = 1
    return mask


def energy_weights(tvs: torch.Tensor) -> torch.Tensor:
    """Each model's mean squared entry, normalised to sum 1 (uniform when the sum is < 1e-6)."""
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(w).item()
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


@method(
    "sce",
    kind="task_vector",
    params=SceParams,
    paper="https://arxiv.org/abs/2408.07990",
    summary="SCE (FuseChat): variance top-k select, energy weights, sign-consensus erase",
    needs_base=True,
    elementwise=False,
    work_per_input=5,  # stacked copies, masks and products, as mergekit forms them
)
def sce(
    deltas: Sequence[torch.Tensor],
    p: SceParams,
    *,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """SCE of the task vectors ``deltas``; returns the merged task vector."""
    tvs = torch.stack(list(deltas), dim=0)
    if p.select_topk < 1:
        tvs = tvs * variance_mask(tvs, p.select_topk).unsqueeze(0)
    signs = tvs.sign()
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    keep = signs == elected
    w = energy_weights(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    kept = w * keep
    return (tvs * kept).sum(dim=0) / torch.sum(kept, dim=0).clamp(min=1e-6)
