"""DARE: drop task-vector entries at random and rescale the survivors (``dare_linear``, ``dare_ties``).

    tau_i   = theta_i - theta_0
    m_i     ~ Bernoulli(density_i), independently per entry
    tau'_i  = m_i * tau_i / density_i                      (rescale: density, the paper)
    dare_linear:  theta = theta_0 + lambda * sum_i w_i tau'_i
    dare_ties:    theta = theta_0 + lambda * TIES-elect-and-merge(tau'_i)   (see `ties`)

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099 (drop rate p = 1 - density; survivors
scaled by 1 / (1 - p)).

Randomness: an entry survives when its draw ``u ~ U[0, 1)`` is below ``density``. Draws come
from a counter-based generator, Philox4x32-10 (`soupkit.methods._philox`): the draw of entry
``e`` of model ``i`` is a pure function of the key the engine derives from (recipe seed, tensor
name[, block of 2^20 elements]), ``i`` and ``e``, 24 bits, ``u = (word >> 8) / 2^24``. Each
entry's decision is independent of the others, so the methods are elementwise: the output
bytes do not depend on chunk size, thread count or tensor order. A model's mask depends on its
position in the recipe (its stream), not on the other models' densities; listing the models in
another order gives another, equally distributed, draw. (soupkit 0.1.0 drew from
``torch.rand`` on a Mersenne-Twister generator: the same seed now gives other masks.)

Convention switches (defaults = mergekit's, so a mergekit recipe gives mergekit's model;
``convention: paper`` / ``peft`` sets them all to the other anchor):

- ``rescale``: ``density`` (paper, PEFT: divide survivors by density), ``l1`` (mergekit:
  scale the sparsified tensor to the L1 norm of the original), ``none``. mergekit's boolean
  form is accepted: ``true`` = ``density``, ``false`` = ``none``. Deviation: the engine works
  on blocks of 2^20 elements, so ``l1`` matches the norm per block (per tensor, as mergekit
  does, for tensors up to 2^20 elements). The norms are float64 sums in a fixed order
  (`_ops.l1_norm`), so the native kernels give the same bytes.
- ``dare_ties`` also takes the consensus switches of `ties` (``sign_source``, ``sign_tie``,
  ``aggregation``): paper = unweighted / zero / mean (TIES Algorithm 1, as PEFT's
  ``dare_ties`` up to its ``positive`` tie rule); mergekit = weighted / positive / sum
  (mergekit's ``dare_ties`` does not normalize by default).
- ``dare_linear``: mergekit's ``normalize`` (default false) divides by the summed weights.

PEFT's ``dare_linear`` / ``dare_ties`` are ``lambda: 1`` with the ``peft`` convention; PEFT
draws from the global RNG, so only the statistics can be compared, not the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import model_validator

from soupkit.methods import _exact, _ops, method
from soupkit.methods._conventions import ConsensusParams, Density, PresetParams
from soupkit.methods._philox import CounterRNG, counter_rng

Rescale = Literal["density", "l1", "none"]
_BOOL = {True: "density", False: "none"}


class DareLinearParams(PresetParams):
    """Parameters of `dare_linear`.

    Attributes:
        weight: per model, weight w_i (default 1.0).
        density: per model, the probability that an entry survives, in (0, 1] (default 1.0).
        rescale: ``density`` (paper, PEFT), ``l1`` (mergekit) or ``none``.
        normalize: divide by the sum of the weights (default false, as mergekit).
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0, "density": 1.0}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"rescale": "density"},
        "mergekit": {"rescale": "l1"},
        "peft": {"rescale": "density"},
    }
    bool_rescale: ClassVar[dict[bool, str]] = _BOOL
    density: tuple[Density, ...]
    rescale: Rescale = "l1"
    normalize: bool = False

    @model_validator(mode="after")
    def _nonzero_total(self) -> DareLinearParams:
        if self.normalize and sum(self.weight) == 0:
            raise ValueError(
                f"weights sum to zero ({list(self.weight)}), so they cannot be "
                "normalized; set normalize: false or change the weights"
            )
        return self


class DareTiesParams(ConsensusParams):
    """Parameters of `dare_ties` (consensus switches as in `ties`).

    Attributes:
        weight: per model, weight w_i (default 1.0).
        density: per model, the probability that an entry survives, in (0, 1] (default 1.0).
        rescale: ``density`` (paper, PEFT), ``l1`` (mergekit) or ``none``.
    """

    per_model: ClassVar[dict[str, Any]] = {"weight": 1.0, "density": 1.0}
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {
            "rescale": "density",
            "sign_source": "unweighted",
            "sign_tie": "zero",
            "aggregation": "mean",
        },
        "mergekit": {
            "rescale": "l1",
            "sign_source": "weighted",
            "sign_tie": "positive",
            "aggregation": "sum",
        },
        "peft": {
            "rescale": "density",
            "sign_source": "unweighted",
            "sign_tie": "positive",
            "aggregation": "mean",
        },
    }
    bool_rescale: ClassVar[dict[bool, str]] = _BOOL
    density: tuple[Density, ...]
    rescale: Rescale = "l1"
    aggregation: _ops.Aggregation = "sum"  # mergekit's normalize: false


def _drop(
    deltas: Sequence[torch.Tensor],
    density: Sequence[float],
    rescale: Rescale,
    rng: CounterRNG | torch.Generator | None,
) -> list[torch.Tensor]:
    r = counter_rng(rng)
    return [
        _ops.dare_drop(d, k, r, rescale, stream=i) for i, (d, k) in enumerate(zip(deltas, density))
    ]


@method(
    "dare_linear",
    kind="task_vector",
    params=DareLinearParams,
    paper="https://arxiv.org/abs/2311.03099",
    summary="DARE: drop task-vector entries at random, rescale, weighted sum",
    needs_base=True,
    stochastic=True,
    exact=_exact.gta_method("random", None),
    exact_check=_exact.gta_check,
)
def dare_linear(
    deltas: Sequence[torch.Tensor],
    p: DareLinearParams,
    *,
    rng: CounterRNG | torch.Generator | None = None,
) -> torch.Tensor:
    """Drop and rescale each task vector, then ``lambda * sum_i w_i tau'_i``."""
    dropped = _drop(deltas, p.density, p.rescale, rng)
    return _ops.linear_combine(dropped, p.weight, normalize=p.normalize, lam=p.lambda_)


@method(
    "dare_ties",
    kind="task_vector",
    params=DareTiesParams,
    paper="https://arxiv.org/abs/2311.03099",
    summary="DARE drop-and-rescale, then TIES sign election and disjoint merge",
    needs_base=True,
    stochastic=True,
    exact=_exact.gta_method("random", "sum"),
    exact_check=_exact.gta_check,
)
def dare_ties(
    deltas: Sequence[torch.Tensor],
    p: DareTiesParams,
    *,
    rng: CounterRNG | torch.Generator | None = None,
) -> torch.Tensor:
    """Drop and rescale each task vector, then TIES' elect and disjoint merge."""
    dropped = _drop(deltas, p.density, p.rescale, rng)
    return _ops.consensus_combine(
        dropped,
        p.weight,
        sign_source=p.sign_source,
        sign_tie=p.sign_tie,
        aggregation=p.aggregation,
        lam=p.lambda_,
    )
