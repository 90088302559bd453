"""The worker side of every backend: build the evaluator and the candidate, score, report.

`execute_job` is the one function a backend runs for a job, in this process (`LocalBackend`) or
in a Ray worker process (`RayBackend`). Two per-process caches keep repeated work away:

* evaluators, keyed by the `RemoteEvaluator`'s token: a model is built once per worker process,
  not once per candidate;
* the float32 running sum of the last soup prefix built (greedy soup): trying ``soup + next``
  right after ``soup + previous`` reads only the new checkpoint. The cache is cleared *before*
  the sum is changed in place and set again after, so an interrupted job (a cancelled
  speculative evaluation) never leaves a half-updated sum behind.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from soupkit._version import __version__
from soupkit.backends.jobs import (
    EvalJob,
    EvalRequest,
    Ingredient,
    JobOutcome,
    RecipeMerge,
    RemoteEvaluator,
    UniformSoup,
)
from soupkit.errors import EvaluationError, SoupError
from soupkit.evaluate.protocol import EvalResult, run_evaluator
from soupkit.io.checkpoint import Checkpoint
from soupkit.io.reader import TensorReader

__all__ = ["clear_caches", "execute_job", "get_evaluator", "worker_name"]

_EVALUATORS: dict[str, Any] = {}


@dataclass
class _RunningSum:
    """Float32 sum of a soup prefix, with greedy soup's exact operations."""

    digests: tuple[str, ...]
    acc: dict[str, torch.Tensor]
    fixed: dict[str, torch.Tensor]
    out_dtype: dict[str, torch.dtype]
    names: tuple[str, ...]


_SUM: _RunningSum | None = None


def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def clear_caches() -> None:
    """Forget built evaluators and the running sum (tests; or to free memory)."""
    global _SUM
    _EVALUATORS.clear()
    _SUM = None


@contextmanager
def _in_dir(path: str) -> Iterator[None]:
    """Run with ``path`` as the working directory when it exists here (relative data paths and
    module names of the evaluator are the driver's)."""
    old = os.getcwd()
    if path and path != old and os.path.isdir(path):
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)
    else:
        yield


def get_evaluator(ref: RemoteEvaluator) -> tuple[Any, bool]:
    """The evaluator ``ref`` names, built at most once per process; ``(evaluator, built_now)``.

    Raises:
        EvaluationError: the spec cannot be imported, the factory failed, or the stored object
            cannot be fetched; the message names the evaluator and this worker.
    """
    got = _EVALUATORS.get(ref.token)
    if got is not None:
        return got, False
    where = worker_name()
    with _in_dir(ref.cwd):
        if ref.spec is not None:
            from soupkit.evaluate.loader import load_evaluator

            ev = load_evaluator(ref.spec)
        elif ref.factory is not None:
            try:
                ev = ref.factory(*ref.args, **dict(ref.kwargs))
            except SoupError as e:
                raise EvaluationError(
                    f"cannot build evaluator {ref.name} on worker {where}: {e}"
                ) from None
            except Exception as e:
                raise EvaluationError(
                    f"cannot build evaluator {ref.name} on worker {where}: {type(e).__name__}: {e}\n"
                    "hint: the factory runs on every worker: its data files and model folder must be "
                    "readable there at the same paths (shared storage)"
                ) from e
        else:
            from soupkit.backends.ray_backend import StoredObject

            ev = ref.obj.fetch() if isinstance(ref.obj, StoredObject) else ref.obj
    if not callable(ev):
        raise EvaluationError(
            f"evaluator {ref.name} built on worker {where} is a {type(ev).__name__}, "
            "not a callable(state) -> float"
        )
    _EVALUATORS[ref.token] = ev
    return ev, True


def _read(ck: Checkpoint, reader: TensorReader) -> dict[str, torch.Tensor]:
    return {name: reader.read(info).reshape(info.shape) for name, info in ck.tensors.items()}


def _checkpoints(paths: tuple[str, ...]) -> list[Checkpoint]:
    """The checkpoints exactly as the driver's greedy soup opens them: through the planner of the
    ``linear`` recipe (headers only; compatibility checked)."""
    from soupkit.api.merging import linear_recipe, plan

    return list(plan(linear_recipe(list(paths))).models)


