"""Sweeps and greedy soup on a local Ray instance give the local results; failures are retried
and reported; nothing computed is lost. One small Ray instance for the whole module."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip(
    "ray", reason="needs the ray extra: pip install 'soupkit[ray]' (make test installs it)"
)
if not hasattr(
    ray, "remote"
):  # tests/ray/ itself, found as a namespace package: ray is not installed
    pytest.skip(
        "needs the ray extra: pip install 'soupkit[ray]' (make test installs it)",
        allow_module_level=True,
    )

import raytoy as toy  # noqa: E402

from soupkit import RayBackend, RemoteEvaluator  # noqa: E402
from soupkit.cli import main  # noqa: E402
from soupkit.errors import EvaluationError, UsageError  # noqa: E402
from soupkit.evaluate import load_evaluator  # noqa: E402
from soupkit.search import greedy_soup, sweep  # noqa: E402

pytestmark = pytest.mark.ray
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A 2-CPU Ray instance; workers can import this folder's modules (the picklable evaluators)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE)] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def backend(cluster: None) -> Iterator[RayBackend]:
    """One pool of two actors for the module (each actor is a process that imports torch). They
    hold half the CPUs, so the CLI test's own backends find room."""
    with RayBackend(num_cpus=0.5, max_workers=2, max_retries=2) as be:
        yield be


@pytest.fixture
def setup(tmp_path: Path, cluster: None) -> dict[str, Any]:
    _, xv, yv, xt, yt = toy.problem()
    return {
        "paths": toy.make_ingredients(tmp_path / "runs"),
        "val": toy.Accuracy(xv, yv),
        "test": toy.Accuracy(xt, yt, key="toy-test"),
        "plain": toy.Plain(xv, yv),
        "xv": xv,
        "yv": yv,
    }


def comparable(r: Any) -> dict[str, Any]:
    d = r.to_dict()
    for k in ("seconds", "distributed", "notes"):
        d.pop(k, None)
    return d


def test_sweep_on_ray_equals_the_local_sweep(
    tmp_path: Path, setup: dict[str, Any], backend: RayBackend
) -> None:
    a, b = setup["paths"][0], setup["paths"][2]
    xt, yt = toy.problem()[3:]
    mod = toy.write_eval_module(tmp_path, "val_eval", setup["xv"], setup["yv"])
    kw: dict[str, Any] = dict(
        values=[0, 0.25, 0.5, 0.75, 1],
        method="wise_ft",
        base=a,
        plot=False,
        shift_evaluator=toy.Accuracy(xt, yt, key="shift"),
    )
    ref = sweep(
        [b], load_evaluator(f"{mod}:accuracy"), out=tmp_path / "local", evaluator_id="val", **kw
    )
    got = sweep(
        [b],
        RemoteEvaluator.from_spec(f"{mod}:accuracy"),
        out=tmp_path / "ray",
        evaluator_id="val",
        backend=backend,
        **kw,
    )
    assert comparable(got) == comparable(ref)
    assert toy.files_of(tmp_path / "ray") == toy.files_of(tmp_path / "local")
    d = got.distributed
    assert d is not None and d["backend"] == "ray" and d["workers"] == 2 and d["jobs"] == 5
    # Each worker process builds each evaluator (spec and object) at most once.
    assert 1 <= d["worker_processes"] <= 2 and d["evaluator_builds"] <= 2 * d["worker_processes"]
    assert d["retries"] == []


