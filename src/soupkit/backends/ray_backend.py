"""`RayBackend`: evaluation jobs on a pool of Ray actors, on a local Ray instance or a cluster.

Ray is an optional extra (``pip install 'soupkit[ray]'``): this module imports it only when a
`RayBackend` connects, so ``import soupkit`` never does.

What runs where:

* The driver (where ``soupkit`` is called) plans from headers, hashes inputs, keeps the score
  cache, makes every accept / reject decision and writes the output.
* Each worker slot is a Ray actor (`EvaluationWorker`) holding the resources asked for
  (``num_cpus``, ``num_gpus``, ``memory``, custom ``resources``) for the backend's lifetime, and
  running one job at a time on its own `soupkit.backends._worker.Worker` (what
  `soupkit.backends.execute_job` runs). A job carries paths,
  digests and the evaluator's `RemoteEvaluator` (a few hundred bytes); the actor reads the
  checkpoints from shared storage and builds the candidate itself. Actors are started as jobs
  need them, up to `RayBackend.parallelism` (what the cluster's resources fit, or
  ``max_workers``).
* An actor builds each evaluator once and keeps it (and greedy soup's running sum) for every
  later job. Actors rather than tasks, because a task's worker process may be reused with
  *another* GPU than the one its cached model was loaded on (why Ray gives GPU tasks one call
  per process by default); an actor keeps its GPU.
* An evaluator given as a picklable object is put in the object store once per run; actors
  fetch it once.

Failures: a job whose actor process dies (a crash, ``os._exit``, the OOM killer, a lost node)
is submitted again, up to ``max_retries`` times, while Ray restarts the actor; with
``retry_exceptions=True`` so is a job whose evaluator raised. soupkit resubmits itself rather
than through Ray's ``max_task_retries`` so that every failed attempt is recorded
(`RayBackend.retries`, the run's report). A job that still fails raises `EvaluationError`
naming the candidate.

Cancelling (greedy soup's stale speculative jobs): a queued job is dropped; a running one is
flagged, and the actor stops at the next check (after building the candidate, between
evaluators); an evaluator already running finishes first, and its actor is busy until then.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from soupkit.backends._ray import StoredObject, import_ray
from soupkit.backends._worker import Worker
from soupkit.backends.jobs import EvalJob, JobOutcome, worker_name
from soupkit.errors import EvaluationError, UsageError
from soupkit.io.writer import parse_size

__all__ = ["EvaluationWorker", "RayBackend", "StoredObject", "import_ray"]


class EvaluationWorker:
    """The Ray actor behind one worker slot: runs jobs one at a time in its own process, which
    keeps the evaluators it built (and greedy soup's running sum) for the next jobs."""

    def __init__(self) -> None:
        self._worker = Worker()

    def ready(self) -> str:
        """``host:pid``, once the actor is up (jobs go only to actors that answered)."""
        return worker_name()

    def run(self, job: EvalJob) -> JobOutcome:
        """Run ``job`` (see `execute_job`); stops early if the driver cancelled it."""
        ctx = import_ray().get_runtime_context()
        is_canceled = getattr(ctx, "is_canceled", None)  # Ray >= 2.8
        return self._worker.execute(job, stop=is_canceled)


@dataclass
class _Task:
    job: EvalJob
    ref: Any = None
    attempts: int = 0
    failures: list[str] = field(default_factory=list)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the SIGINT / SIGTERM handlers found on entry across ``ray.init``, which installs its
    own SIGTERM handler (``sys.exit(15)``) on the main thread as it starts: that replaced the
    CLI's (exit 143 after cleaning up) and, inside `soupkit._util.interrupts.deferred`, the one
    that holds a signal until a point where every lock is free.

    The handlers are put back when ``ray.init`` returns. A SIGTERM while it runs reaches Ray's
    handler, whose `SystemExit` is turned back into the signal, delivered through the handler
    found (the CLI's raises at once, a held one records it); then `UsageError`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def put_back() -> None:
        for s, handler in before.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(s, handler)

    try:
        yield
    except SystemExit as e:
        if e.code != signal.SIGTERM:
            raise
        put_back()
        signal.raise_signal(signal.SIGTERM)
        raise UsageError(
            "Ray was being started when soupkit received SIGTERM; nothing was evaluated"
        ) from None
    finally:
        put_back()


class RayBackend:
    """Runs evaluation jobs on a pool of Ray actors (see the module docstring).

    Args:
        address (`str`, *optional*): the cluster to join (``"auto"``, ``"HOST:6379"``,
            ``"ray://HOST:10001"``). Default: the ``RAY_ADDRESS`` environment variable, else a
            new local Ray instance. Ignored when Ray is already initialised in this process.
        num_cpus (`float`): CPUs per evaluation (default 1).
        num_gpus (`float`): GPUs per evaluation (default 0; fractions share a GPU).
        memory (`int | str`, *optional*): memory per evaluation for Ray's scheduler
            (``"40GB"`` or bytes); Ray does not start more evaluations on a node than fit.
        resources (`Mapping[str, float]`, *optional*): custom Ray resources per evaluation.
        max_workers (`int`, *optional*): at most this many actors, i.e. evaluations at once
            (default: as many as the cluster's resources fit).
        max_retries (`int`): resubmissions of a job whose actor died (default 3).
        retry_exceptions (`bool`): also resubmit a job whose evaluator raised (for transient
            errors such as CUDA out-of-memory); default False: raise at once.
        runtime_env (`Mapping`, *optional*): Ray runtime environment of the job (e.g.
            ``{"py_modules": [...], "env_vars": {...}}``), when this backend starts or joins Ray.
        check_resources (`bool`): refuse to start when no node can run one evaluation with
            the resources asked for (else Ray would wait forever); turn off for autoscaling
            clusters that add such nodes on demand.
        init_kwargs (`Mapping`, *optional*): more arguments for ``ray.init``.

    Attributes:
        retries (`list[dict]`): every failed attempt that was resubmitted: candidate, attempt,
            error.

    Raises:
        UsageError: ray is not installed, the cluster cannot be reached, or the resources asked
            for are invalid or fit no node.
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        memory: int | str | None = None,
        resources: Mapping[str, float] | None = None,
        max_workers: int | None = None,
        max_retries: int = 3,
        retry_exceptions: bool = False,
        runtime_env: Mapping[str, Any] | None = None,
        check_resources: bool = True,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        problems = []
        if not (isinstance(num_cpus, (int, float)) and num_cpus >= 0 and math.isfinite(num_cpus)):
            problems.append(f"num_cpus must be a number >= 0, got {num_cpus!r}")
        if not (isinstance(num_gpus, (int, float)) and num_gpus >= 0 and math.isfinite(num_gpus)):
            problems.append(f"num_gpus must be a number >= 0, got {num_gpus!r}")
        if max_workers is not None and (not isinstance(max_workers, int) or max_workers < 1):
            problems.append(f"max_workers must be a positive integer, got {max_workers!r}")
        if not isinstance(max_retries, int) or max_retries < 0:
            problems.append(f"max_retries must be an integer >= 0, got {max_retries!r}")
        mem: int | None = None
        if memory is not None:
            try:
                mem = parse_size(memory)
            except ValueError as e:
                problems.append(f"memory: {e}")
        for k, v in (resources or {}).items():
            if not (isinstance(v, (int, float)) and v >= 0):
                problems.append(f"resource {k!r} must be a number >= 0, got {v!r}")
        if problems:
            raise UsageError(
                "invalid Ray backend settings:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        import_ray()  # fail now, not after hashing the inputs, when ray is missing
        self.address = address
        self.num_cpus = float(num_cpus)
        self.num_gpus = float(num_gpus)
        self.memory = mem
        self.resources = dict(resources or {})
        self.max_workers = max_workers
        self.max_retries = max_retries
        self.retry_exceptions = retry_exceptions
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.check_resources = check_resources
        self.init_kwargs = dict(init_kwargs or {})
        self.retries: list[dict[str, Any]] = []
        self._ray: Any = None
        self._connected = False
        self._owns = False
        self._slots = 0
        self._stored: dict[str, Any] = {}
        self._actors: list[Any] = []
        self._idle: deque[int] = deque()
        self._tasks: dict[int, _Task] = {}
        self._pending: deque[int] = deque()
        self._running: dict[
            Any, tuple[int | None, int]
        ] = {}  # ref -> (handle or None if cancelled, actor)
        self._starting: dict[Any, int] = {}  # ready() ref -> actor not yet up
        self._start_failures: list[str] = []
        self._done: dict[int, JobOutcome | EvaluationError] = {}
        self._next = 0

    def __enter__(self) -> RayBackend:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RayBackend(address={self.address!r}, num_cpus={self.num_cpus:g}, num_gpus={self.num_gpus:g}, "
            f"memory={self.memory!r}, max_workers={self.max_workers!r})"
        )

    # -- connection -------------------------------------------------------------------------

    def _per_job(self) -> dict[str, float]:
        need = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        if self.memory is not None:
            need["memory"] = float(self.memory)
        return {k: v for k, v in need.items() if v > 0}

    def connect(self) -> None:
        """Join (or start) Ray and check that one evaluation fits somewhere. Idempotent."""
        if self._connected:
            return
        ray = import_ray()
        if not ray.is_initialized():
            kw = dict(self.init_kwargs)
            if self.runtime_env is not None:
                kw["runtime_env"] = self.runtime_env
            try:
                with _signal_handlers_kept():
                    ray.init(address=self.address, **kw)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
                where = self.address or "RAY_ADDRESS / a new local instance"
                raise UsageError(
                    f"cannot start or join Ray at {where}: {_first_line(e)}\nhint: start a cluster with "
                    "`ray start --head` and give its address (--ray-address / RAY_ADDRESS), or give no "
                    "address to start a local Ray instance"
                ) from None
            self._owns = True
        self._ray = ray
        self._connected = True
        per_job = self._per_job()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)]
        slots = 0
        for res in nodes:
            fit = min((int(res.get(k, 0.0) / v + 1e-9) for k, v in per_job.items()), default=1)
            slots += max(fit, 0)
        if slots == 0 and self.check_resources:
            have = "; ".join(
                ", ".join(f"{k} {res.get(k, 0.0):g}" for k in per_job) for res in nodes
            )
            self.close()
            raise UsageError(
                f"no Ray node can run one evaluation: each needs {', '.join(f'{k} {v:g}' for k, v in per_job.items())}; "
                f"the {len(nodes)} node(s) have {have or 'nothing'}\nhint: lower --ray-num-cpus / "
                "--ray-num-gpus / --ray-memory, add nodes, or pass check_resources=False for an "
                "autoscaling cluster"
            )
        self._slots = max(slots, 1)

    @property
    def parallelism(self) -> int:
        """How many evaluations can run at once."""
        self.connect()
        return min(self._slots, self.max_workers) if self.max_workers else self._slots

    def describe(self) -> dict[str, Any]:
        """The backend's settings and the cluster, for reports."""
        self.connect()
        try:
            address = self._ray.get_runtime_context().gcs_address
        except Exception:  # older Ray: not essential for a report
            address = self.address
        return {
            "backend": self.name,
            "address": address,
            "nodes": len([n for n in self._ray.nodes() if n.get("Alive", True)]),
            "workers": self.parallelism,
            "actors_started": len(self._actors),
            "actors_up": len(self._actors) - len(self._starting),
            "per_evaluation": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                "memory": self.memory,
                "resources": dict(self.resources),
            },
            "max_retries": self.max_retries,
            "retry_exceptions": self.retry_exceptions,
        }

    # -- jobs -------------------------------------------------------------------------------

    def _ship(self, job: EvalJob) -> EvalJob:
        """Replace evaluator objects by references to one stored copy each."""
        reqs = []
        for req in job.requests:
            ev = req.evaluator
            if ev.obj is not None and not isinstance(ev.obj, StoredObject):
                stored = self._stored.get(ev.token)
                if stored is None:
                    try:
                        stored = StoredObject(self._ray.put(ev.obj))
                    except Exception as e:
                        raise UsageError(
                            f"evaluator {ev.name} cannot be sent to Ray workers: pickling it failed "
                            f"({_first_line(e)})\nhint: name it by import string so each worker imports "
                            "it (--evaluator pkg.mod:fn, RemoteEvaluator.from_spec), or build it on the "
                            "workers with RemoteEvaluator.from_factory(Cls, *args)"
                        ) from None
                    self._stored[ev.token] = stored
                req = replace(req, evaluator=replace(ev, obj=stored))
            reqs.append(req)
        return replace(job, requests=tuple(reqs))

    def _spawn(self, actor: int | None = None) -> None:
        """Start an actor (in slot ``actor``, else a new slot); it takes jobs once it answers."""
        # No restarts by Ray: a dead actor is replaced by a fresh one (see `_collect`), so a
        # retried job never meets an actor in the middle of restarting.
        opts: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "max_restarts": 0,
            "max_task_retries": 0,
            "max_concurrency": 1,
        }
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
        if self.memory is not None:
            opts["memory"] = self.memory
        if self.resources:
            opts["resources"] = dict(self.resources)
        handle = self._ray.remote(EvaluationWorker).options(**opts).remote()
        if actor is None:
            self._actors.append(handle)
            actor = len(self._actors) - 1
        else:
            self._actors[actor] = handle
        self._starting[handle.ready.remote()] = actor

    def _replace_actor(self, actor: int) -> None:
        """The actor's process died: start a fresh one in its slot."""
        try:
            self._ray.kill(self._actors[actor], no_restart=True)
        except Exception:  # already gone
            pass
        self._spawn(actor)

    def _launch(self, h: int, actor: int) -> None:
        t = self._tasks[h]
        t.attempts += 1
        t.ref = self._actors[actor].run.remote(t.job)
        self._running[t.ref] = (h, actor)

    def _fill(self) -> None:
        """Start queued jobs on idle actors; start more actors (up to `parallelism`) for the rest.

        Jobs only go to actors that are up, so an actor that cannot start yet (its resources are
        taken by other work on the cluster) holds no job back.
        """
        while self._pending and self._idle:
            h = self._pending.popleft()
            if h in self._tasks:  # else cancelled while queued
                self._launch(h, self._idle.popleft())
        waiting = sum(1 for h in self._pending if h in self._tasks)
        while waiting > len(self._starting) and len(self._actors) < self.parallelism:
            self._spawn()

    def _started(self, ref: Any, actor: int) -> None:
        try:
            self._ray.get(ref)
        except self._ray.exceptions.RayError as e:
            self._start_failures.append(_first_line(e))
            if len(self._start_failures) >= 3:
                raise UsageError(
                    f"cannot start Ray workers: {len(self._start_failures)} failed to start "
                    f"({'; '.join(self._start_failures[-3:])})\nhint: soupkit (same version) must be "
                    "installed on every node; check the worker logs (python-core-worker-*.log)"
                ) from None
            self._spawn(actor)
            return
        self._idle.append(actor)

    def submit(self, job: EvalJob) -> int:
        """Queue ``job``; returns its handle (it starts when an actor is free)."""
        self.connect()
        shipped = self._ship(job)
        self._next += 1
        self._tasks[self._next] = _Task(shipped)
        self._pending.append(self._next)
        self._fill()
        return self._next

    def _retry(self, h: int, t: _Task, e: BaseException, why: str) -> bool:
        if t.attempts > self.max_retries:
            return False
        msg = f"{why}: {_first_line(e)}"
        t.failures.append(msg)
        self.retries.append({"candidate": t.job.label, "attempt": t.attempts, "error": msg})
        t.ref = None
        self._pending.appendleft(h)
        return True

    def _collect(self, h: int | None, ref: Any, actor: int) -> None:
        """Take a finished job's outcome (``h`` None: a cancelled job, dropped). A failed job may
        go back to the queue (retry); a dead actor is replaced; the slot is idle again."""
        ray = self._ray
        t = self._tasks[h] if h is not None else None
        out: JobOutcome | None = None
        failure: BaseException | None = None
        died = False
        try:
            out = ray.get(ref)
        except (
            ray.exceptions.RayTaskError
        ) as e:  # the job raised (the evaluator, or a cancellation)
            failure = getattr(e, "cause", None) or e
        except (
            ray.exceptions.RayError
        ) as e:  # the actor's process or its node died, or the result was lost
            failure, died = e, True
        if died:
            self._replace_actor(actor)  # idle again once the new one is up
        else:
            self._idle.append(actor)
        if t is None or h is None:
            return
        if out is not None:
            self._done[h] = replace(out, attempts=t.attempts, failures=tuple(t.failures))
        elif died:
            assert failure is not None
            if self._retry(h, t, failure, "the worker died"):
                return
            self._done[h] = EvaluationError(
                f"evaluating candidate {t.job.label!r} failed: its Ray worker died on each of "
                f"{t.attempts} attempt(s) ({'; '.join(t.failures + [_first_line(failure)])})\nhint: look for a "
                "crash or the OOM killer in the worker logs (python-core-worker-*.log); give each evaluation "
                "more memory (--ray-memory) or allow more retries (--ray-max-retries)"
            )
        else:
            assert failure is not None
            if self.retry_exceptions and self._retry(h, t, failure, "the evaluation raised"):
                return
            err = (
                failure
                if isinstance(failure, EvaluationError)
                else EvaluationError(
                    f"evaluating candidate {t.job.label!r} failed on a Ray worker: {_first_line(failure)}\n"
                    "hint: the worker's traceback is in its log (python-core-worker-*.log)"
                )
            )
            if t.failures:
                err = EvaluationError(
                    f"{err}\n(after {t.attempts} attempts; earlier: {'; '.join(t.failures)})"
                )
            self._done[h] = err
        del self._tasks[h]

    def wait(self, handles: Collection[int]) -> list[int]:
        """Block until at least one of ``handles`` has finished (after retries); return those.

        Raises:
            UsageError: a handle is unknown (never submitted, or already taken or cancelled).
        """
        unknown = [h for h in set(handles) if h not in self._tasks and h not in self._done]
        if unknown:
            raise UsageError(f"RayBackend.wait: unknown job handle(s) {sorted(unknown)}")
        while True:
            done = [h for h in handles if h in self._done]
            if done:
                return done
            self._fill()
            if not self._running and not self._starting:
                raise UsageError(
                    "RayBackend.wait: jobs are queued but no worker is running or starting\n"
                    "hint: this is a bug in soupkit's Ray backend; please report it"
                )
            ready, _ = self._ray.wait([*self._running, *self._starting], num_returns=1)
            for ref in ready:
                if ref in self._starting:
                    self._started(ref, self._starting.pop(ref))
                else:
                    h, actor = self._running.pop(ref)
                    self._collect(h, ref, actor)

    def result(self, handle: int) -> JobOutcome:
        """The finished job's outcome (removed from the backend).

        Raises:
            EvaluationError: the job failed (after its retries); names the candidate.
        """
        got = self._done.pop(handle)
        if isinstance(got, EvaluationError):
            raise got
        return got

    def cancel(self, handle: int) -> None:
        """Stop a job: dropped if queued; flagged if running (its actor stops at the next check
        and is free again once it has); forgotten if finished."""
        self._done.pop(handle, None)
        t = self._tasks.pop(handle, None)
        if t is not None and t.ref is not None and t.ref in self._running:
            self._running[t.ref] = (None, self._running[t.ref][1])
            try:
                self._ray.cancel(t.ref)
            except Exception:  # finished meanwhile: nothing to stop
                pass

    def close(self) -> None:
        """Stop the actors (freeing their resources); shut Ray down if this backend started it."""
        if self._ray is not None:
            for actor in self._actors:
                try:
                    self._ray.kill(actor)
                except Exception:  # already gone (its node died, or Ray shut down)
                    pass
        self._actors.clear()
        self._idle.clear()
        self._tasks.clear()
        self._pending.clear()
        self._running.clear()
        self._starting.clear()
        self._stored.clear()
        self._connected = False
        if self._owns and self._ray is not None:
            self._ray.shutdown()
            self._owns = False