def _soup_state(c: UniformSoup, reader: TensorReader) -> dict[str, torch.Tensor]:
    """``(sum of paths[:-1] + paths[-1]) / n``, with the operations of `soupkit.greedy_soup`."""
    from soupkit.search._state import (
        start_sum,  # not at the top: soupkit.search imports the backends
    )

    global _SUM
    ckpts = _checkpoints(c.paths)
    s = _SUM
    _SUM = None  # cleared while the sum may change, so an interrupted job leaves no stale sum
    if s is None or c.digests[: len(s.digests)] != s.digests:
        ref = ckpts[0]
        acc, fixed, out_dtype = start_sum(ref, reader)
        s = _RunningSum(c.digests[:1], acc, fixed, out_dtype, tuple(ref.tensors))
    for k in range(len(s.digests), len(c.digests) - 1):
        for name, info in ckpts[k].tensors.items():
            if name in s.acc:
                s.acc[name] += reader.read(info).reshape(info.shape).to(torch.float32)
        s.digests = c.digests[: k + 1]
    if len(s.digests) == len(c.digests):  # the cached sum is the whole soup: nothing to add
        div = torch.ones(len(c.paths), dtype=torch.float32).sum()
        state = {
            n: s.fixed[n] if n in s.fixed else (s.acc[n] / div).to(s.out_dtype[n]) for n in s.names
        }
        _SUM = s
        return state
    div = torch.ones(len(c.paths), dtype=torch.float32).sum()  # what `linear` divides by
    cand: dict[str, torch.Tensor] = {}
    for name, info in ckpts[-1].tensors.items():
        if name in s.fixed:
            cand[name] = s.fixed[name]
            continue
        t = s.acc[name] + reader.read(info).reshape(info.shape).to(torch.float32)
        t /= div
        cand[name] = t.to(s.out_dtype[name])
    _SUM = s
    return {name: cand[name] for name in s.names}


def _recipe_state(c: RecipeMerge) -> dict[str, torch.Tensor]:
    from soupkit.api.merging import plan
    from soupkit.engine import MemorySink, run_plan

    p = plan(c.recipe)
    sink = MemorySink(p)
    run_plan(p, sink)
    return sink.tensors


def build_state(job: EvalJob) -> dict[str, torch.Tensor]:
    """The candidate's weights, read from shared storage on this worker.

    Raises:
        EvaluationError: a checkpoint cannot be read or merged here; names the candidate.
    """
    c = job.candidate
    try:
        if isinstance(c, Ingredient):
            with TensorReader() as reader:
                return _read(_checkpoints((c.path,))[0], reader)
        if isinstance(c, UniformSoup):
            with TensorReader() as reader:
                return _soup_state(c, reader)
        if isinstance(c, RecipeMerge):
            return _recipe_state(c)
    except SoupError as e:
        raise EvaluationError(
            f"cannot build candidate {job.label!r} on worker {worker_name()}: {e}\n"
            "hint: every worker reads the checkpoints itself; they must be at the same paths on "
            "every node (shared storage)"
        ) from None
    raise EvaluationError(f"unknown candidate {type(c).__name__} in job {job.label!r}")


def execute_job(job: EvalJob, stop: Callable[[], bool] | None = None) -> JobOutcome:
    """Run one job here: build the evaluators (cached), build the candidate, score it.

    Args:
        job (`EvalJob`): the candidate and its evaluation requests.
        stop (`Callable[[], bool]`, *optional*): checked after the candidate is built and
            between evaluations; True means the job was cancelled: it stops and returns an outcome
            with ``cancelled=True`` and only the results it had.

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
            f"refusing candidate {job.label!r}\nhint: install the same soupkit version on every node"
        )
    built = 0
    evaluators = []
    for req in job.requests:
        ev, new = get_evaluator(req.evaluator)
        evaluators.append(ev)
        built += int(new)
    t1 = time.perf_counter()
    state = build_state(job)
    build_seconds = time.perf_counter() - t1
    results: list[EvalResult] = []
    values: list[tuple[float, ...] | None] = []
    for ev, req in zip(evaluators, job.requests):
        if stop is not None and stop():
            return JobOutcome(
                results=tuple(results),
                seconds=time.perf_counter() - t0,
                build_seconds=build_seconds,
                worker=worker_name(),
                evaluators_built=built,
                cancelled=True,
                values=tuple(values),
            )
        if req.indices is None:
            results.append(
                run_evaluator(ev, state, label=req.label, need=req.need, strict=req.strict)
            )
            values.append(None)
        else:
            got = _per_example(ev, state, req)
            values.append(got)
            results.append(
                EvalResult(sum(got) / len(got) if got else 0.0, len(got), len(got), True)
            )
    del state
    return JobOutcome(
        results=tuple(results),
        seconds=time.perf_counter() - t0,
        build_seconds=build_seconds,
        worker=worker_name(),
        evaluators_built=built,
        values=tuple(values),
    )


def _per_example(ev: Any, state: Mapping[str, torch.Tensor], req: EvalRequest) -> tuple[float, ...]:
    """``ev.per_example`` on the request's examples (``()``: all), as plain floats."""
    from soupkit.evaluate.protocol import PerExampleEvaluator

    who = f"candidate {req.label!r} on worker {worker_name()}"
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
            f"evaluating {who} failed: per_example raised {type(e).__name__}: {e}"
        ) from e
    if not isinstance(got, torch.Tensor) or got.shape != (len(idx),):
        raise EvaluationError(
            f"evaluating {who}: per_example returned something other than one score per index"
        )
    return tuple(float(v) for v in got.detach().cpu().tolist())
