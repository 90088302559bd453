"""WiSE-FT: weight-space ensembling of a zero-shot model and its fine-tune.

    theta = (1 - alpha) * theta_zero_shot + alpha * theta_fine_tuned

Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022,
https://arxiv.org/abs/2109.01903. The recipe's ``base_model`` is the zero-shot model and its
one model is the fine-tune; ``alpha = 0`` gives the zero-shot model, ``alpha = 1`` the
fine-tune. Values outside [0, 1] extrapolate and are allowed, as in the paper's code.

Anchor: the paper's reference code (``wise_ft.py``:
``(1 - alpha) * theta_0[key] + alpha * theta_1[key]``), reproduced bit for bit in float32:
``1 - alpha`` is formed in double precision, both products are rounded to float32 and then
added. mergekit has no method of this name; its ``linear`` with weights ``1 - alpha`` and
``alpha`` and ``normalize: false`` is the same formula.

A list of alphas in one run (one output per alpha, inputs read once) is the job of
`soupkit.wise_ft` / ``soupkit wise-ft``; inside a recipe, a list is a per-layer gradient, as in
mergekit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soupkit.methods import method
from soupkit.methods._spec import Params


class WiseFTParams(Params):
    """Parameters of `wise_ft`.

    Attributes:
        alpha: weight of the fine-tuned model (default 0.5).
    """

    alpha: float = 0.5


@method(
    "wise_ft",
    kind="tensors",
    params=WiseFTParams,
    paper="https://arxiv.org/abs/2109.01903",
    summary="WiSE-FT: (1 - alpha) * zero-shot (base_model) + alpha * fine-tuned",
    needs_base=True,
    min_models=1,
    max_models=1,
)
def wise_ft(
    tensors: Sequence[torch.Tensor],
    p: WiseFTParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """``(1 - alpha) * base + alpha * tensors[0]`` in float32."""
    if base is None:
        raise ValueError("wise_ft needs the zero-shot tensor as base")
    out = base * torch.tensor(1.0 - p.alpha, dtype=torch.float32)
    out += tensors[0].mul_(torch.tensor(p.alpha, dtype=torch.float32))  # the method owns tensors[0]
    return out
