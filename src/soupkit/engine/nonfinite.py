"""Non-finite values: the cheap check of every merged piece, and the error that explains one.

Every merged piece is checked after the cast to the output dtype with `all_finite`: one ``sum``
(NaN and Inf always propagate into a sum) and an exact ``isfinite`` only if the sum is not
finite. NaN and Inf in the float32 result survive the cast, so this one check catches them as
well as values that overflow the output dtype; the float32 result is examined only after a failed
check, to say which of the two happened. When a check fires, the inputs of that chunk are re-read
(`Loader`) to name the model that holds NaN / Inf (`nonfinite_error`).
"""

from __future__ import annotations

import torch

from soupkit.errors import NonFiniteError, shown
from soupkit.io.header import DTYPES
from soupkit.io.reader import TensorReader
from soupkit.planning.plan import MergePlan, TensorJob

__all__ = ["Loader", "all_finite", "nonfinite_error"]


def all_finite(x: torch.Tensor) -> bool:
    """True when no element of ``x`` is NaN or +-Inf (cheap: one reduction, no allocation).

    A sum propagates every NaN and Inf, so a finite sum proves all elements finite. A sum that
    is not finite may only have overflowed, so then an exact ``isfinite`` decides.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return True
    try:
        s = x.sum(dtype=torch.float32) if x.dtype != torch.float64 else x.sum()
    except (RuntimeError, TypeError):  # dtypes without a sum kernel (float8)
        return bool(torch.isfinite(x.float()).all())
    if bool(torch.isfinite(s)):
        return True
    return bool(torch.isfinite(x).all())


def _count_nonfinite(x: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a float tensor."""
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = x.float()
    return int(torch.isnan(x).sum()), int(torch.isinf(x).sum())


def nonfinite_error(
    plan: MergePlan,
    job: TensorJob,
    load: Loader,
    a: int,
    b: int,
    out: torch.Tensor,
    cast_out: torch.Tensor | None = None,
) -> NonFiniteError:
    """Explain NaN / Inf in the output chunk [a, b) of ``job``: which input holds them, or why.

    ``out`` is the float32 result; ``cast_out`` the result in the output dtype when it is the
    cast that overflowed.
    """
    nan, inf = _count_nonfinite(out if cast_out is None else cast_out)
    where = f"elements {a:,}..{b:,} of " if (a, b) != (0, job.numel) else ""
    what = (
        f"{nan:,} NaN and {inf:,} Inf"
        if nan and inf
        else (f"{nan:,} NaN" if nan else f"{inf:,} Inf")
    )
    allow = "or pass --allow-nonfinite (allow_nonfinite=True) to write them anyway"
    if cast_out is not None:
        big = float(out.abs().max())
        limit = float(torch.finfo(DTYPES[job.out_dtype][0]).max)
        return NonFiniteError(
            f"tensor {shown(job.name, quote=True)}: {what} in {where}the output after the cast to {job.out_dtype}: "
            f"the merged values are finite in float32 but reach {big:.6g}, beyond the largest "
            f"{job.out_dtype} value {limit:.6g}\n"
            f"hint: set `out_dtype: bfloat16` or `float32` in the recipe, {allow}"
        )
    labels = [m.label for m in plan.models]
    culprits: list[str] = []
    named = list(zip(labels, job.inputs)) + (
        [(f"base {plan.base.label}" if plan.base else "base", job.base)]
        if job.base is not None
        else []
    )
    for label, info in named:
        raw = load.reader.read(info, a, b)
        n_nan, n_inf = _count_nonfinite(raw)
        if n_nan or n_inf:
            culprits.append(f"{label} holds {n_nan:,} NaN and {n_inf:,} Inf there")
            continue
        if load.cast_to is not None and raw.dtype != load.cast_to:
            c_nan, c_inf = _count_nonfinite(raw.to(load.cast_to))
            if c_nan or c_inf:
                culprits.append(
                    f"{label} overflows the recipe's dtype {str(load.cast_to).removeprefix('torch.')} "
                    f"({c_inf:,} values become Inf)"
                )
    if culprits:
        return NonFiniteError(
            f"tensor {shown(job.name, quote=True)}: {what} in {where}the merged output, from the inputs:\n"
            + "\n".join(f"  - {c}" for c in culprits)
            + f"\nhint: the input checkpoint is broken (diverged training, a bad conversion); leave "
            f"that model out, {allow}"
        )
    return NonFiniteError(
        f"tensor {shown(job.name, quote=True)}: method {plan.method.name!r} produced {what} in {where}the output "
        "although every input is finite there (float32 overflow or a division by zero, e.g. "
        "weights that sum to 0 or an extreme rescale)\n"
        f"hint: check the method's parameters for this tensor, {allow}"
    )


class Loader:
    """What the diagnostics read with: the run's reader and the recipe's `dtype` (None: none)."""

    def __init__(self, reader: TensorReader, cast_to: torch.dtype | None) -> None:
        self.reader = reader
        self.cast_to = cast_to
