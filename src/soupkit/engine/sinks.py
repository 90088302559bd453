"""Where the engine's outputs go: a `Sink` receives each output chunk in the output dtype.

`soupkit.io.output.ShardFiles` writes the plan's shards at their offsets; `MemorySink` fills
in-memory tensors (the Python API's in-memory forms). Both see exactly the same chunks, so a
streamed merge and an in-memory merge agree bit for bit.
"""

from __future__ import annotations

from typing import Protocol

import torch

from soupkit.io.header import DTYPES
from soupkit.planning.plan import MergePlan, TensorJob

__all__ = ["MemorySink", "Sink"]


class Sink(Protocol):
    """Where output tensors go: ``write`` receives a flat chunk in the output dtype."""

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None: ...


class MemorySink:
    """Collects the outputs as in-memory tensors (name -> tensor of the planned shape)."""

    def __init__(self, plan: MergePlan) -> None:
        self.tensors: dict[str, torch.Tensor] = {
            j.name: torch.empty(j.shape, dtype=DTYPES[j.out_dtype][0]) for j in plan.jobs
        }

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None:
        flat = self.tensors[job.name].view(-1)
        flat[element_offset : element_offset + data.numel()] = data
