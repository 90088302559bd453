"""TIES-Merging: trim, elect sign, disjoint merge.

    tau_i     = theta_i - theta_0
    trimmed_i = tau_i with all but its top-k magnitudes (k = int(density_i * n)) set to 0
    gamma     = sgn(sum_i trimmed_i)                                   (elected sign)
    A(p)      = {i : sgn(trimmed_i[p]) == gamma[p]}                     (agreeing models)
    tau[p]    = sum_{i in A(p)} w_i * trimmed_i[p] / |A(p)|             (disjoint mean)
    theta     = theta_0 + lambda * tau

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708 (Algorithm 1; the paper has no per-model weights, i.e.
w_i = 1).

Convention switches (defaults = mergekit's ``ties``, so a mergekit recipe gives mergekit's
model; ``convention: paper`` / ``peft`` sets them all to the other anchor):

================  ==================  =====================  =====================
switch            paper               mergekit (default)     PEFT ``ties``
================  ==================  =====================  =====================
``trim_scope``    ``global``          ``per_tensor``         ``per_tensor``
``sign_source``   ``unweighted``      ``weighted``           ``unweighted`` (total)
``sign_tie``      ``zero``            ``positive``           ``positive``
``aggregation``   ``mean``            ``weighted_mean``      ``mean``
================  ==================  =====================  =====================

- ``trim_scope: global`` keeps the top-k of each model's *whole* task vector (all merged
  tensors at once, as the paper's code flattens the model); the engine finds the exact global
  k-th magnitude with a streaming radix select over float32 bit patterns (see
  `soupkit.engine.global_trim`), never concatenating tensors. ``per_tensor`` keeps the top-k of each
  tensor (mergekit, PEFT). A direct call of this function trims over the tensor it is given.
- Exactly ``k = int(density * n)`` entries survive. Ties at the threshold are broken by
  position: the entry with the lower flat index wins, and across tensors (global scope) the
  tensor whose name sorts first wins. The paper's released code keeps every entry ``>=`` its
  kth value instead (at least k + 1 entries); PEFT's ``topk`` and mergekit's ``argsort``
  leave the choice among ties unspecified.
  In exact mode (``compute: exact``) the choice is mergekit's (see `soupkit.methods._exact`).
- ``sign_tie: zero``: where the trimmed deltas sum to exactly 0 the elected sign is 0 and the
  merged entry is 0 (Algorithm 1 with sgn(0) = 0); mergekit and PEFT elect + there. (The
  paper's code resolves such entries to the majority sign of the whole model, which is not
  offered.)
- Weights: with the paper's ``mean``, weights multiply the agreeing deltas but the divisor is
  the *count* of agreeing models (PEFT); mergekit weights the deltas *before* electing the
  sign and divides by the summed weights of the agreeing models (mergekit#474).

Also accepted: mergekit's ``normalize`` (``true`` = ``aggregation: weighted_mean``) and
``lambda`` (applied after the disjoint merge, default 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch

from soupkit.methods import _exact, _ops, method
from soupkit.methods._conventions import ConsensusParams, Density
from soupkit.methods._spec import MagnitudeCut

TrimScope = Literal["per_tensor", "global"]


class TiesParams(ConsensusParams):
    """Parameters of `ties` (see the module docstring for the switches).

    Attributes:
        weight: per model, weight w_i (default 1.0).
        density: per model, the fraction of the task vector kept, in (0, 1] (default 1.0:
            no trim, as mergekit; the paper's experiments keep 0.2).
        trim_scope: ``per_tensor`` (mergekit, the default; PEFT) or ``global`` (paper).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0, "density": 1.0}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {
            "trim_scope": "global",
            "sign_source": "unweighted",
            "sign_tie": "zero",
            "aggregation": "mean",
        },
        "mergekit": {
            "trim_scope": "per_tensor",
            "sign_source": "weighted",
            "sign_tie": "positive",
            "aggregation": "weighted_mean",
        },
        "peft": {
            "trim_scope": "per_tensor",
            "sign_source": "unweighted",
            "sign_tie": "positive",
            "aggregation": "mean",
        },
    }
    density: tuple[Density, ...]
    trim_scope: TrimScope = "per_tensor"


def _global_trim(p: TiesParams) -> tuple[float, ...] | None:
    if p.trim_scope == "global" and any(d < 1 for d in p.density):
        return p.density
    return None


def _tensor_trim(p: TiesParams) -> tuple[float, ...]:
    # once each model's cut is known, TIES is elementwise: the engine streams it in chunks
    return p.density if p.trim_scope == "per_tensor" else (1.0,) * len(p.density)


@method(
    "ties",
    kind="task_vector",
    params=TiesParams,
    paper="https://arxiv.org/abs/2306.01708",
    summary="TIES: trim each task vector to its top-k, elect signs, disjoint mean",
    needs_base=True,
    elementwise=False,
    global_trim=_global_trim,  # type: ignore[arg-type]
    tensor_trim=_tensor_trim,  # type: ignore[arg-type]
    exact=_exact.gta_method("magnitude", "sum"),
    exact_check=_exact.gta_check,
)
def ties(
    deltas: Sequence[torch.Tensor],
    p: TiesParams,
    *,
    rng: torch.Generator | None = None,
    trim: Sequence[MagnitudeCut | None] | None = None,
) -> torch.Tensor:
    """Trim (by the engine's global cuts ``trim``, else per tensor), elect, disjoint merge."""
    if trim is not None:
        trimmed = [_ops.apply_cut(d, c) for d, c in zip(deltas, trim)]
    else:
        trimmed = [_ops.trim_topk(d, k) for d, k in zip(deltas, p.density)]
    return _ops.consensus_combine(
        trimmed,
        p.weight,
        sign_source=p.sign_source,
        sign_tie=p.sign_tie,
        aggregation=p.aggregation,
        lam=p.lambda_,
    )
