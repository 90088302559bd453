"""Which tensors share a method's global pre-pass, and what the plan says about it (from the
resolved parameters alone).

A method's `Prepass` with ``scope == "global"`` reads every tensor in scope, in name order: ties
at a global threshold go to the tensor whose name sorts first, so the result never depends on
the order of tensors in the files. The plan runs the declaration's check (e.g. densities that
must agree) and says how many tensors the extra reads cover.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from soupkit.methods import MethodSpec

__all__ = ["global_prepass_jobs", "prepass_notes", "prepass_problems"]


class _Job(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def params(self) -> Any: ...


J = TypeVar("J", bound=_Job)


def global_prepass_jobs(spec: MethodSpec, jobs: Sequence[J]) -> list[J]:
    """The merged tensors whose resolved parameters ask for a global pre-pass, sorted by name."""
    decl = spec.prepass
    if decl is None:
        return []
    chosen = [j for j in jobs if j.params is not None and decl.scope(j.params) == "global"]
    return sorted(chosen, key=lambda j: j.name)


def prepass_problems(spec: MethodSpec, jobs: Sequence[_Job]) -> list[str]:
    """The method's own check of the tensors in a global pre-pass (e.g. densities that differ)."""
    chosen = global_prepass_jobs(spec, jobs)
    if not chosen or spec.prepass is None or spec.prepass.check is None:
        return []
    problem = spec.prepass.check([(j.name, j.params) for j in chosen])
    return [problem] if problem else []


def prepass_notes(spec: MethodSpec, jobs: Sequence[_Job]) -> list[str]:
    """What ``soupkit plan`` should say about a global pre-pass (its extra reads)."""
    chosen = global_prepass_jobs(spec, jobs)
    if not chosen or spec.prepass is None or not spec.prepass.note:
        return []
    return [spec.prepass.note.format(n=len(chosen))]
