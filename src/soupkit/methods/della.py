"""DELLA: magnitude-ranked random drops (MagPrune), then sign election and fusion.

    tau_i     = theta_i - theta_0
    p_i[r, j] = density_i - epsilon_i + 2 * epsilon_i * rank_r(|tau_i[r, j]|) / (m - 1)
                (keep probability, ranked within row r of m entries, smallest = rank 0)
    tau'_i    = Bernoulli(p_i) * tau_i / p_i                  (rescale: probability)
    della:         theta = theta_0 + lambda * TIES-elect-and-merge(tau'_i)   (see `ties`)
    della_linear:  theta = theta_0 + lambda * sum_i w_i tau'_i

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", 2024, https://arxiv.org/abs/2406.11617 (Drop with MagPrune, Elect, Fuse).

Parameterisation follows mergekit (same keys): per model ``density`` (mean keep probability)
and ``epsilon`` (default 0.15), the *half*-width of the keep-probability range
``[density - epsilon, density + epsilon]``; the paper's epsilon is the full width of its
drop-probability ramp (about twice ours). ``density - epsilon`` must be > 0 and
``density + epsilon`` <= 1 (mergekit asks < 1; a keep probability of 1 is harmless).

Convention switches (defaults = mergekit's, so a mergekit recipe gives mergekit's model;
``convention: paper`` sets them all to the paper's):

- ``rescale``: ``probability`` divides each survivor by its own keep probability (the paper's
  1 / (1 - p_i)); ``l1`` matches the L1 norm of the original task vector (mergekit);
  ``none``. mergekit's boolean ``rescale: true`` = ``probability``, ``false`` = ``none``.
- ``della``: consensus switches of `ties`; paper = unweighted / zero / mean (DELLA's Elect and
  Fuse average the agreeing entries), mergekit = weighted / positive / weighted_mean.
- ``della_linear``: mergekit's ``normalize`` (default false).

Rows are the first dimension (a tensor is viewed as ``[shape[0], -1]``; a vector is one row);
mergekit ranks along dimension 1, which is the same for matrices and vectors and differs for
tensors of 3 or more dimensions. Ranks break ties by position (stable sort), where mergekit's
``argsort`` leaves them unspecified; a row of one entry gets keep probability ``density``
(mergekit divides 0 by 0 there); exact mode (``compute: exact``) ranks and draws as mergekit
does (see `soupkit.methods._exact`). The method needs whole tensors (ranks are per row) and draws
from the counter-based generator of `dare` (Philox4x32-10, one stream per model), keyed by
(recipe seed, tensor name); ``u < p`` keeps an entry, with the 24-bit draw ``u``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from soupkit.methods import _exact, _ops, method
from soupkit.methods._conventions import ConsensusParams, Density, PresetParams
from soupkit.methods._philox import CounterRNG, counter_rng

Rescale = Literal["probability", "l1", "none"]
Epsilon = Annotated[float, Field(ge=0, lt=1)]
_BOOL = {True: "probability", False: "none"}


def _check_range(density: Sequence[float], epsilon: Sequence[float]) -> None:
    bad = [
        (i, d, e)
        for i, (d, e) in enumerate(zip(density, epsilon))
        if d < 1 and not (d - e > 0 and d + e <= 1)
    ]
    if bad:
        shown = ", ".join(f"model {i}: density {d} epsilon {e}" for i, d, e in bad)
        raise ValueError(
            f"keep probabilities density +/- epsilon must lie in (0, 1] ({shown}); "
            "lower epsilon or move density away from 0 and 1"
        )


class DellaLinearParams(PresetParams):
    """Parameters of `della_linear`.

    Attributes:
        weight: per model, weight w_i (default 1.0).
        density: per model, mean keep probability, in (0, 1] (default 1.0: no drop).
        epsilon: per model, half-width of the keep-probability range (default 0.15).
        rescale: ``probability`` (paper), ``l1`` (mergekit) or ``none``.
        normalize: divide by the sum of the weights (default false, as mergekit).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"rescale": "probability"},
        "mergekit": {"rescale": "l1"},
    }
    bool_rescale: ClassVar[dict[bool, str]] = _BOOL
    density: tuple[Density, ...]
    epsilon: tuple[Epsilon, ...]
    rescale: Rescale = "l1"
    normalize: bool = False

    @model_validator(mode="after")
    def _check(self) -> DellaLinearParams:
        _check_range(self.density, self.epsilon)
        if self.normalize and sum(self.weight) == 0:
            raise ValueError(
                f"weights sum to zero ({list(self.weight)}), so they cannot be "
                "normalized; set normalize: false or change the weights"
            )
        return self


