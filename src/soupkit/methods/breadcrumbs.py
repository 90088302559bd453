"""Model Breadcrumbs: drop the largest outliers and the smallest entries of each task vector.

    tau_i   = theta_i - theta_0
    tau'_i  = tau_i keeping only the magnitude ranks [top, top + keep) of the tensor, where
              keep = int(density_i * n), top = min(int(gamma_i * n), n - keep)
    breadcrumbs:       theta = theta_0 + lambda * sum_i w_i tau'_i
    breadcrumbs_ties:  theta = theta_0 + lambda * TIES-elect-and-merge(tau'_i)   (see `ties`)

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024, https://arxiv.org/abs/2312.06795. The paper masks per layer the top beta and the
bottom gamma fractions; soupkit follows mergekit's parameterisation (same recipe keys): per
model ``gamma`` (default 0.01) is the fraction of *largest* magnitudes dropped (the paper's
beta) and ``density`` the fraction kept, so the smallest ``1 - density - gamma`` are dropped.
When ``gamma > 1 - density`` fewer outliers are dropped so that ``density`` still holds.

Anchor: mergekit ``breadcrumbs`` / ``breadcrumbs_ties`` (``magnitude_outliers``), bit for bit
against mergekit 0.1.5 (tests/methods/test_mergekit_methods.py). Deviations: among equal
magnitudes the entry with the lower flat index ranks higher (mergekit's ``sort`` leaves ties
unspecified); and exactly ``keep`` entries survive even when ``int(gamma * n) == 0``, where
mergekit releases before 0.1.5 (``indices[n_bot:-n_top]``) kept none. In exact mode
(``compute: exact``) the ranks are mergekit's (see `soupkit.methods._exact`).
Streaming: the band's two cuts per model (``top + keep`` and ``top`` largest) come from a
per-tensor pre-pass (exact top-k cuts, `soupkit.methods._cuts.TopKCounts`), so the engine
runs the method on chunks with bounded memory; the bytes equal the whole-tensor computation.
``breadcrumbs_ties`` is mergekit's combination (the paper has no sign election); its
consensus switches are those of `ties`, with the default ``convention: mergekit`` = weighted
sign vote, + on ties, plain sum (mergekit's default ``normalize: false``) and
``convention: paper`` = TIES' Algorithm 1. ``breadcrumbs`` accepts ``convention`` too (both
values give the same arithmetic: it has no switches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, model_validator

from soupkit.methods import _exact, _ops, method
from soupkit.methods._conventions import ConsensusParams, Density, PresetParams
from soupkit.methods._cuts import TopKCounts
from soupkit.methods._spec import Prepass
from soupkit.methods._topk import MagnitudeCut, magnitude_bits_

Gamma = Annotated[float, Field(ge=0, lt=1)]


class BreadcrumbsParams(PresetParams):
    """Parameters of `breadcrumbs`.

    Attributes:
        weight: per model, weight w_i (default 1.0).
        density: per model, the fraction of entries kept, in (0, 1] (default 1.0).
        gamma: per model, the fraction of largest-magnitude entries dropped, in [0, 1)
            (default 0.01, as mergekit).
        normalize: divide by the sum of the weights (default false, as mergekit).
        convention: accepted as by every method with conventions; ``paper`` and ``mergekit``
            mean the same arithmetic here (the paper's trim has mergekit's parameterisation).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "mergekit": {}}
    density: tuple[Density, ...]
    gamma: tuple[Gamma, ...]
    normalize: bool = False

    @model_validator(mode="after")
    def _nonzero_total(self) -> BreadcrumbsParams:
        if self.normalize and sum(self.weight) == 0:
            raise ValueError(
                f"weights sum to zero ({list(self.weight)}), so they cannot be "
                "normalized; set normalize: false or change the weights"
            )
        return self


