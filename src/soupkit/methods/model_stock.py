"""Model Stock: interpolate between the base and the average of N fine-tunes by their angle.

    d_i   = theta_i - theta_0                                   (i = 1..N, N >= 2)
    cos   = mean over pairs i < j of <d_i, d_j> / (|d_i| |d_j|)
    t     = N cos / (1 + (N - 1) cos)
    theta = t * mean_i(theta_i) + (1 - t) * theta_0

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
https://arxiv.org/abs/2403.19522 (computed per tensor, i.e. layer-wise as in the paper). The
paper states the angle for N = 2; for N > 2 the mean of the pairwise cosines is used, as
mergekit does.

Anchor: mergekit ``model_stock``, same float32 sequence of operations: norms and dot products
in float32, each norm product clamped to at least 1e-6, each cosine clamped to [-1, 1],
``sum(thetas) / N`` left to right, then ``t * avg + (1 - t) * theta_0``. ``filter_wise: true``
(mergekit's switch) computes one angle per row of the last dimension instead of per tensor.

Deviation: a mean cosine below 0 is clamped to 0 (so t = 0 and the tensor stays the base).
The paper's formula assumes fine-tunes at an acute angle; below 0 it extrapolates away from
the fine-tunes and diverges at cos = -1/(N-1). mergekit 0.1.5 keeps the base only within 1e-6
of that singularity and extrapolates elsewhere; for cos >= 0 the two agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from soupkit.methods import method
from soupkit.methods._spec import Params


class ModelStockParams(Params):
    """Parameters of `model_stock`.

    Attributes:
        filter_wise: one angle per row (last dimension) instead of per tensor (default false).
    """

    filter_wise: bool = False


@method(
    "model_stock",
    kind="tensors",
    params=ModelStockParams,
    paper="https://arxiv.org/abs/2403.19522",
    summary="Model Stock: move from base_model toward the fine-tunes' mean by their angle",
    needs_base=True,
    elementwise=False,
    min_models=2,
)
def model_stock(
    tensors: Sequence[torch.Tensor],
    p: ModelStockParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Model Stock of ``tensors`` (the fine-tunes) around ``base`` (the pretrained model)."""
    if base is None:
        raise ValueError("model_stock needs the base tensor")
    shape = base.shape
    if p.filter_wise and base.dim() >= 1:
        w0 = base.reshape(-1, shape[-1]) if base.dim() >= 2 else base.reshape(1, -1)
    else:
        w0 = base.reshape(1, -1)
    ws = [w.reshape(w0.shape) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1).clamp(min=0)
    n = len(ws)
    t = (n * cos) / (1 + (n - 1) * cos)
    avg = ws[0].clone()
    for w in ws[1:]:
        avg += w
    avg /= n
    return (t * avg + (1 - t) * w0).reshape(shape)
