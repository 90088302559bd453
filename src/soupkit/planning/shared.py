"""Whether several plans can share one pass of the engine (`soupkit.engine.run_plans`): they
must read the same tensors (read from the plans alone)."""

from __future__ import annotations

from collections.abc import Sequence

from soupkit.errors import UsageError, shown
from soupkit.io.header import TensorInfo
from soupkit.planning.plan import MergePlan

__all__ = ["check_shared_inputs"]


def _same_info(a: TensorInfo | None, b: TensorInfo | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b and a.data is b.data


def check_shared_inputs(plans: Sequence[MergePlan]) -> None:
    """Refuse plans that cannot share one pass (`run_plans`): they must read the same tensors.

    Raises:
        UsageError: naming the first plan and tensor that differ.
    """
    first = plans[0]
    for k, p in enumerate(plans[1:], start=1):
        problems: list[str] = []
        if len(p.jobs) != len(first.jobs):
            problems.append(f"{len(p.jobs)} output tensors against {len(first.jobs)}")
        elif p.config.dtype != first.config.dtype:
            problems.append(f"`dtype: {p.config.dtype}` against `dtype: {first.config.dtype}`")
        elif p.config.compute != first.config.compute:
            problems.append(
                f"`compute: {p.config.compute}` against `compute: {first.config.compute}`"
            )
        else:
            for ja, jb in zip(first.jobs, p.jobs):
                same = (
                    ja.name == jb.name
                    and _same_info(ja.source, jb.source)
                    and len(ja.inputs) == len(jb.inputs)
                    and all(_same_info(x, y) for x, y in zip(ja.inputs, jb.inputs))
                    and (ja.base is None or jb.base is None or _same_info(ja.base, jb.base))
                )
                if not same:
                    problems.append(
                        f"tensor {shown(ja.name, quote=True)} is read from different inputs"
                    )
                    break
        if problems:
            raise UsageError(
                f"plan {k} cannot share a pass with plan 0: {problems[0]}\n"
                "hint: plans run together must read the same models, base and tensors"
            )