def test_greedy_on_ray_equals_the_local_greedy_soup(
    tmp_path: Path, setup: dict[str, Any], backend: RayBackend
) -> None:
    paths = setup["paths"]
    # A bounded evaluator (exact early rejection), no speculation: the whole history is identical.
    ref = greedy_soup(
        paths, setup["val"], tmp_path / "local", test_evaluator=setup["test"], plot=False
    )
    got = greedy_soup(
        paths,
        setup["val"],
        tmp_path / "ray",
        test_evaluator=setup["test"],
        plot=False,
        backend=backend,
        speculate=0,
    )
    assert comparable(got) == comparable(ref)
    assert toy.files_of(tmp_path / "ray") == toy.files_of(tmp_path / "local")
    # A plain evaluator with speculation two steps ahead: still the whole history, plus a report
    # of the speculative evaluations.
    ref = greedy_soup(paths, setup["plain"], tmp_path / "local2", plot=False)
    got = greedy_soup(
        paths, setup["plain"], tmp_path / "ray2", plot=False, backend=backend, speculate=2
    )
    assert comparable(got) == comparable(ref)
    assert toy.files_of(tmp_path / "ray2") == toy.files_of(tmp_path / "local2")
    spec = got.distributed["speculation"]
    assert spec["depth"] == 2 and spec["launched"] >= 1
    assert spec["launched"] == spec["used"] + spec["wasted"] + spec["cancelled"] + spec["failed"]
    assert got.distributed["speedup"] > 0
    report = (tmp_path / "ray2" / "soupkit-report.json").read_text()
    assert '"distributed"' in report and '"speculation"' in report


def test_sequential_greedy_on_ray_equals_the_local_sequential_greedy_soup(
    tmp_path: Path, setup: dict[str, Any], backend: RayBackend
) -> None:
    xv, yv = setup["xv"], setup["yv"]
    kw = {"sequential": True, "delta": 0.01, "order_seed": 2, "sequential_batch": 60, "plot": False}
    ref = greedy_soup(setup["paths"], toy.PerExampleAccuracy(xv, yv), tmp_path / "local", **kw)
    got = greedy_soup(
        setup["paths"], toy.PerExampleAccuracy(xv, yv), tmp_path / "ray", backend=backend, **kw
    )
    assert got.ingredients == ref.ingredients and got.sequential == ref.sequential
    assert [(s.accepted, s.examples_used, s.better, s.worse, s.error_bound) for s in got.steps] == [
        (s.accepted, s.examples_used, s.better, s.worse, s.error_bound) for s in ref.steps
    ]
    assert got.examples_evaluated == ref.examples_evaluated < 2 * len(yv) * len(setup["paths"])
    assert toy.files_of(tmp_path / "ray") == toy.files_of(tmp_path / "local")


def test_a_worker_that_dies_mid_evaluation_is_retried_and_reported(
    tmp_path: Path, setup: dict[str, Any], backend: RayBackend
) -> None:
    mod = toy.write_eval_module(tmp_path, "crashy", setup["xv"], setup["yv"])
    ref = greedy_soup(
        setup["paths"],
        load_evaluator(f"{mod}:accuracy"),
        tmp_path / "local",
        plot=False,
        evaluator_id="acc",
    )
    got = greedy_soup(
        setup["paths"],
        RemoteEvaluator.from_spec(f"{mod}:crash_once"),
        tmp_path / "ray",
        plot=False,
        evaluator_id="acc",
        backend=backend,
    )
    assert (tmp_path / "crashy.mark").exists()  # the first call did kill its worker
    assert comparable(got) == comparable(ref)
    assert toy.files_of(tmp_path / "ray") == toy.files_of(tmp_path / "local")
    retries = got.distributed["retries"]
    assert len(retries) == 1 and retries[0]["attempt"] == 1
    assert retries[0]["error"].startswith("the worker died: ActorDiedError")
    assert any(
        n.startswith(f"retried {retries[0]['candidate']!r} after attempt 1 failed (the worker died")
        for n in got.notes
    )


