"""The backend job path without Ray: `LocalBackend`, an out-of-order backend, the worker's
running sum, and Ray staying optional. These run whether or not ray is installed."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import raytoy as toy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import soupkit
from soupkit import uniform_soup
from soupkit.backends import (
    EvalJob,
    EvalRequest,
    Ingredient,
    JobOutcome,
    LocalBackend,
    RayBackend,
    RemoteEvaluator,
    UniformSoup,
    _worker,
    execute_job,
    resolve_backend,
)
from soupkit.cli import main
from soupkit.errors import EvaluationError, UsageError
from soupkit.io.checkpoint import open_checkpoint
from soupkit.search import checkpoint_digest, greedy_soup, sweep


@pytest.fixture(autouse=True)
def _fresh_worker_caches() -> None:
    _worker.clear_caches()


@pytest.fixture
def problem(tmp_path: Path) -> dict[str, Any]:
    _, xv, yv, xt, yt = toy.problem()
    return {
        "paths": toy.make_ingredients(tmp_path / "runs"),
        "val": toy.Accuracy(xv, yv),
        "test": toy.Accuracy(xt, yt, key="toy-test"),
        "plain": toy.Plain(xv, yv),
        "xv": xv,
        "yv": yv,
    }


class ShuffledBackend:
    """Runs jobs in a random order among everything in flight (as a cluster may finish them),
    through the same `execute_job` as every backend."""

    name = "shuffled"

    def __init__(self, seed: int, parallelism: int = 4) -> None:
        self.rng = random.Random(seed)
        self.parallelism = parallelism
        self.retries: list[dict[str, Any]] = []
        self.jobs: dict[int, EvalJob] = {}
        self.done: dict[int, JobOutcome | EvaluationError] = {}
        self.cancelled = 0
        self.n = 0

    def submit(self, job: EvalJob) -> int:
        self.n += 1
        self.jobs[self.n] = job
        return self.n

    def wait(self, handles: Collection[int]) -> list[int]:
        while not any(h in self.done for h in handles):
            h = self.rng.choice(sorted(self.jobs))
            try:
                self.done[h] = execute_job(self.jobs.pop(h))
            except EvaluationError as e:
                self.done[h] = e
        return [h for h in handles if h in self.done]

    def result(self, handle: int) -> JobOutcome:
        got = self.done.pop(handle)
        if isinstance(got, EvaluationError):
            raise got
        return got

    def cancel(self, handle: int) -> None:
        self.cancelled += int(self.jobs.pop(handle, None) is not None)
        self.done.pop(handle, None)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": self.parallelism}

    def close(self) -> None:
        self.jobs.clear()


def comparable(r: Any) -> dict[str, Any]:
    """A result's history without timings and backend details."""
    d = r.to_dict()
    for k in ("seconds", "distributed", "notes"):
        d.pop(k, None)
    return d


def test_local_backend_gives_the_in_process_result(tmp_path: Path, problem: dict[str, Any]) -> None:
    paths = problem["paths"]
    a = greedy_soup(
        paths, problem["val"], tmp_path / "a", test_evaluator=problem["test"], plot=False
    )
    b = greedy_soup(
        paths,
        problem["val"],
        tmp_path / "b",
        test_evaluator=problem["test"],
        plot=False,
        backend=LocalBackend(),
    )
    assert comparable(a) == comparable(b)
    assert toy.files_of(tmp_path / "a") == toy.files_of(tmp_path / "b")
    assert b.distributed is not None and b.distributed["backend"] == "local"
    assert b.distributed["jobs"] == b.evaluations == a.evaluations
    # An evaluator object is built once per process, not once per candidate.
    assert b.distributed["evaluator_builds"] == 2  # the validation and the test evaluator


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(seed=st.integers(0, 10_000), speculate=st.integers(1, 6), early_stop=st.booleans())
def test_speculation_makes_the_sequential_decisions_whatever_order_results_arrive(
    tmp_path_factory: pytest.TempPathFactory, seed: int, speculate: int, early_stop: bool
) -> None:
    root = tmp_path_factory.mktemp("spec")
    kinds = random.Random(seed).choices(["good", "perm", "noisy"], k=6)
    paths = toy.make_ingredients(root, kinds)
    _, xv, yv, _, _ = toy.problem()
    ev = toy.Accuracy(xv, yv)
    ref = greedy_soup(paths, ev, early_stop=early_stop)
    be = ShuffledBackend(seed)
    got = greedy_soup(paths, ev, early_stop=early_stop, backend=be, speculate=speculate)
    assert got.ingredients == ref.ingredients and got.score == ref.score
    assert got.ingredient_scores == ref.ingredient_scores
    assert [(s.label, s.accepted, s.need, s.soup_score) for s in got.steps] == [
        (s.label, s.accepted, s.need, s.soup_score) for s in ref.steps
    ]
    for s, r in zip(got.steps, ref.steps):
        if s.complete and r.complete:
            assert s.candidate_score == r.candidate_score
        else:  # an early-stop bound on one side: the same rejection, proven either way
            assert not s.accepted and not r.accepted
    if not early_stop:
        assert got.steps == ref.steps
    spec = got.distributed["speculation"]
    assert spec["depth"] == speculate
    assert spec["launched"] == spec["used"] + spec["wasted"] + spec["cancelled"] + spec["failed"]
    assert got.distributed["jobs"] == len(paths) + spec["launched"] + (
        len(ref.steps) - spec["used"]
    )


