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
  k-th magnitude with a streaming radix select over float32 bit patterns (the pre-pass this
  module declares, `soupkit.methods._cuts.GlobalTopK`), never concatenating tensors.
  ``per_tensor`` keeps the top-k of each tensor (mergekit, PEFT). A direct call of this
  function trims over the tensor it is given.
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
from soupkit.methods._cuts import GlobalTopK, TopKCounts
from soupkit.methods._spec import Prepass, Scope
from soupkit.methods._topk import MagnitudeCut, magnitude_bits_

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


def _scope(p: TiesParams) -> Scope | None:
    """Where the trim's cut is taken: none without a trim; once each model's cut is known,
    TIES is elementwise, so the engine streams it in chunks."""
    if all(d >= 1 for d in p.density):
        return None
    return "global" if p.trim_scope == "global" else "tensor"


def _start(p: TiesParams, numel: int) -> TopKCounts | GlobalTopK:
    ks = [int(d * numel) for d in p.density]
    if p.trim_scope == "global":
        return GlobalTopK(numel, ks)
    return TopKCounts(numel, [(k,) for k in ks])


def _check_global(tensors: Sequence[tuple[str, Any]]) -> str | None:
    """A global trim trims each model's whole task vector to one density."""
    first, ref = tensors[0]
    for name, p in tensors[1:]:
        if p.density != ref.density:
            return (
                f"trim_scope: global trims each model's whole task vector to one density, "
                f"but tensor {first!r} has density {list(ref.density)} and {name!r} has "
                f"{list(p.density)}\n    hint: use trim_scope: per_tensor for per-tensor "
                "densities (filters, gradients), or one density per model"
            )
    return None


PREPASS = Prepass(
    scope=_scope,
    start=_start,
    # radix select: top 16 bits, low 16 bits, and (global scope, rarely) the ties per tensor
    passes=lambda p: 3 if p.trim_scope == "global" else 2,
    observe=magnitude_bits_,
    check=_check_global,
    note="trim_scope: global: a pre-pass reads the {n} trimmed tensors of every model two more "
    "times (three if many entries tie at a threshold) to find each model's exact global "
    "magnitude threshold",
)


@method(
    "ties",
    kind="task_vector",
    params=TiesParams,
    paper="https://arxiv.org/abs/2306.01708",
    summary="TIES: trim each task vector to its top-k, elect signs, disjoint mean",
    needs_base=True,
    elementwise=False,
    prepass=PREPASS,
    exact=_exact.gta_method("magnitude", "sum"),
    exact_check=_exact.gta_check,
)
def ties(
    deltas: Sequence[torch.Tensor],
    p: TiesParams,
    *,
    rng: torch.Generator | None = None,
    stat: Sequence[tuple[MagnitudeCut | None, ...]] | None = None,
) -> torch.Tensor:
    """Trim (by the pre-pass's cuts ``stat``, one per model, else per tensor), elect, merge."""
    if stat is not None:
        trimmed = [_ops.apply_cut(d, c[0]) for d, c in zip(deltas, stat)]
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
