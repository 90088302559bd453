"""`LocalBackend`: run evaluation jobs in this process, one at a time.

It is the reference implementation of the `Backend` protocol: the same `Worker` a Ray actor
runs, without a scheduler. It is also greedy soup's default: the search has one loop, and
without a backend it runs it on a `LocalBackend` (candidates rebuilt from paths, evaluators
built from their `RemoteEvaluator`, one model in memory plus the running sum). Tests use it to
check the job path without Ray, and it shows what a new backend must do.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from soupkit.backends._worker import Worker
from soupkit.backends.jobs import EvalJob, JobOutcome
from soupkit.errors import EvaluationError, UsageError

__all__ = ["LocalBackend"]


class LocalBackend:
    """Runs jobs here, in submission order, when `wait` is called.

    Attributes:
        name (`str`): ``"local"``.
        parallelism (`int`): 1.
        retries (`list[dict]`): always empty (nothing is retried in-process).
    """

    name = "local"
    parallelism = 1

    def __init__(self) -> None:
        self._jobs: dict[int, EvalJob] = {}
        self._done: dict[int, JobOutcome | EvaluationError] = {}
        self._next = 0
        self._worker = Worker(remote=False)
        self.retries: list[dict[str, Any]] = []

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, job: EvalJob) -> int:
        """Queue ``job``; returns its handle."""
        self._next += 1
        self._jobs[self._next] = job
        return self._next

    def wait(self, handles: Collection[int]) -> list[int]:
        """Run the oldest queued job among ``handles`` (if none is finished yet); return the
        finished ones."""
        done = [h for h in handles if h in self._done]
        if done:
            return done
        pending = sorted(h for h in handles if h in self._jobs)
        if not pending:
            raise UsageError(
                f"LocalBackend.wait: none of the handles {sorted(handles)} is queued or finished"
            )
        h = pending[0]
        job = self._jobs.pop(h)
        try:
            self._done[h] = self._worker.execute(job)
        except EvaluationError as e:
            self._done[h] = e
        return [h]

    def result(self, handle: int) -> JobOutcome:
        """The finished job's outcome (removed from the backend).

        Raises:
            EvaluationError: the job failed.
        """
        got = self._done.pop(handle)
        if isinstance(got, EvaluationError):
            raise got
        return got

    def cancel(self, handle: int) -> None:
        """Drop a queued job (a finished one is forgotten)."""
        self._jobs.pop(handle, None)
        self._done.pop(handle, None)

    def describe(self) -> dict[str, Any]:
        """For reports."""
        return {"backend": self.name, "workers": 1}

    def close(self) -> None:
        """Forget every queued job, and what the worker keeps (evaluators, running sum)."""
        self._jobs.clear()
        self._done.clear()
        self._worker.clear()
