"""The merge-method registry: plain data, one small module per method.

``REGISTRY`` maps a recipe name to its `MethodSpec`. A method registers itself with the
`method` decorator; registration refuses duplicate or malformed names and parameter models
whose per-model names are not fields, so a broken method fails at import, not mid-merge.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.resources
import re
from collections.abc import Callable

from soupkit.errors import UnknownMethodError
from soupkit.methods._philox import CounterRNG
from soupkit.methods._spec import ExactCheckFn, Kind, MethodFn, MethodSpec, Params, Prepass
from soupkit.methods._topk import MagnitudeCut

__all__ = [
    "REGISTRY",
    "CounterRNG",
    "MagnitudeCut",
    "MethodSpec",
    "Params",
    "Prepass",
    "all_methods",
    "get",
    "method",
]

REGISTRY: dict[str, MethodSpec] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]$")


def method(
    name: str,
    *,
    kind: Kind,
    params: type[Params],
    paper: str,
    summary: str,
    needs_base: bool = False,
    optional_base: bool = False,
    base_as_input: bool = False,
    elementwise: bool = True,
    stochastic: bool = False,
    work_per_input: int = 2,
    min_models: int = 1,
    max_models: int | None = None,
    aliases: tuple[str, ...] = (),
    prepass: Prepass | None = None,
    exact: MethodFn | None = None,
    exact_check: ExactCheckFn | None = None,
    exact_out_dtype: str | None = None,
) -> Callable[[MethodFn], MethodFn]:
    """Register a pure tensor function as merge method ``name`` (see `MethodSpec`)."""

    def register(fn: MethodFn) -> MethodFn:
        for n in (name, *aliases):
            if not _NAME.match(n):
                raise ValueError(f"method name {n!r} must be lower case letters, digits and '_'")
            if n in REGISTRY:
                raise ValueError(f"there is already a merge method called {n!r}")
        missing = [k for k in params.per_model if k not in params.model_fields]
        if missing:
            raise ValueError(f"{params.__name__}: per-model parameters {missing} are not fields")
        if kind == "task_vector" and not needs_base:
            raise ValueError(f"task-vector method {name!r} must declare needs_base=True")
        if (optional_base or base_as_input) and (needs_base or kind != "tensors"):
            raise ValueError(
                f"method {name!r}: an optional or input base is for tensor methods "
                "that do not require a base"
            )
        if prepass is not None and (kind != "task_vector" or elementwise or stochastic):
            raise ValueError(
                f"method {name!r}: a pre-pass needs a deterministic task-vector method "
                "that sees whole tensors (elementwise=False)"
            )
        spec = MethodSpec(
            name=name,
            fn=fn,
            params=params,
            kind=kind,
            paper=paper,
            summary=summary,
            needs_base=needs_base,
            optional_base=optional_base,
            base_as_input=base_as_input,
            elementwise=elementwise,
            stochastic=stochastic,
            work_per_input=work_per_input,
            min_models=min_models,
            max_models=max_models,
            aliases=aliases,
            prepass=prepass,
            exact=exact,
            exact_check=exact_check,
            exact_out_dtype=exact_out_dtype,
        )
        for n in (name, *aliases):
            REGISTRY[n] = spec
        return fn

    return register


def get(name: str) -> MethodSpec:
    """Return the method registered as ``name``.

    Raises:
        UnknownMethodError: no such method; the message lists close names and all names.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownMethodError(
            f"unknown merge method {name!r}; {hint}"
            f"known methods: {', '.join(sorted(REGISTRY))} (see `soupkit methods`)"
        ) from None


def all_methods() -> list[MethodSpec]:
    """Every registered method once (aliases folded), sorted by name."""
    seen: dict[str, MethodSpec] = {}
    for spec in REGISTRY.values():
        seen.setdefault(spec.name, spec)
    return sorted(seen.values(), key=lambda s: s.name)


# Adding a method = one module here: every public module of this package is imported (in name
# order), and registers its methods with the `method` decorator.
_FILES = importlib.resources.files(__name__).iterdir()
for _m in sorted(f.name[:-3] for f in _FILES if f.name.endswith(".py") and f.name[0] != "_"):
    importlib.import_module(f"soupkit.methods.{_m}")