def test_speculation_with_a_plain_evaluator_keeps_the_whole_history(
    tmp_path: Path, problem: dict[str, Any]
) -> None:
    paths = problem["paths"]
    ref = greedy_soup(paths, problem["plain"], tmp_path / "ref", plot=False)
    got = greedy_soup(
        paths,
        problem["plain"],
        tmp_path / "got",
        plot=False,
        backend=ShuffledBackend(3),
        speculate=2,
    )
    assert comparable(ref) == comparable(got)
    assert toy.files_of(tmp_path / "ref") == toy.files_of(tmp_path / "got")
    spec = got.distributed["speculation"]
    assert spec["launched"] > 0 and spec["used"] > 0


def test_the_workers_soup_equals_the_engine_uniform_soup_bit_for_bit(tmp_path: Path) -> None:
    paths = toy.make_ingredients(
        tmp_path / "bf16", ["good", "good", "noisy", "good"], dtype=torch.bfloat16
    )
    digests = [checkpoint_digest(open_checkpoint(p)) for p in paths]
    ev = RemoteEvaluator.from_object(toy.Plain(*toy.problem()[1:3]))
    uniform_soup(paths, tmp_path / "engine")
    want = toy.load(tmp_path / "engine")

    def state(worker: _worker.Worker, members: list[int]) -> dict[str, torch.Tensor]:
        job = EvalJob(
            UniformSoup(tuple(str(paths[j]) for j in members), tuple(digests[j] for j in members)),
            (EvalRequest(ev, "t"),),
        )
        return worker.build_state(job)

    # The same soup reached from a cold worker, from a cached prefix and after another prefix,
    # on a remote worker (checkpoints planned again) and in this process (opened once, kept).
    for before, remote in itertools.product(
        ([], [0, 1], [0, 1, 2], [2, 0], [0, 1, 2, 3]), (True, False)
    ):
        worker = _worker.Worker(remote=remote)
        if before:
            state(worker, before)
        got = state(worker, [0, 1, 2, 3])
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype
            assert torch.equal(
                got[k].view(torch.int16) if got[k].dtype == torch.bfloat16 else got[k],
                want[k].view(torch.int16) if want[k].dtype == torch.bfloat16 else want[k],
            ), (before, k)


def test_sweep_on_a_backend_equals_the_local_sweep(tmp_path: Path, problem: dict[str, Any]) -> None:
    a_, b_ = problem["paths"][0], problem["paths"][2]
    xt, yt = toy.problem()[3:]
    kw = dict(
        values=[0, 0.3, 0.5, 0.8, 1], shift_evaluator=toy.Accuracy(xt, yt, key="shift"), plot=False
    )
    ref = sweep([a_, b_], problem["val"], out=tmp_path / "ref", **kw)
    got = sweep([a_, b_], problem["val"], out=tmp_path / "got", backend=LocalBackend(), **kw)
    assert comparable(ref) == comparable(got)
    assert toy.files_of(tmp_path / "ref") == toy.files_of(tmp_path / "got")
    # each grid point is merged once and scored by both evaluators
    assert got.distributed["jobs"] == 5 and got.evaluations == ref.evaluations == 10


def test_a_failing_candidate_names_itself_and_the_others_are_cached(
    tmp_path: Path, problem: dict[str, Any]
) -> None:
    _, xv, yv, _, _ = toy.problem()
    mod = toy.write_eval_module(tmp_path, "flaky", xv, yv)
    ev = RemoteEvaluator.from_spec(f"{mod}:fail_on_ingredient_1")
    cache = tmp_path / "scores.jsonl"
    with pytest.raises(
        EvaluationError,
        match=r"evaluating candidate 'ingredient .*ft01-perm' failed: .*"
        r"ValueError: cannot score this candidate",
    ):
        greedy_soup(problem["paths"], ev, tmp_path / "out", backend=LocalBackend(), cache=cache)
    assert not (tmp_path / "out").exists()
    assert cache.read_text().count('"kind":"score"') == len(problem["paths"]) - 1


