"""The worker side of every backend: build the evaluator and the candidate, score, report.

A `Worker` runs jobs: `LocalBackend` has one in this process, `RayBackend` one per Ray actor
process, and `execute_job` runs a job on this process's default worker (for backends of your
own). A worker keeps what repeated jobs would redo:

* the evaluators it built, keyed by the `RemoteEvaluator`'s token: a model is built once per
  worker, not once per candidate;
* the float32 running sum of the last soup prefix it built (greedy soup; a
  `soupkit.methods.linear.RunningSum`): trying ``soup + next`` right after ``soup + previous``
  reads only the new checkpoint. The sum is dropped *before* it is changed in place and kept
  again after, so an interrupted job (a cancelled speculative evaluation) never leaves a
  half-updated sum behind. Its adds and means run on the native kernels
  (`soupkit.kernels.RunningSumOps`, same bytes, on torch's thread count) where they apply;
* for jobs that score batches of examples (paired sequential decisions), the weights of the
  candidates the job says to keep (`EvalJob.keep`: the candidate and, while its examples are
  not all known, the incumbent, which alternate batch by batch); without that, the last two;
* in the process that runs the search (``remote=False``), each checkpoint's headers, opened
  once per content digest (a remote worker plans the checkpoints of every job again, checking
  that its files agree with each other).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

from soupkit import kernels
from soupkit._version import __version__
from soupkit.api.merging import linear_recipe, plan
from soupkit.backends.jobs import (
    Candidate,
    EvalJob,
    EvalRequest,
    Ingredient,
    JobOutcome,
    RecipeMerge,
    RemoteEvaluator,
    UniformSoup,
    clear_built,
    worker_name,
)
from soupkit.engine.execute import MemorySink, run_plan
from soupkit.errors import EvaluationError, SoupError
from soupkit.evaluate.protocol import EvalResult, PerExampleEvaluator, run_evaluator
from soupkit.io.checkpoint import Checkpoint, open_checkpoint
from soupkit.io.reader import TensorReader
from soupkit.methods.linear import RunningSum

__all__ = ["Worker", "clear_caches", "execute_job", "worker_name"]

State = dict[str, torch.Tensor]


def _read(ck: Checkpoint, reader: TensorReader) -> State:
    return {name: reader.read(info).reshape(info.shape) for name, info in ck.tensors.items()}


def _checkpoints(paths: tuple[str, ...]) -> list[Checkpoint]:
    """The checkpoints exactly as the driver's greedy soup opens them: through the planner of the
    ``linear`` recipe (headers only; compatibility checked, as this worker may see other files
    than the driver)."""
    return list(plan(linear_recipe(list(paths))).models)


def _recipe_state(c: RecipeMerge) -> State:
    p = plan(c.recipe)
    sink = MemorySink(p)
    run_plan(p, sink)
    return sink.tensors


class _PrefixSum:
    """A `RunningSum` of a soup prefix and the digests of the ingredients in it."""

    def __init__(self, digest: str, total: RunningSum) -> None:
        self.digests: tuple[str, ...] = (digest,)
        self.total = total


class Worker:
    """Runs jobs (see the module docstring); not thread-safe: one job at a time.

    Args:
        remote: messages name this worker process and say what workers need (shared storage);
            False for the worker of the process that runs the search (`LocalBackend`).
    """

    def __init__(self, *, remote: bool = True) -> None:
        self.remote = remote
        self._evaluators: dict[str, Any] = {}
        self._sum: _PrefixSum | None = None
        self._states: OrderedDict[Hashable, State] = OrderedDict()
        self._opened: dict[tuple[str, str], Checkpoint] = {}

    def _open(self, paths: tuple[str, ...], digests: tuple[str | None, ...]) -> list[Checkpoint]:
        """The checkpoints at ``paths``. In the process that planned them (not ``remote``), the
        driver already checked them together: each is opened once per content digest and kept
        (headers only); a remote worker checks them again (`_checkpoints`)."""
        if self.remote:
            return _checkpoints(paths)
        out = []
        for path, digest in zip(paths, digests):
            ck = self._opened.get((path, digest)) if digest is not None else None
            if ck is None:
                ck = open_checkpoint(path)
                if digest is not None:
                    self._opened[(path, digest)] = ck
            out.append(ck)
        return out

    def clear(self) -> None:
        """Forget built evaluators, the running sum and kept weights (to free memory)."""
        self._evaluators.clear()
        self._sum = None
        self._states.clear()
        self._opened.clear()

    def evaluator(self, ref: RemoteEvaluator) -> tuple[Any, bool]:
        """The evaluator ``ref`` names, built at most once by this worker: ``(evaluator,
        built_now)``. Raises `EvaluationError` as `RemoteEvaluator.construct`."""
        got = self._evaluators.get(ref.token)
        if got is not None:
            return got, False
        ev = self._evaluators[ref.token] = ref.construct(remote=self.remote)
        return ev, True

    def _soup_state(self, c: UniformSoup, reader: TensorReader) -> State:
        """``(sum of paths[:-1] + paths[-1]) / n`` (the whole prefix when the kept sum already
        holds every path), with `RunningSum`'s operations."""
        ckpts = self._open(c.paths, c.digests)
        s = self._sum
        self._sum = None  # dropped while the sum may change: an interrupted job leaves none
        if s is None or c.digests[: len(s.digests)] != s.digests:
            ops = kernels.running_sum_ops()  # None: torch (kernels not built or switched off)
            s = _PrefixSum(c.digests[0], RunningSum(_read(ckpts[0], reader), ops=ops))
        for k in range(len(s.digests), len(c.digests) - 1):
            for name, info in ckpts[k].tensors.items():
                if s.total.summed(name):
                    s.total.add(name, reader.read(info).reshape(info.shape))
            s.total.added()
            s.digests = c.digests[: k + 1]
        names = s.total.names
        if len(s.digests) == len(c.digests):  # the kept sum is the whole soup: nothing to add
            state = {n: s.total.mean(n) for n in names}
        else:
            last = ckpts[-1].tensors
            state = {
                n: s.total.mean(n, reader.read(last[n]).reshape(last[n].shape))
                if s.total.summed(n)
                else s.total.mean(n)
                for n in names
            }
        self._sum = s
        return state

    def _build(self, job: EvalJob) -> State:
        c = job.candidate
        if isinstance(c, Ingredient):
            with TensorReader() as reader:
                return _read(self._open((c.path,), (c.digest,))[0], reader)
        if isinstance(c, UniformSoup):
            with TensorReader() as reader:
                return self._soup_state(c, reader)
        if isinstance(c, RecipeMerge):
            return _recipe_state(c)
        raise EvaluationError(f"unknown candidate {type(c).__name__} in job {job.label!r}")

    def build_state(self, job: EvalJob) -> State:
        """The candidate's weights, read from shared storage on this worker.

        Raises:
            EvaluationError: a checkpoint cannot be read or merged here; names the candidate.
        """
        key = _state_key(job.candidate) if all(r.indices for r in job.requests) else None
        if key is None:
            self._states.clear()
        else:
            if job.keep:  # what the driver will ask again; the rest is dropped
                wanted = {_state_key(c) for c in job.keep} | {key}
                for k in [k for k in self._states if k not in wanted]:
                    del self._states[k]
            if key in self._states:
                self._states.move_to_end(key)
                return self._states[key]
            while len(self._states) >= 2:  # room for this one: at most two are kept
                self._states.popitem(last=False)
        try:
            state = self._build(job)
        except SoupError as e:
            if not self.remote:
                raise  # in this process: the reader's own error, naming the file
            raise EvaluationError(
                f"cannot build candidate {job.label!r} on worker {worker_name()}: {e}\n"
                "hint: every worker reads the checkpoints itself; they must be at the same paths "
                "on every node (shared storage)"
            ) from None
        if key is not None:
            self._states[key] = state
        return state

    def execute(self, job: EvalJob, stop: Callable[[], bool] | None = None) -> JobOutcome:
        """Run one job here: build the evaluators (kept), build the candidate, score it.

        Args:
            job (`EvalJob`): the candidate and its evaluation requests.
            stop (`Callable[[], bool]`, *optional*): checked after the candidate is built and
                between evaluations; True means the job was cancelled: it stops and returns an
                outcome with ``cancelled=True`` and only the results it had.

        Returns:
            `JobOutcome`: one `EvalResult` per request, with timings and this worker's name.

        Raises:
            EvaluationError: anything that failed, naming the candidate (evaluator errors are
                wrapped by `soupkit.evaluate.run_evaluator`).
        """
        t0 = time.perf_counter()
        if job.version != __version__:
            raise EvaluationError(
                f"worker {worker_name()} has soupkit {__version__}, the driver has {job.version}; "
                f"refusing candidate {job.label!r}\nhint: install the same soupkit version on "
                "every node"
            )
        built = 0
        evaluators = []
        for req in job.requests:
            ev, new = self.evaluator(req.evaluator)
            evaluators.append(ev)
            built += int(new)
        t1 = time.perf_counter()
        state = self.build_state(job)
        build_seconds = time.perf_counter() - t1
        results: list[EvalResult] = []
        values: list[tuple[float, ...] | None] = []

        def outcome(cancelled: bool = False) -> JobOutcome:
            return JobOutcome(
                results=tuple(results),
                seconds=time.perf_counter() - t0,
                build_seconds=build_seconds,
                worker=worker_name(),
                evaluators_built=built,
                cancelled=cancelled,
                values=tuple(values),
            )

        for ev, req in zip(evaluators, job.requests):
            if stop is not None and stop():
                return outcome(cancelled=True)
            if req.indices is None:
                results.append(
                    run_evaluator(ev, state, label=req.label, need=req.need, strict=req.strict)
                )
                values.append(None)
            else:
                got = _per_example(ev, state, req, self.remote)
                values.append(got)
                results.append(
                    EvalResult(sum(got) / len(got) if got else 0.0, len(got), len(got), True)
                )
        del state
        return outcome()


