"""Resolve recipe parameter values for one tensor (mergekit semantics, plus glob ``match``).

A value is resolved for a tensor in this order: the model's own ``parameters``, then the
recipe's global ``parameters``, then the method's default. At each level the value may be:

- a scalar: used as is;
- a list of numbers, a *gradient*: interpolated piecewise-linearly over the position ``t`` of
  the tensor in the network, ``t = layer / (n_layers - 1)`` for tensors of a numbered layer
  (``...layers.7...``; ``t = 1`` when the model has a single layer) and ``t = 0`` for every
  tensor outside the numbered layers (embeddings, final norm, head), as mergekit 0.1.5 does;
- a list of conditions ``{filter: SUBSTRING, value: ...}`` / ``{match: GLOB, value: ...}``: the
  first entry matching the tensor name wins (an entry with neither key, or ``filter: "*"``,
  matches everything); if none matches, resolution falls through to the next level, as in
  mergekit.

This is mergekit's ``evaluate_setting`` (mergekit/config.py) and the ``t`` its planner passes
(``plan_slice``: ``idx / (num_layers - 1)``, or 1 for one layer; ``t = 0`` for "pre" weights),
and mergekit 0.1.5's ``plan_module``, which reads the weights outside the layers ("pre" and
"post": embeddings, final norm, head) with its ``t = 0`` reader (pinned against the real
mergekit in tests/ecosystem/test_mergekit_reference.py), with these differences: the layer
position comes from the tensor name (soupkit has no per-architecture tables; the number of
layers is the largest layer index + 1); ``match`` (a glob over the whole name) is soupkit's
addition; mergekit also accepts a list of strings as a step-wise "gradient", soupkit's recipes
only numeric lists.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from soupkit.recipe.schema import Conditional, ParamValue

__all__ = ["LayerIndex", "condition_matches", "first_match", "resolve_chain", "resolve_value"]

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

Resolved = bool | int | float | str


@dataclass(frozen=True)
class LayerIndex:
    """Layer positions of a model's tensors, for gradient parameters."""

    n_layers: int

    @classmethod
    def from_names(cls, names: Iterable[str]) -> LayerIndex:
        idx = [int(m.group(1)) for n in names if (m := _LAYER.search(n))]
        return cls(max(idx) + 1 if idx else 0)

    def t(self, name: str) -> float:
        """Position of tensor ``name`` in the network, in [0, 1] (see the module docstring)."""
        m = _LAYER.search(name)
        if m:
            # mergekit's plan_slice: idx / (num_layers - 1), and t = 1 for a single layer
            return int(m.group(1)) / (self.n_layers - 1) if self.n_layers > 1 else 1.0
        return 0.0  # outside the layers: mergekit 0.1.5 resolves pre and post weights at t = 0


def condition_matches(cond: Conditional, name: str) -> bool:
    """Whether a conditional entry applies to tensor ``name``."""
    if cond.match is not None and not fnmatch.fnmatchcase(name, cond.match):
        return False
    if cond.filter is not None and cond.filter != "*" and cond.filter not in name:
        return False
    return True


def first_match(value: ParamValue, name: str) -> int | None:
    """Index of the conditional entry of ``value`` that decides tensor ``name`` (None: none)."""
    if not isinstance(value, list):
        return None
    for i, cond in enumerate(value):
        if isinstance(cond, Conditional) and condition_matches(cond, name):
            return i
    return None


def _gradient(values: list[int] | list[float], t: float) -> float:
    if len(values) == 1:
        return float(values[0])
    scaled = t * (len(values) - 1)
    i0 = min(int(scaled), len(values) - 1)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def resolve_value(value: ParamValue, name: str, t: float) -> Resolved | None:
    """Resolve one level's value for tensor ``name`` at layer position ``t`` (None: no match)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if not value:
        return None
    if all(isinstance(v, Conditional) for v in value):
        for cond in value:
            assert isinstance(cond, Conditional)
            if condition_matches(cond, name):
                return resolve_value(cond.value, name, t)
        return None
    return _gradient([v for v in value if isinstance(v, (int, float))], t)


def resolve_chain(
    key: str, levels: Iterable[Mapping[str, ParamValue]], name: str, t: float
) -> Resolved | None:
    """First non-None resolution of ``key`` across ``levels`` (most specific first)."""
    for level in levels:
        if key in level:
            got = resolve_value(level[key], name, t)
            if got is not None:
                return got
    return None
