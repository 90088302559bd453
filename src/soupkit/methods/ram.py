"""RAM and RAM+ (tensor-local): keep unique task-vector entries whole, average shared ones.

    tau_i  = theta_i - theta_0,   a_ij = [|tau_ij| > epsilon]       (model i changes entry j)
    c_j    = sum_i a_ij                                             (how many models change it)
    ram:         theta_j = theta_0j + sum_{i: a_ij} tau_ij * (1 if c_j == 1 else 1 / c_j)
    ramplus_tl:  as ram, but an entry only model i changes is scaled by
                 lambda_i = 1 + r * clamp(rho_i, 0, alpha),
                 rho_i = #{j: a_ij, c_j > 1} / max(#{j: a_ij, c_j == 1}, epsilon)

Reinforced Agent Merging, https://arxiv.org/abs/2601.13572: averaging dilutes an update that
only one agent made; RAM keeps such unique entries at full strength and averages only where
several models overlap. RAM+ rescales each model's unique entries by how much of its update it
shares with the others (rho_i, its overlap-to-unique ratio). ``ramplus_tl`` is mergekit's
*tensor-local* form: rho_i is counted over one tensor at a time, not over the whole model.

Inputs: only the task vectors, so both methods run from checkpoints alone (no activation or
reward statistics are needed).

Anchor: mergekit 0.1.5 ``ram`` (``epsilon`` = 1e-5) and ``ramplus_tl`` (``r`` = 0.1,
``alpha`` = 0.2, ``epsilon`` = 1e-5), the same operations in the same order, in the dtype of
the tensors given; as in mergekit, ``ramplus_tl``'s lambda_i is float32, so for bfloat16 /
float16 inputs its merged task vector is float32 before the cast to the output dtype.
``ram`` is elementwise (it streams in chunks); ``ramplus_tl`` counts over whole tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from soupkit.methods import method
from soupkit.methods._spec import Params


class RamParams(Params):
    """Parameters of `ram`.

    Attributes:
        epsilon: a task-vector entry counts as changed when its magnitude exceeds this (1e-5).
    """

    epsilon: float = Field(1e-5, ge=0)


class RamPlusParams(Params):
    """Parameters of `ramplus_tl`.

    Attributes:
        r: strength of the rescaling of unique entries (default 0.1).
        alpha: the most the overlap ratio rho counts for (default 0.2).
        epsilon: a task-vector entry counts as changed when its magnitude exceeds this (1e-5);
            also the floor of the unique count in rho.
    """

    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = Field(1e-5, gt=0)


def _overlap(
    deltas: Sequence[torch.Tensor], epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat task vectors, which entries each model changes, how many models change each entry,
    and where that count is > 1 (shared) or == 1 (unique)."""
    tv = torch.stack(list(deltas), dim=0).view(len(deltas), -1)
    changed = tv.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return tv, changed, counts, counts > 1, counts == 1


@method(
    "ram",
    kind="task_vector",
    params=RamParams,
    paper="https://arxiv.org/abs/2601.13572",
    summary="RAM: unique task-vector entries kept whole, entries several models change averaged",
    needs_base=True,
)
def ram(
    deltas: Sequence[torch.Tensor],
    p: RamParams,
    *,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """RAM of the task vectors ``deltas``; returns the merged task vector."""
    tv, changed, counts, shared, unique = _overlap(deltas, p.epsilon)
    tv = tv * changed
    merged = ((tv * unique) + (tv * shared / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return merged.reshape_as(deltas[0])


@method(
    "ramplus_tl",
    kind="task_vector",
    params=RamPlusParams,
    paper="https://arxiv.org/abs/2601.13572",
    summary="RAM+ (tensor-local): RAM with each model's unique entries rescaled by its overlap ratio",
    needs_base=True,
    exact_out_dtype="float32",  # its float32 scale promotes; mergekit writes what comes out
    elementwise=False,
    work_per_input=6,  # stacked copies, masks and products, as mergekit forms them
)
def ramplus_tl(
    deltas: Sequence[torch.Tensor],
    p: RamPlusParams,
    *,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """RAM+ (tensor-local) of the task vectors ``deltas``; returns the merged task vector."""
    tv, changed, counts, shared, unique = _overlap(deltas, p.epsilon)
    rho = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=p.epsilon)
    lam = 1 + p.r * rho.clamp(min=0, max=p.alpha)
    tv = tv * changed
    merged = ((tv * unique * lam.unsqueeze(-1)) + (tv * shared / counts.clamp(min=1))).sum(
        dim=0, keepdim=True
    )
    return merged.reshape_as(deltas[0])
