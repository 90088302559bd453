"""Task arithmetic: add (scaled, weighted) task vectors to the base model.

    theta = theta_0 + lambda * sum_i w_i * (theta_i - theta_0)                 (normalize: false)
    theta = theta_0 + lambda * sum_i w_i * (theta_i - theta_0) / sum_i w_i     (normalize: true)

Ilharco et al., "Editing models with task arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089. Negative weights subtract a task vector (forgetting), and
``lambda`` is the paper's scaling coefficient. For the Python algebra of task vectors (add,
negate, scale, analogies) see `soupkit.TaskVector`, which compiles to this method.

Anchors, reproduced bit for bit in float32 under the same inputs:

- mergekit ``task_arithmetic`` (same keys: per-model ``weight``, global ``lambda`` and
  ``normalize``, default false): weighted sum, then the division, then ``lambda``.
- PEFT ``merge_utils.task_arithmetic(task_tensors, weights)``: ``lambda: 1``,
  ``normalize: false``.

The weighted sum runs left to right in recipe order; mergekit and PEFT use
``torch.stack(...).sum(0)``, which is that same order for up to 4 models and may differ in the
last bit beyond. Deviation from mergekit: ``normalize: true`` with weights summing to 0 is a
configuration error (mergekit silently divides by 1 instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import model_validator

from soupkit.methods import _exact, _ops, method
from soupkit.methods._conventions import TaskVectorParams


class TaskArithmeticParams(TaskVectorParams):
    """Parameters of `task_arithmetic`.

    Attributes:
        weight: per model, the weight w_i of its task vector (default 1.0).
        lambda_: recipe key ``lambda``: scale of the summed task vectors (default 1.0).
        normalize: divide by the sum of the weights (default false, as mergekit).
    """

    normalize: bool = False

    @model_validator(mode="after")
    def _nonzero_total(self) -> TaskArithmeticParams:
        if self.normalize and sum(self.weight) == 0:
            raise ValueError(
                f"weights sum to zero ({list(self.weight)}), so they cannot be "
                "normalized; set normalize: false or change the weights"
            )
        return self


@method(
    "task_arithmetic",
    kind="task_vector",
    params=TaskArithmeticParams,
    paper="https://arxiv.org/abs/2212.04089",
    summary="base + lambda * sum of weighted task vectors (add, negate, scale skills)",
    needs_base=True,
    exact=_exact.gta_method(None, None),
)
def task_arithmetic(
    deltas: Sequence[torch.Tensor], p: TaskArithmeticParams, *, rng: torch.Generator | None = None
) -> torch.Tensor:
    """``lambda * sum_i w_i * delta_i`` (divided by ``sum_i w_i`` when ``normalize``)."""
    return _ops.linear_combine(deltas, p.weight, normalize=p.normalize, lam=p.lambda_)