def test_remote_evaluator_forms_and_errors(tmp_path: Path, problem: dict[str, Any]) -> None:
    _, xv, yv, _, _ = toy.problem()
    mod = toy.write_eval_module(tmp_path, "val_eval", xv, yv)
    state = toy.load(problem["paths"][0])
    spec = RemoteEvaluator.from_spec(f"{mod}:accuracy")
    assert spec(state) == toy.accuracy(state, xv, yv)
    assert spec.cache_key is not None and spec.cache_key.startswith(f"{mod}:accuracy@")
    fac = RemoteEvaluator.from_factory(toy.Accuracy, xv, yv, key="k")
    assert fac.evaluate(state, need=2.0).complete is False and fac.cache_key == "k"
    assert RemoteEvaluator.from_object(problem["val"]).cache_key == "toy-val"
    with pytest.raises(UsageError, match="exactly one of spec, factory, obj; got spec, obj"):
        RemoteEvaluator(spec="a:b", obj=problem["val"])
    with pytest.raises(UsageError, match="has no ':name' part"):
        RemoteEvaluator.from_spec("val_eval.accuracy")
    bad = RemoteEvaluator.from_factory(toy.Accuracy)  # missing arguments
    job = EvalJob(Ingredient(str(problem["paths"][0])), (EvalRequest(bad, "ingredient x"),))
    with pytest.raises(
        EvaluationError, match=r"cannot build evaluator raytoy:Accuracy on worker .*TypeError"
    ):
        execute_job(job)
    with pytest.raises(
        EvaluationError, match=r"worker .* has soupkit .*, the driver has 0\.0\.0; refusing"
    ):
        execute_job(replace(job, version="0.0.0"))
    missing = EvalJob(
        Ingredient(str(tmp_path / "nowhere")), (EvalRequest(spec, "ingredient nowhere"),)
    )
    with pytest.raises(
        EvaluationError,
        match=r"cannot build candidate 'ingredient nowhere' on worker .*\n"
        r"(.*\n)*hint: every worker reads the checkpoints itself",
    ):
        execute_job(missing)


def test_backend_argument_is_checked_before_any_work(problem: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="unknown backend 'dask'; expected one of local, ray"):
        greedy_soup(problem["paths"], problem["val"], backend="dask")
    with pytest.raises(
        UsageError, match="is not a soupkit backend: it has no name, parallelism, retries, submit"
    ):
        sweep(problem["paths"][:2], problem["val"], [0.5], backend=object())  # type: ignore[arg-type]
    assert resolve_backend("local") == (None, False)


def test_import_soupkit_does_not_import_ray() -> None:
    code = "import sys, soupkit, soupkit.backends, soupkit.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert {"RayBackend", "LocalBackend", "RemoteEvaluator"} <= set(soupkit.__all__)


def test_without_ray_the_ray_backend_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    problem: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does when it is not installed
    with pytest.raises(
        UsageError,
        match=r"the Ray backend needs the 'ray' package, which is not installed .*\n"
        r"hint: pip install 'soupkit\[ray\]'",
    ):
        RayBackend()
    _, xv, yv, _, _ = toy.problem()
    mod = toy.write_eval_module(tmp_path, "val_eval", xv, yv)
    code = main(
        [
            "greedy",
            "--backend",
            "ray",
            "--evaluator",
            f"{mod}:accuracy",
            "--out",
            str(tmp_path / "o"),
            "--no-cache",
            *map(str, problem["paths"]),
        ]
    )
    assert code == 2
    assert "pip install 'soupkit[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ray_flags_need_the_ray_backend(
    tmp_path: Path, problem: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "sweep",
            "--values",
            "0,1",
            "--ray-num-gpus",
            "1",
            "--evaluator",
            "x.py:f",
            "--out",
            str(tmp_path / "o"),
            *map(str, problem["paths"][:2]),
        ]
    )
    assert code == 2
    assert (
        "--ray-num-gpus only apply with --backend ray (got --backend local)"
        in capsys.readouterr().err
    )
    with pytest.raises(
        UsageError,
        match=r"invalid Ray backend settings:\n  - num_gpus must be a number >= 0, got -1",
    ):
        RayBackend(num_gpus=-1)


def test_cli_builtin_evaluators_are_rebuilt_by_workers_from_the_same_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers", reason="the built-in evaluators need the eval extra")
    from soupkit.cli import build_parser
    from soupkit.cli._backend import remote_evaluators
    from soupkit.cli._search_common import build_evaluator

    monkeypatch.chdir(tmp_path)
    paths = [str(p.relative_to(tmp_path)) for p in toy.tiny_bert(tmp_path, 2)]
    args = build_parser().parse_args(
        [
            "greedy",
            "--hf-classification",
            "val.csv",
            "--test-data",
            "test.csv",
            "--batch-size",
            "8",
            "--out",
            "o",
            "--backend",
            "ray",
            *paths,
        ]
    )
    ev, ident, test_ev, test_ident = build_evaluator(args, paths, second="test")
    remote, remote_test = remote_evaluators(args, paths, "test", ident, test_ident)
    assert remote_test is not None and (remote.cache_key, remote_test.cache_key) == (
        ident,
        test_ident,
    )
    state = toy.load(tmp_path / paths[1])
    monkeypatch.chdir(tmp_path.parent)  # a worker's working directory is not the driver's
    job = EvalJob(
        Ingredient(str(tmp_path / paths[1])),
        (
            EvalRequest(remote, "ingredient bert1"),
            EvalRequest(remote_test, "ingredient bert1 (test set)"),
        ),
    )
    out = execute_job(job)
    assert [r.score for r in out.results] == [
        ev.evaluate(state).score,
        test_ev.evaluate(state).score,
    ]
    assert out.evaluators_built == 2 and execute_job(job).evaluators_built == 0
