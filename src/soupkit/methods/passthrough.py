"""Passthrough: copy one model's tensor, optionally scaled.

    theta = scale_1 * theta_1        (theta = theta_1 when no ``scale`` is set)

One source per tensor, always: with ``models:`` the one model is copied whole; with mergekit
``slices`` each slice takes its layers from its one source (a "frankenmerge" stacking layer
ranges of several models), which `soupkit.planning.slices` plans. ``scale`` is per model and
may vary by tensor through a ``filter`` (e.g. 0 on ``o_proj`` / ``down_proj`` to blank them).

No paper: mergekit's copy method, https://github.com/arcee-ai/mergekit#merge-methods.

Anchor: mergekit 0.1.5 ``passthrough``, the same single multiplication in the dtype of the
tensor given (bit for bit; tested on mergekit's own example recipes). Elementwise, so it streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from soupkit.methods import REGISTRY, method
from soupkit.methods._spec import Params


class PassthroughParams(Params):
    """Parameters of `passthrough`.

    Attributes:
        scale: per model, a factor the tensor is multiplied by (None, the default: copied as is).
    """

    per_model: ClassVar[dict[str, Any]] = {"scale": None}
    scale: tuple[float | None, ...]


@method(
    "passthrough",
    kind="tensors",
    params=PassthroughParams,
    paper="https://github.com/arcee-ai/mergekit#merge-methods",
    summary="copy one model's tensors (optionally scaled); with slices: stack layer ranges",
    min_models=1,
    max_models=1,
)
def passthrough(
    tensors: Sequence[torch.Tensor],
    p: PassthroughParams,
    *,
    base: torch.Tensor | None = None,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """The single input tensor, times ``scale`` when one is set (mergekit's ``passthrough``)."""
    s = p.scale[0]
    return tensors[0] if s is None else tensors[0] * s


PASSTHROUGH = REGISTRY["passthrough"]