class BreadcrumbsTiesParams(ConsensusParams):
    """Parameters of `breadcrumbs_ties` (consensus switches as in `ties`).

    Attributes:
        weight: per model, weight w_i (default 1.0).
        density: per model, the fraction of entries kept, in (0, 1] (default 1.0).
        gamma: per model, the fraction of largest-magnitude entries dropped (default 0.01).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"sign_source": "unweighted", "sign_tie": "zero", "aggregation": "mean"},
        "mergekit": {"sign_source": "weighted", "sign_tie": "positive", "aggregation": "sum"},
    }
    density: tuple[Density, ...]
    gamma: tuple[Gamma, ...]
    aggregation: _ops.Aggregation = "sum"  # mergekit's normalize: false


def _trim(
    deltas: Sequence[torch.Tensor],
    density: Sequence[float],
    gamma: Sequence[float],
    stat: Sequence[tuple[MagnitudeCut | None, ...]] | None,
) -> list[torch.Tensor]:
    if stat is not None:  # the band's two cuts per model, from the pre-pass
        return [_ops.apply_band(d, upper, lower) for d, (upper, lower) in zip(deltas, stat)]
    return [_ops.trim_band(d, k, g) for d, k, g in zip(deltas, density, gamma)]


def _start(p: BreadcrumbsParams | BreadcrumbsTiesParams, numel: int) -> TopKCounts:
    """The cuts of the band ``[top, top + keep)``: keep the ``top + keep`` largest, minus the
    ``top`` largest (see `soupkit.methods._ops.trim_band`)."""
    ranks = [_ops.band_ranks(numel, d, g) for d, g in zip(p.density, p.gamma)]
    return TopKCounts(numel, [(top + keep, top) for top, keep in ranks])


# The band's cuts are each model's exact top-k magnitude cuts: once they are known the method
# is elementwise, so the engine streams it in chunks after two counting passes per tensor.
PREPASS = Prepass(
    scope=lambda p: "tensor" if any(d < 1 for d in p.density) else None,
    start=_start,
    passes=lambda p: 2,
    observe=magnitude_bits_,
)


@method(
    "breadcrumbs",
    kind="task_vector",
    params=BreadcrumbsParams,
    paper="https://arxiv.org/abs/2312.06795",
    summary="Model Breadcrumbs: drop largest (gamma) and smallest entries, weighted sum",
    needs_base=True,
    elementwise=False,
    prepass=PREPASS,
    exact=_exact.gta_method("magnitude_outliers", None),
)
def breadcrumbs(
    deltas: Sequence[torch.Tensor],
    p: BreadcrumbsParams,
    *,
    rng: torch.Generator | None = None,
    stat: Sequence[tuple[MagnitudeCut | None, ...]] | None = None,
) -> torch.Tensor:
    """Band-trim each task vector (by the pre-pass's cuts ``stat``, else here), then
    ``lambda * sum_i w_i tau'_i``."""
    trimmed = _trim(deltas, p.density, p.gamma, stat)
    return _ops.linear_combine(trimmed, p.weight, normalize=p.normalize, lam=p.lambda_)


@method(
    "breadcrumbs_ties",
    kind="task_vector",
    params=BreadcrumbsTiesParams,
    paper="https://arxiv.org/abs/2312.06795",
    summary="Model Breadcrumbs trim, then TIES sign election and disjoint merge",
    needs_base=True,
    elementwise=False,
    prepass=PREPASS,
    exact=_exact.gta_method("magnitude_outliers", "sum"),
    exact_check=_exact.gta_check,
)
def breadcrumbs_ties(
    deltas: Sequence[torch.Tensor],
    p: BreadcrumbsTiesParams,
    *,
    rng: torch.Generator | None = None,
    stat: Sequence[tuple[MagnitudeCut | None, ...]] | None = None,
) -> torch.Tensor:
    """Band-trim each task vector (cuts ``stat`` from the pre-pass, else here), then TIES'
    elect and disjoint merge."""
    trimmed = _trim(deltas, p.density, p.gamma, stat)
    return _ops.consensus_combine(
        trimmed,
        p.weight,
        sign_source=p.sign_source,
        sign_tie=p.sign_tie,
        aggregation=p.aggregation,
        lam=p.lambda_,
    )