def _state_key(c: Candidate) -> Hashable | None:
    """What names a candidate's weights for keeping them: its content digests (None: unnamed)."""
    if isinstance(c, UniformSoup):
        return ("soup", c.digests)
    if isinstance(c, Ingredient) and c.digest is not None:
        return ("ingredient", c.digest)
    return None


# The default worker of this process, for `execute_job` (custom backends).
_DEFAULT = Worker()


def execute_job(job: EvalJob, stop: Callable[[], bool] | None = None) -> JobOutcome:
    """Run one job on this process's default `Worker` (see `Worker.execute`)."""
    return _DEFAULT.execute(job, stop)


def clear_caches() -> None:
    """Forget what the default worker and `RemoteEvaluator.build` keep (tests; to free memory)."""
    _DEFAULT.clear()
    clear_built()


def _per_example(
    ev: Any, state: Mapping[str, torch.Tensor], req: EvalRequest, remote: bool
) -> tuple[float, ...]:
    """``ev.per_example`` on the request's examples (``()``: all), as plain floats; the messages
    of the in-process sequential test (`soupkit.search._paired`), naming the worker if remote."""
    who = f"candidate {req.label!r}" + (f" on worker {worker_name()}" if remote else "")
    if not isinstance(ev, PerExampleEvaluator):
        raise EvaluationError(
            f"evaluating {who}: evaluator {req.evaluator.name} has no per_example(state, "
            "indices) / n_examples(), which sequential decisions need\nhint: use the built-in "
            "classification evaluator, or drop --sequential"
        )
    try:
        idx = list(req.indices) if req.indices else list(range(int(ev.n_examples())))
        got = ev.per_example(state, idx)
    except EvaluationError as e:
        raise EvaluationError(f"evaluating {who} failed: {e}") from e
    except Exception as e:
        raise EvaluationError(
            f"evaluating {who} failed: per_example raised {type(e).__name__}: {e}\n"
            "hint: per_example(state, indices) must return one score per index"
        ) from e
    if not isinstance(got, torch.Tensor) or got.shape != (len(idx),):
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise EvaluationError(
            f"evaluating {who}: per_example returned {shape} for {len(idx)} examples; "
            "expected a 1-D tensor with one score per index"
        )
    return tuple(float(v) for v in got.detach().cpu().tolist())
