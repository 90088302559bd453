"""Where candidate evaluations run: in this process (default), or distributed on Ray.

Searches (`soupkit.greedy_soup`, `soupkit.sweep`) take ``backend=``:

* ``None`` / ``"local"``: the in-process path (one model in memory, nothing shipped anywhere).
* ``"ray"`` or ``RayBackend(address=..., num_cpus=..., num_gpus=...)``: every evaluation is a
  Ray task. The ingredients' scores and a sweep's grid points run in parallel; greedy soup's
  accept / reject loop stays sequential and exact, with optional speculative evaluation of the
  next steps (`soupkit.backends.speculate`). Results equal the local run's.
* ``LocalBackend()``: the same job path run here, one job at a time (the protocol's reference
  implementation and test double). Greedy soup without a backend runs on one: its loop is
  the same whatever the backend.

A backend runs `EvalJob` s: a candidate named by paths (`Ingredient`, `UniformSoup`,
`RecipeMerge`) and evaluators named by `RemoteEvaluator` (an import string, a factory or a
picklable object). Workers read the checkpoints from shared storage and build the candidate
and the evaluator themselves (`execute_job`); only paths, digests and scores travel.

Layering: ``search -> backends -> (api, engine, io, evaluate, methods)``; nothing here imports
search or the CLI, and ``ray`` is imported only when a `RayBackend` connects. Inside, modules
import downward only: ``_ray`` < ``jobs`` < ``_worker`` < ``local``, ``ray_backend``; ``jobs`` <
``run`` < ``speculate``.
"""

from __future__ import annotations

from typing import Any

from soupkit.backends._worker import execute_job
from soupkit.backends.jobs import (
    Candidate,
    EvalJob,
    EvalRequest,
    Ingredient,
    JobOutcome,
    RecipeMerge,
    RemoteEvaluator,
    UniformSoup,
)
from soupkit.backends.local import LocalBackend
from soupkit.backends.ray_backend import RayBackend
from soupkit.backends.run import Backend, RunLog, run_jobs
from soupkit.backends.speculate import Decision, GreedyLoop, greedy_loop
from soupkit.errors import UsageError

__all__ = [
    "Backend",
    "Candidate",
    "Decision",
    "EvalJob",
    "EvalRequest",
    "GreedyLoop",
    "Ingredient",
    "JobOutcome",
    "LocalBackend",
    "RayBackend",
    "RecipeMerge",
    "RemoteEvaluator",
    "RunLog",
    "UniformSoup",
    "execute_job",
    "greedy_loop",
    "remote_evaluator",
    "resolve_backend",
    "run_jobs",
]

BACKENDS = ("local", "ray")
_MEMBERS = (
    "name",
    "parallelism",
    "retries",
    "submit",
    "wait",
    "result",
    "cancel",
    "describe",
    "close",
)


def resolve_backend(backend: Backend | str | None) -> tuple[Backend | None, bool]:
    """``(backend, owned)`` for a search's ``backend=`` argument.

    ``None`` and ``"local"`` give ``(None, False)``: the search's own in-process path. ``"ray"``
    gives a new `RayBackend` with default settings (address from ``RAY_ADDRESS``, else a local
    Ray instance) that the search closes when it is done (``owned``). A backend object is used
    as given and left open.

    Raises:
        UsageError: an unknown name, or an object that is not a backend.
    """
    if backend is None or backend == "local":
        return None, False
    if backend == "ray":
        return RayBackend(), True
    if isinstance(backend, str):
        raise UsageError(
            f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}\n"
            "hint: backend='ray' or backend=RayBackend(address=..., num_cpus=1)"
        )
    # Checked on the type: isinstance() with a Protocol would evaluate `parallelism` (and connect).
    missing = [
        m
        for m in _MEMBERS
        if not hasattr(type(backend), m) and m not in getattr(backend, "__dict__", {})
    ]
    if missing:
        raise UsageError(
            f"backend {backend!r} is not a soupkit backend: it has no {', '.join(missing)}\n"
            "hint: use LocalBackend() or RayBackend(...), or implement soupkit.backends.Backend"
        )
    return backend, False


def remote_evaluator(evaluator: Any) -> RemoteEvaluator:
    """``evaluator`` as a `RemoteEvaluator`: an import string becomes a spec, an object is sent
    as a picklable object (a `RemoteEvaluator` is returned unchanged)."""
    if isinstance(evaluator, RemoteEvaluator):
        return evaluator
    if isinstance(evaluator, str):
        return RemoteEvaluator.from_spec(evaluator)
    return RemoteEvaluator.from_object(evaluator)
