"""Running batches of independent jobs on a backend, and the record a search keeps of it.

`run_jobs` submits every job at once (the backend runs as many together as it can) and hands
each outcome to a callback as soon as it arrives, so a search stores every finished score in
its cache even when another candidate fails: a failed run loses nothing it had computed.

`RunLog` adds up what the backend did for one search: jobs, worker processes, evaluator builds,
retries, speculative evaluations used and wasted, worker time against wall time. Its
``to_dict()`` is the ``"distributed"`` section of the search's report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from soupkit.backends.jobs import EvalJob, JobOutcome
from soupkit.errors import EvaluationError

__all__ = ["Backend", "RunLog", "run_jobs"]


@runtime_checkable
class Backend(Protocol):
    """Where evaluation jobs run. `LocalBackend` and `RayBackend` implement it.

    A backend accepts `EvalJob` s and returns `JobOutcome` s; it never sees tensors. Handles are
    opaque integers. A backend may run jobs in any order and several at once; it must run each
    job's evaluations exactly as `soupkit.backends.execute_job` does, so that results do not
    depend on the backend.

    Attributes:
        name (`str`): ``"local"``, ``"ray"``, ...
        parallelism (`int`): how many jobs can run at once (sizes speculation).
        retries (`list[dict]`): failed attempts that were resubmitted.
    """

    name: str
    retries: list[dict[str, Any]]

    @property
    def parallelism(self) -> int: ...

    def submit(self, job: EvalJob) -> int:
        """Queue or start ``job``; return its handle."""
        ...

    def wait(self, handles: Sequence[int]) -> list[int]:
        """Block until at least one of ``handles`` has finished; return the finished ones."""
        ...

    def result(self, handle: int) -> JobOutcome:
        """Take a finished job's outcome; raise `EvaluationError` if it failed."""
        ...

    def cancel(self, handle: int) -> None:
        """Stop and forget a job (queued, running or finished)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Settings and resources, for reports."""
        ...

    def close(self) -> None:
        """Release what the backend holds."""
        ...


@dataclass
class RunLog:
    """What a backend did for one search (see the module docstring).

    Attributes:
        jobs: jobs submitted (every attempt's job counts once).
        used: jobs whose results the search used.
        speculative_launched: greedy soup's speculative jobs started before their turn.
        speculative_used: those whose turn came (results used).
        wasted: speculative jobs that finished but the decisions made stale.
        cancelled: speculative jobs stopped because the decisions made them stale.
        busy_seconds: worker time of the jobs whose results were used.
        wall_seconds: wall time of the phases that waited on the backend.
    """

    jobs: int = 0
    used: int = 0
    speculative_launched: int = 0
    speculative_used: int = 0
    wasted: int = 0
    cancelled: int = 0
    failed_speculative: int = 0
    busy_seconds: float = 0.0
    wasted_seconds: float = 0.0
    wall_seconds: float = 0.0
    evaluator_builds: int = 0
    workers: set[str] = field(default_factory=set)
    speculate: int | None = None
    _retries_from: int = 0

    def start(self, backend: Backend) -> None:
        """Remember where the backend's retry record stands (this run's retries follow)."""
        self._retries_from = len(backend.retries)

    def new_retries(self, backend: Backend) -> list[dict[str, Any]]:
        """The backend's retries since `start`."""
        return list(backend.retries[self._retries_from :])

    def notes(self, backend: Backend) -> list[str]:
        """One line per retried attempt, for a search result's notes."""
        return [
            f"retried {r['candidate']!r} after attempt {r['attempt']} failed ({r['error']})"
            for r in self.new_retries(backend)
        ]

    def finished(self, outcome: JobOutcome, *, used: bool) -> None:
        """Count one finished job."""
        self.workers.add(outcome.worker)
        self.evaluator_builds += outcome.evaluators_built
        if used:
            self.used += 1
            self.busy_seconds += outcome.seconds
        else:
            self.wasted += 1
            self.wasted_seconds += outcome.seconds

    def to_dict(self, backend: Backend) -> dict[str, Any]:
        """The ``"distributed"`` report section."""
        out: dict[str, Any] = {
            **backend.describe(),
            "jobs": self.jobs,
            "used": self.used,
            "worker_processes": len(self.workers),
            "evaluator_builds": self.evaluator_builds,
            "retries": self.new_retries(backend),
            "busy_seconds": round(self.busy_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "speedup": round(self.busy_seconds / self.wall_seconds, 3)
            if self.wall_seconds > 0
            else None,
        }
        if self.speculate is not None:
            out["speculation"] = {
                "depth": self.speculate,
                "launched": self.speculative_launched,
                "used": self.speculative_used,
                "wasted": self.wasted,
                "cancelled": self.cancelled,
                "failed": self.failed_speculative,
                "wasted_seconds": round(self.wasted_seconds, 3),
            }
        return out


def run_jobs(
    backend: Backend,
    jobs: Sequence[EvalJob],
    on_done: Callable[[int, JobOutcome], None] | None = None,
    *,
    log: RunLog | None = None,
    keep_going: bool = True,
) -> list[JobOutcome]:
    """Run independent ``jobs`` on ``backend``; outcomes in the order of ``jobs``.

    Args:
        backend: where to run them.
        jobs: the jobs.
        on_done: called with ``(index, outcome)`` as each job finishes (in finishing order),
            e.g. to store the score in a cache right away.
        log: counts the jobs.
        keep_going: after a failed job, run the others to the end (False: stop at the first
            failure, as a search in this process does; the jobs not yet run are cancelled).

    Raises:
        EvaluationError: a job failed (after the backend's retries). With ``keep_going``, the
            other jobs are still run to the end and passed to ``on_done`` first, so nothing
            computed is lost.
    """
    t0 = time.perf_counter()
    handles: dict[int, int] = {}
    out: list[JobOutcome | None] = [None] * len(jobs)
    errors: list[EvaluationError] = []
    try:
        for k, job in enumerate(jobs):
            handles[backend.submit(job)] = k
        if log is not None:
            log.jobs += len(jobs)
        while handles:
            for h in backend.wait(list(handles)):
                k = handles.pop(h)
                try:
                    got = backend.result(h)
                except EvaluationError as e:
                    if not keep_going:
                        raise
                    errors.append(e)
                    continue
                out[k] = got
                if log is not None:
                    log.finished(got, used=True)
                if on_done is not None:
                    on_done(k, got)
    finally:
        for h in handles:  # only after an interruption (Ctrl-C) or a failing callback
            backend.cancel(h)
        if log is not None:
            log.wall_seconds += time.perf_counter() - t0
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise EvaluationError(
            f"{errors[0]}\n({len(errors) - 1} more candidate(s) failed as well; "
            "every other score was kept)"
        ) from errors[0]
    return [o for o in out if o is not None]
