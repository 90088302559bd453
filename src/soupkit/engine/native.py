"""When a piece may run on a native kernel (`soupkit.kernels`) instead of torch.

Elementwise pieces: `piece_kernel`. The sparsifying methods (TIES, DARE, DELLA, Breadcrumbs):
`sparse_kernel`, which the engine asks without knowing the method: the kernel says which of its
calls serves the piece (`soupkit.kernels.sparsify.merge` for an RNG block or a whole tensor,
`cut_piece` for a piece given its cuts by a pre-pass statistic).

A kernel gives the torch path's bytes only where both compute the same thing: the inputs
converted straight from their stored dtypes to float32 (so no recipe ``dtype`` that rounds them
first), float16 inputs converted by one torch thread (torch's float16 conversion treats a NaN
differently in the tail of each thread's range), and a method and parameters the kernels
implement (`soupkit.kernels.for_method` decides those, and whether the kernels are built and
switched on). Everything else runs torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soupkit import kernels
from soupkit.io.header import DTYPES
from soupkit.kernels import sparsify
from soupkit.planning.plan import MergePlan

__all__ = ["SparseKernel", "piece_kernel", "sparse_kernel"]


def _same_bytes(ins: Sequence[torch.dtype], cast: torch.dtype | None) -> bool:
    """Whether converting these stored dtypes straight to float32 is what the torch path does."""
    if cast not in (None, torch.float32) and any(d != cast for d in ins):
        return False  # the torch path rounds the inputs to the recipe's dtype first
    return not (torch.float16 in ins and torch.get_num_threads() != 1)


def piece_kernel(plan: MergePlan, j: int, cast: torch.dtype | None) -> kernels.PieceKernel | None:
    """The kernel for tensor ``j`` of an elementwise (float32-mode) plan, or None: torch runs.

    Args:
        plan: the plan; its method must be elementwise and not in exact mode (the caller checks).
        j: the tensor's index in ``plan.jobs``.
        cast: the recipe's ``dtype`` (None: not set).
    """
    job = plan.jobs[j]
    if job.params is None:
        return None
    ins = [t.torch_dtype for t in job.inputs]
    base = job.base.torch_dtype if job.base is not None else None
    if not _same_bytes(ins + ([base] if base is not None else []), cast):
        return None
    return kernels.for_method(plan.method.name, job.params, ins, base, DTYPES[job.out_dtype][0])


@dataclass(frozen=True)
class SparseKernel:
    """The native kernel of one tensor of a sparsifying method: each call returns the flat
    float32 result that the method's torch function gives for the same inputs converted to
    float32, byte for byte (the engine casts it and checks it for NaN / Inf as usual)."""

    name: str
    params: Any
    shape: tuple[int, ...]

    def merge(
        self, xs: Sequence[torch.Tensor], base: torch.Tensor, rng: Any, whole: bool
    ) -> torch.Tensor:
        """An RNG block (DARE) or, with ``whole``, the whole tensor (DELLA ranks by rows)."""
        shape = self.shape if whole else None
        return sparsify.merge(self.name, xs, base, self.params, rng=rng, shape=shape)

    @staticmethod
    def count_equal(x: torch.Tensor, base: torch.Tensor, t: float) -> int:
        """How many entries have ``|x - base| == t`` (float32 deltas), counted from the stored
        dtypes: what a tie quota needs of a piece (`soupkit.methods._spec.CountedStat`)."""
        return sparsify.count_equal(x, base, t)

    def cut_piece(
        self, xs: Sequence[torch.Tensor], base: torch.Tensor, cuts: Any
    ) -> torch.Tensor | None:
        """A piece given its cuts by the pre-pass statistic, or None: not a cut method."""
        if self.name not in sparsify.CUT_METHODS:
            return None
        return sparsify.cut_piece(self.name, xs, base, self.params, cuts)


def sparse_kernel(plan: MergePlan, j: int, cast: torch.dtype | None) -> SparseKernel | None:
    """The native kernel of tensor ``j`` of a sparsifying method's plan, or None: torch runs.

    None for other methods, exact mode (the caller checks), a recipe ``dtype`` that rounds the
    inputs first, float16 on several torch threads, no base, or what
    `soupkit.kernels.sparsify.supported` refuses (not built, ``SOUPKIT_KERNELS=0``, a dtype or
    parameter the kernels do not cover).
    """
    job = plan.jobs[j]
    if job.params is None or job.base is None or plan.method.name not in sparsify.METHODS:
        return None
    every = [t.torch_dtype for t in job.inputs] + [job.base.torch_dtype]
    if not _same_bytes(every, cast) or not sparsify.supported(plan.method.name, job.params, every):
        return None
    return SparseKernel(plan.method.name, job.params, tuple(job.shape))