class DellaParams(ConsensusParams):
    """Parameters of `della` (consensus switches as in `ties`).

    Attributes:
        weight: per model, weight w_i (default 1.0).
        density: per model, mean keep probability, in (0, 1] (default 1.0: no drop).
        epsilon: per model, half-width of the keep-probability range (default 0.15).
        rescale: ``probability`` (paper), ``l1`` (mergekit) or ``none``.
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {
            "rescale": "probability",
            "sign_source": "unweighted",
            "sign_tie": "zero",
            "aggregation": "mean",
        },
        "mergekit": {
            "rescale": "l1",
            "sign_source": "weighted",
            "sign_tie": "positive",
            "aggregation": "weighted_mean",
        },
    }
    bool_rescale: ClassVar[dict[bool, str]] = _BOOL
    density: tuple[Density, ...]
    epsilon: tuple[Epsilon, ...]
    rescale: Rescale = "l1"

    @model_validator(mode="after")
    def _check(self) -> DellaParams:
        _check_range(self.density, self.epsilon)
        return self


def _drop(
    deltas: Sequence[torch.Tensor],
    p: DellaParams | DellaLinearParams,
    rng: CounterRNG | torch.Generator | None,
) -> list[torch.Tensor]:
    r = counter_rng(rng)
    return [
        _ops.della_drop(d, k, e, r, p.rescale, stream=i)
        for i, (d, k, e) in enumerate(zip(deltas, p.density, p.epsilon))
    ]


@method(
    "della",
    kind="task_vector",
    params=DellaParams,
    paper="https://arxiv.org/abs/2406.11617",
    summary="DELLA: magnitude-ranked random drops, then TIES sign election and fusion",
    needs_base=True,
    elementwise=False,
    stochastic=True,
    exact=_exact.gta_method("della_magprune", "sum"),
    exact_check=_exact.gta_check,
)
def della(
    deltas: Sequence[torch.Tensor],
    p: DellaParams,
    *,
    rng: CounterRNG | torch.Generator | None = None,
) -> torch.Tensor:
    """MagPrune each task vector, then TIES' elect and disjoint merge."""
    return _ops.consensus_combine(
        _drop(deltas, p, rng),
        p.weight,
        sign_source=p.sign_source,
        sign_tie=p.sign_tie,
        aggregation=p.aggregation,
        lam=p.lambda_,
    )


@method(
    "della_linear",
    kind="task_vector",
    params=DellaLinearParams,
    paper="https://arxiv.org/abs/2406.11617",
    summary="DELLA's magnitude-ranked random drops, then a weighted sum",
    needs_base=True,
    elementwise=False,
    stochastic=True,
    exact=_exact.gta_method("della_magprune", None),
    exact_check=_exact.gta_check,
)
def della_linear(
    deltas: Sequence[torch.Tensor],
    p: DellaLinearParams,
    *,
    rng: CounterRNG | torch.Generator | None = None,
) -> torch.Tensor:
    """MagPrune each task vector, then ``lambda * sum_i w_i tau'_i``."""
    return _ops.linear_combine(
        _drop(deltas, p, rng), p.weight, normalize=p.normalize, lam=p.lambda_
    )