def test_evaluator_errors_are_retried_on_request_else_reported_and_nothing_is_lost(
    tmp_path: Path, setup: dict[str, Any], backend: RayBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = toy.write_eval_module(tmp_path, "flaky", setup["xv"], setup["yv"])
    ref = greedy_soup(
        setup["paths"], load_evaluator(f"{flaky}:accuracy"), plot=False, evaluator_id="acc"
    )
    monkeypatch.setattr(backend, "retry_exceptions", True)
    got = greedy_soup(
        setup["paths"],
        RemoteEvaluator.from_spec(f"{flaky}:raise_once"),
        plot=False,
        evaluator_id="acc",
        backend=backend,
    )
    assert got.ingredients == ref.ingredients and got.score == ref.score
    [retry] = got.distributed["retries"]
    assert retry["error"].startswith("the evaluation raised: EvaluationError: evaluating candidate")
    assert "RuntimeError: transient failure on the first call" in retry["error"]

    # Without retry_exceptions the error names the candidate; the other scores stay in the cache.
    broken = toy.write_eval_module(tmp_path, "broken", setup["xv"], setup["yv"])
    cache = tmp_path / "scores.jsonl"
    monkeypatch.setattr(backend, "retry_exceptions", False)
    with pytest.raises(
        EvaluationError,
        match=r"evaluating candidate 'ingredient .*ft01-perm' failed: evaluator "
        r"fail_on_ingredient_1 raised ValueError: cannot score this candidate",
    ):
        greedy_soup(
            setup["paths"],
            RemoteEvaluator.from_spec(f"{broken}:fail_on_ingredient_1", key="broken"),
            tmp_path / "out",
            cache=cache,
            backend=backend,
        )
    assert not (tmp_path / "out").exists()
    assert cache.read_text().count('"kind":"score"') == len(setup["paths"]) - 1


def test_cli_greedy_and_sweep_on_ray_write_the_local_bytes(
    tmp_path: Path,
    setup: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(
        tmp_path
    )  # relative paths, as a user types them: workers resolve them here too
    toy.write_eval_module(tmp_path, "val_eval", setup["xv"], setup["yv"])
    runs = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "runs").iterdir())
    common = ["--evaluator", "val_eval.py:accuracy", "--no-cache", "--no-plot", "--no-progress"]
    assert main(["greedy", *common, "--out", "g-local", *runs]) == 0
    assert (
        main(
            [
                "greedy",
                *common,
                "--out",
                "g-ray",
                "--backend",
                "ray",
                "--ray-num-cpus",
                "0.5",
                "--ray-workers",
                "1",
                "--speculate",
                "1",
                "--ray-max-retries",
                "1",
                *runs,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "backend ray: 1 worker slot(s)" in out and "speculation (up to 1 ahead)" in out
    assert toy.files_of(tmp_path / "g-ray") == toy.files_of(tmp_path / "g-local")
    assert main(["sweep", *common, "--values", "0:1:5", "--out", "s-local", runs[0], runs[2]]) == 0
    assert (
        main(
            [
                "sweep",
                *common,
                "--values",
                "0:1:5",
                "--out",
                "s-ray",
                "--backend",
                "ray",
                "--ray-workers",
                "1",
                "--ray-num-cpus",
                "0.5",
                runs[0],
                runs[2],
            ]
        )
        == 0
    )
    assert toy.files_of(tmp_path / "s-ray") == toy.files_of(tmp_path / "s-local")


def test_clear_errors_for_what_cannot_run(setup: dict[str, Any]) -> None:
    with pytest.raises(
        UsageError,
        match=r"no Ray node can run one evaluation: each needs CPU 1, GPU 1; "
        r"the 1 node\(s\) have CPU 2, GPU 0\nhint: lower --ray-num-cpus",
    ):
        RayBackend(num_gpus=1).connect()

    class Locked:  # holds a lock: cannot be pickled, so cannot be sent to a worker
        cache_key = "locked"

        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __call__(self, state: Any) -> float:
            return 0.0

    with pytest.raises(
        UsageError,
        match=r"evaluator .*Locked cannot be sent to Ray workers: pickling it failed "
        r".*\nhint: name it by import string",
    ):
        greedy_soup(setup["paths"], Locked(), backend=RayBackend())
