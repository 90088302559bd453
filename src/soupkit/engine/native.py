"""When an elementwise piece may run on a native kernel (`soupkit.kernels`) instead of torch.

A kernel gives the torch path's bytes only where both compute the same thing: the inputs
converted straight from their stored dtypes to float32 (so no recipe ``dtype`` that rounds them
first), float16 inputs converted by one torch thread (torch's float16 conversion treats a NaN
differently in the tail of each thread's range), and a method and parameters the kernels
implement (`soupkit.kernels.for_method` decides those, and whether the kernels are built and
switched on). Everything else runs torch.
"""

from __future__ import annotations

import torch

from soupkit import kernels
from soupkit.io.header import DTYPES
from soupkit.planning.plan import MergePlan

__all__ = ["piece_kernel"]


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
    every = ins + ([base] if base is not None else [])
    if cast not in (None, torch.float32) and any(d != cast for d in every):
        return None  # the torch path rounds the inputs to the recipe's dtype first
    if torch.float16 in every and torch.get_num_threads() != 1:
        return None
    return kernels.for_method(plan.method.name, job.params, ins, base, DTYPES[job.out_dtype][0])
