"""What a backend runs: an evaluation job is *where the weights are* plus *how to score them*.

A job never carries tensors. It names the candidate by paths on shared storage (and, for a
soup, the ingredients' content digests), names the evaluator by an import string or a small
picklable recipe, and the worker builds both itself (see `soupkit.backends.execute_job`). So a
job is a few hundred bytes whatever the model size; no multi-GB object ever goes through a
scheduler's object store.

Candidates (`Ingredient`, `UniformSoup`, `RecipeMerge`): see `soupkit.backends.candidates`.

Evaluators (`RemoteEvaluator`): an import string (``"pkg.mod:fn"`` or ``"path/file.py:fn"``,
imported on the worker), a factory (a picklable callable and its arguments, called on the
worker), or a picklable evaluator object (sent once per run, not once per job). A worker builds
each evaluator once (`RemoteEvaluator.construct`) and reuses it for every candidate.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from soupkit._version import __version__
from soupkit.backends._ray import StoredObject
from soupkit.backends.candidates import Candidate, Ingredient, RecipeMerge, UniformSoup
from soupkit.errors import EvaluationError, SoupError, UsageError
from soupkit.evaluate.identity import own_cache_key, spec_identity
from soupkit.evaluate.loader import load_evaluator
from soupkit.evaluate.protocol import BoundedEvaluator, EvalResult, run_evaluator

__all__ = [
    "Candidate",
    "EvalJob",
    "EvalRequest",
    "Ingredient",
    "JobOutcome",
    "RecipeMerge",
    "RemoteEvaluator",
    "UniformSoup",
    "clear_built",
    "worker_name",
]

# Evaluators built in this process for `RemoteEvaluator.build` (used as an in-process evaluator).
_BUILT: dict[str, Any] = {}


def clear_built() -> None:
    """Forget the evaluators `RemoteEvaluator.build` built in this process."""
    _BUILT.clear()


def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


@dataclass(frozen=True)
class RemoteEvaluator:
    """An evaluator that a worker process can build by itself.

    Give exactly one of ``spec``, ``factory`` or ``obj``; the class methods are the usual way in.
    The object is itself an `Evaluator` (it builds the real one in this process on first use), so
    the same value works with every backend, including none.

    Args:
        spec (`str`, *optional*): ``"package.module:name"`` or ``"path/to/file.py:name"``
            (see `soupkit.evaluate.load_evaluator`), imported on the worker.
        factory (`Callable`, *optional*): a picklable callable (a module-level function or
            class) returning the evaluator; called on the worker with ``args`` / ``kwargs``.
        args (`tuple`): positional arguments of ``factory``.
        kwargs (`dict`): keyword arguments of ``factory``.
        obj (`Evaluator`, *optional*): a picklable evaluator; sent to the workers once per run.
        key (`str`, *optional*): the evaluator's identity in the score cache (its
            ``cache_key``). Default for ``spec``: the spec plus a hash of its module's source
            file, like the CLI; for ``obj``: the object's own ``cache_key``; none for a factory.
        cwd (`str`): the directory relative paths and module names are resolved against; the
            worker builds the evaluator there (default: the current directory, which must
            exist on the workers when relative paths are used).

    Raises:
        UsageError: not exactly one way to build it was given.
    """

    spec: str | None = None
    factory: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    obj: Any = None
    key: str | None = None
    cwd: str = field(default_factory=os.getcwd)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        given = [
            n
            for n, v in (("spec", self.spec), ("factory", self.factory), ("obj", self.obj))
            if v is not None
        ]
        if len(given) != 1:
            raise UsageError(
                f"RemoteEvaluator needs exactly one of spec, factory, obj; got "
                f"{', '.join(given) or 'none'}\nhint: RemoteEvaluator.from_spec('pkg.mod:fn'), "
                "RemoteEvaluator.from_factory(Cls, *args), or RemoteEvaluator.from_object(ev)"
            )
        if self.spec is not None and ":" not in self.spec:
            raise UsageError(
                f"evaluator spec {self.spec!r} has no ':name' part\n"
                "hint: write 'package.module:function' or 'path/to/file.py:function'"
            )

    @classmethod
    def from_spec(
        cls, spec: str, *, key: str | None = None, cwd: str | os.PathLike[str] | None = None
    ) -> RemoteEvaluator:
        """Import ``spec`` (``"pkg.mod:fn"`` / ``"file.py:fn"``) on each worker."""
        return cls(spec=spec, key=key, cwd=os.path.abspath(cwd) if cwd is not None else os.getcwd())

    @classmethod
    def from_factory(
        cls, factory: Callable[..., Any], *args: Any, key: str | None = None, **kwargs: Any
    ) -> RemoteEvaluator:
        """Call ``factory(*args, **kwargs)`` on each worker (e.g. a built-in evaluator's class)."""
        return cls(factory=factory, args=tuple(args), kwargs=dict(kwargs), key=key)

    @classmethod
    def from_object(cls, evaluator: Any, *, key: str | None = None) -> RemoteEvaluator:
        """Send a picklable ``evaluator`` to the workers (once per run)."""
        if isinstance(evaluator, RemoteEvaluator):
            return evaluator
        return cls(obj=evaluator, key=key)

    @property
    def cache_key(self) -> str | None:
        """The identity used by score caches (see `soupkit.search.evaluator_identity`)."""
        if self.key:
            return self.key
        if self.spec is not None:
            return spec_identity(self.spec, self.cwd)
        if self.obj is not None:
            return own_cache_key(self.obj)
        return None

    @property
    def name(self) -> str:
        """A short human-readable name for messages."""
        if self.spec is not None:
            return self.spec
        target = self.factory if self.factory is not None else self.obj
        mod = getattr(target, "__module__", None) or type(target).__module__
        qual = getattr(target, "__qualname__", None) or type(target).__qualname__
        return f"{mod}:{qual}"

    def __repr__(self) -> str:
        how = (
            "spec" if self.spec is not None else "factory" if self.factory is not None else "object"
        )
        return f"RemoteEvaluator({how}={self.name!r})"

    def construct(self, *, remote: bool = True) -> Any:
        """Build the evaluator here (a worker calls this once per evaluator and keeps it).

        Args:
            remote: messages name this worker process and say what workers need (False: the
                evaluator is built in the process that runs the search).

        Raises:
            EvaluationError: the spec cannot be imported, the factory failed, the stored object
                cannot be fetched, or the result is not callable; names the evaluator (and the
                worker).
        """
        on = f" on worker {worker_name()}" if remote else ""
        with _in_dir(self.cwd):
            if self.spec is not None:
                ev = load_evaluator(self.spec)
            elif self.factory is not None:
                try:
                    ev = self.factory(*self.args, **dict(self.kwargs))
                except SoupError as e:
                    raise EvaluationError(f"cannot build evaluator {self.name}{on}: {e}") from None
                except Exception as e:
                    hint = (
                        "\nhint: the factory runs on every worker: its data files and model "
                        "folder must be readable there at the same paths (shared storage)"
                        if remote
                        else ""
                    )
                    raise EvaluationError(
                        f"cannot build evaluator {self.name}{on}: {type(e).__name__}: {e}{hint}"
                    ) from e
            elif not remote and not isinstance(self.obj, StoredObject):
                return self.obj  # the caller's own object: used as given, checked as it is used
            else:
                ev = self.obj.fetch() if isinstance(self.obj, StoredObject) else self.obj
        if not callable(ev):
            raise EvaluationError(
                f"evaluator {self.name}{' built' + on if remote else ''} is a "
                f"{type(ev).__name__}, not a callable(state) -> float"
            )
        return ev

    def build(self) -> Any:
        """The evaluator, built in this process on first use and kept."""
        got = _BUILT.get(self.token)
        if got is None:
            got = _BUILT[self.token] = self.construct(remote=False)
        return got

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        """Score ``state`` with the evaluator (built in this process on first use)."""
        return run_evaluator(self.build(), state, label=None).score

    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> EvalResult:
        """Bounded evaluation when the built evaluator supports it, else a full one."""
        ev = self.build()
        if isinstance(ev, BoundedEvaluator):
            return ev.evaluate(state, need=need, strict=strict)
        raw = ev(state)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise EvaluationError(
                f"evaluator {self.name} returned {type(raw).__name__} ({raw!r}); expected a "
                "float (higher is better)\nhint: return e.g. accuracy as a Python float"
            )
        return EvalResult(score=float(raw), examples=0, total=0, complete=True)


@dataclass(frozen=True)
class EvalRequest:
    """Score the job's candidate with one evaluator.

    Attributes:
        evaluator (`RemoteEvaluator`): how the worker builds the evaluator.
        label (`str`): the candidate's name in messages (``"soup of a + b"``).
        need (`float`, *optional*): acceptance threshold, for exact early rejection.
        strict (`bool`): the acceptance test is ``>`` rather than ``>=``.
        indices (`tuple[int, ...]`, *optional*): per-example scores of these examples (a
            `PerExampleEvaluator`, for paired sequential decisions); ``()`` asks for every
            example. They come back in `JobOutcome.values`.
    """

    evaluator: RemoteEvaluator
    label: str
    need: float | None = None
    strict: bool = False
    indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EvalJob:
    """One candidate, built once by the worker, scored by one or more evaluators.

    Attributes:
        candidate: where the weights come from (`Ingredient`, `UniformSoup`, `RecipeMerge`).
        requests: the evaluations to run on it, in order.
        version: the driver's soupkit version; a worker with another version refuses the job
            (a different engine could build different bytes).
        keep: for a job scoring a batch of examples: the candidates whose weights the worker
            should keep for the next jobs (a sequential test's candidate and, while its examples
            are not all known, the incumbent); the worker drops the others it kept. Empty: it
            keeps the last two.
    """

    candidate: Candidate
    requests: tuple[EvalRequest, ...]
    version: str = __version__
    keep: tuple[Candidate, ...] = ()

    def __post_init__(self) -> None:
        if not self.requests:
            raise UsageError("an evaluation job needs at least one EvalRequest")

    @property
    def label(self) -> str:
        """The first request's candidate name."""
        return self.requests[0].label


@dataclass(frozen=True)
class JobOutcome:
    """What a worker sends back (a few numbers, never tensors).

    Attributes:
        results (`tuple[EvalResult, ...]`): one per request, in order.
        seconds (`float`): worker time for the whole job.
        build_seconds (`float`): of which building the candidate's weights.
        worker (`str`): ``host:pid`` of the process that ran it.
        evaluators_built (`int`): evaluators this job had to build (0 when the worker had them).
        attempts (`int`): tries it took (more than 1 after a retried failure).
        failures (`tuple[str, ...]`): what went wrong in the failed tries.
        cancelled (`bool`): the driver cancelled the job and it stopped early (``results`` holds
            only what was done; nobody reads it).
        values (`tuple`): per request, the per-example scores it asked for (``indices``), or
            None for a request without ``indices``.
    """

    results: tuple[EvalResult, ...]
    seconds: float
    build_seconds: float
    worker: str
    evaluators_built: int
    attempts: int = 1
    failures: tuple[str, ...] = ()
    cancelled: bool = False
    values: tuple[tuple[float, ...] | None, ...] = ()
