"""The paired sequential test: its error rate stays under delta, its decisions at the end are exact,
and greedy soup / sweeps use it through the CLI and the Python API."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import soup_toy as toy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from soupkit.backends import LocalBackend
from soupkit.cli import main
from soupkit.errors import EvaluationError, UsageError
from soupkit.search import greedy_soup
from soupkit.search.sequential import decide, decide_many, example_order, log_wealth


def _z(better: int, worse: int, n: int, seed: int = 0) -> torch.Tensor:
    """A random order of ``better`` +1s, ``worse`` -1s and zeros, ``n`` long."""
    z = torch.zeros(n, dtype=torch.float64)
    z[:better] = 1
    z[better : better + worse] = -1
    return z[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(0, 3),
    st.integers(0, 2),
    st.sampled_from([0, 1]),
    st.sampled_from([-1.0, 1.0]),
)
def test_the_wealth_is_a_supermartingale_under_the_null_exactly(
    b: int, a: int, c: int, t: int, sign: float
) -> None:
    # Every order of a small urn, equally likely: E[K_n] <= 1 at every n when the true total is on
    # the null side of the bet (at or below T for sign +1, at or above T for sign -1).
    import itertools

    items = [1.0] * b + [-1.0] * a + [0.0] * c
    total = len(items)
    target = b - a  # the boundary itself: the hardest null
    orders = torch.tensor(sorted(set(itertools.permutations(items))), dtype=torch.float64)
    wealth = torch.exp(log_wealth(orders, total, target, sign))
    assert bool((wealth.mean(0) <= 1 + 1e-9).all()), wealth.mean(0)
    # ... and strictly on the null side as well
    far = log_wealth(orders, total, target + (1 if sign > 0 else -1), sign)
    assert bool((torch.exp(far).mean(0) <= 1 + 1e-9).all())
    assert bool((wealth > 0).all())


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.data(), st.sampled_from([0, 1]), st.sampled_from([0.001, 0.05, 0.3]))
def test_at_the_end_of_the_data_the_decision_is_the_exact_rule(
    total: int, data: st.DataObject, t: int, delta: float
) -> None:
    b = data.draw(st.integers(0, total))
    a = data.draw(st.integers(0, total - b))
    d = decide(total, _z(b, a, total), delta=delta, threshold=t)
    assert d.accept == (b - a >= t) and d.error_bound == 0.0 and (d.better, d.worse) == (b, a)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 200), st.data(), st.sampled_from([0, 1]))
def test_a_decision_the_remaining_examples_cannot_change_is_certain(
    total: int, data: st.DataObject, t: int
) -> None:
    n = data.draw(st.integers(1, total - 1))
    b = data.draw(st.integers(0, n))
    a = data.draw(st.integers(0, n - b))
    d = decide(total, _z(b, a, n, seed=n), delta=0.01, threshold=t)
    rest = total - n
    if b - a - rest >= t:  # even if every remaining example goes to the soup: accepted
        assert d.accept is True and d.error_bound == 0.0
    elif b - a + rest < t:  # even if every remaining example goes to the candidate: rejected
        assert d.accept is False and d.error_bound == 0.0
    if d.accept is not None:  # a decision is never against the data
        assert d.error_bound <= 0.01


def test_decisions_are_symmetric_between_candidate_and_incumbent() -> None:
    # Swapping the roles (z -> -z) with threshold t <-> 1 - t mirrors the decision.
    for total, n, b, a in [
        (500, 100, 20, 3),
        (500, 100, 3, 20),
        (800, 300, 40, 30),
        (200, 150, 9, 9),
    ]:
        z = _z(b, a, n, seed=b)
        d0 = decide(total, z, delta=0.05, threshold=0)
        d1 = decide(total, -z, delta=0.05, threshold=1)
        assert (d0.accept is None) == (d1.accept is None)
        if d0.accept is not None:
            assert d0.accept != d1.accept
            assert d0.error_bound == pytest.approx(d1.error_bound)


def _simulate(
    total: int,
    big_b: int,
    big_a: int,
    t: int,
    delta: float,
    trials: int,
    batch: int,
    seed: int,
    margin: int = 0,
) -> tuple[float, float]:
    """Run the test on ``trials`` random orders of one urn; ``(error rate, mean examples used)``."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(total, dtype=torch.float64)
    base[:big_b] = 1
    base[big_b : big_b + big_a] = -1
    z = torch.stack([base[torch.randperm(total, generator=g)] for _ in range(trials)])
    truth = big_b - big_a >= t
    verdict = torch.zeros(trials, dtype=torch.int8)  # 0 undecided, 1 accept, -1 reject
    used = torch.full((trials,), total, dtype=torch.int64)
    for n in range(batch, total, batch):
        live = torch.nonzero(verdict == 0)[:, 0]
        if not len(live):
            break
        acc, rej, _ = decide_many(total, z[live, :n], delta=delta, threshold=t, margin=margin)
        verdict[live[acc]] = 1
        verdict[live[rej]] = -1
        used[live[acc | rej]] = n
    verdict[verdict == 0] = 1 if truth else -1  # the end of the data: exact
    wrong = (verdict == -1) if truth else (verdict == 1)
    return float(wrong.float().mean()), float(used.float().mean())


@pytest.mark.parametrize(
    ("big_b", "big_a", "t"),
    [
        (20, 20, 0),  # the boundary for >=: equal accuracy is accepted; rejecting is the error
        (19, 20, 0),  # one example short: rejecting is right, accepting the error
        (20, 20, 1),  # the boundary for > : equal accuracy is rejected
        (21, 20, 1),
        (60, 45, 0),  # a real but small difference
        (45, 60, 0),
        (5, 0, 0),  # few discordant examples
    ],
)
def test_error_rate_stays_under_delta_at_and_near_the_boundary(
    big_b: int, big_a: int, t: int
) -> None:
    delta = 0.1  # a large delta, so that a too-liberal test would show in 2,000 orders
    err, used = _simulate(
        400, big_b, big_a, t, delta, trials=2000, batch=40, seed=big_b * 100 + big_a + t
    )
    # 2,000 Bernoulli(<= 0.1) draws: the mean exceeds 0.1 + 3 standard errors with probability < 0.2 %.
    assert err <= delta + 3 * math.sqrt(delta * (1 - delta) / 2000), (err, used)


def test_clear_differences_stop_early_and_stay_correct() -> None:
    err, used = _simulate(2000, 120, 20, 0, 0.01, trials=500, batch=100, seed=1)
    assert err <= 0.01 and used < 800
    err, used = _simulate(2000, 20, 120, 0, 0.01, trials=500, batch=100, seed=2)
    assert err <= 0.01 and used < 800


def test_many_random_urns_error_rate_under_delta() -> None:
    # Thousands of candidate pairs with known accuracies, drawn around the boundary.
    rng = random.Random(5)
    delta, errors, pairs = 0.05, 0, 0
    for k in range(40):
        big_a = rng.randint(0, 40)
        big_b = max(0, big_a + rng.randint(-3, 3))
        t = rng.choice([0, 1])
        err, _ = _simulate(300, big_b, big_a, t, delta, trials=100, batch=30, seed=k)
        errors += round(err * 100)
        pairs += 100
    assert errors / pairs <= delta


def test_example_order_is_a_seeded_permutation() -> None:
    a = example_order(1000, 3)
    assert (
        sorted(a) == list(range(1000))
        and a == example_order(1000, 3)
        and a != example_order(1000, 4)
    )
    assert example_order(5, 0) == [2, 1, 0, 4, 3]  # pinned: Python's random.Random(0).shuffle


# ---- greedy soup with sequential decisions -------------------------------------------------------

KINDS = ["good", "perm", "good", "noisy", "good", "good"]


def test_greedy_sequential_selects_the_exact_soup_on_fewer_examples(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, KINDS)
    _, xv, yv, _, _ = toy.problem()
    exact = greedy_soup(paths, toy.Accuracy(xv, yv))
    ev = toy.PerExampleAccuracy(xv, yv)
    r = greedy_soup(
        paths, ev, tmp_path / "soup", sequential=True, delta=0.01, order_seed=3, sequential_batch=50
    )
    assert r.ingredients == exact.ingredients
    n = len(yv)
    cand_examples = sum(s.examples + s.soup_examples for s in r.steps)
    assert cand_examples < 0.5 * n * len(r.steps)  # the exact mode needs about n per candidate
    assert ev.examples == r.examples_evaluated == len(KINDS) * n + cand_examples
    assert r.examples_saved == n * len(r.steps) - cand_examples
    order = example_order(n, 3)
    for s in r.steps:
        assert s.test == "sequential" and s.examples_used % 50 == 0 and 0.0 <= s.error_bound <= 0.01
        assert (
            s.better is not None and s.worse is not None and s.better + s.worse <= s.examples_used
        )
        assert s.accepted == (s.better > s.worse)  # here the decisions are clear cut
    # The paired scores are on the first examples_used examples of the seeded order.
    first = r.steps[0]
    assert first.need == pytest.approx(
        float(ev.per_example(_single(paths, r), order[: first.examples_used]).mean())
    )
    report = json.loads((tmp_path / "soup" / "soupkit-report.json").read_text())["greedy"]
    assert report["decisions"] == "sequential" and report["sequential"]["delta"] == 0.01
    assert (
        report["sequential"]["seed"] == 3
        and report["sequential"]["any_decision_differs_at_most"] == 0.05
    )
    assert {"examples_used", "better", "worse", "error_bound", "test"} <= set(report["steps"][0])
    assert (tmp_path / "soup" / "greedy-soup.png").read_bytes().startswith(b"\x89PNG")


def _single(paths: list[Path], r: Any) -> dict[str, torch.Tensor]:
    return load_file(str(Path(r.best_single.label) / "model.safetensors"))


def test_greedy_sequential_reuses_cached_per_example_results(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, KINDS)
    _, xv, yv, _, _ = toy.problem()
    cache = tmp_path / "scores.jsonl"
    first = greedy_soup(
        paths, toy.PerExampleAccuracy(xv, yv), sequential=True, cache=cache, evaluator_id="toy"
    )
    ev = toy.PerExampleAccuracy(xv, yv)
    again = greedy_soup(paths, ev, sequential=True, cache=cache, evaluator_id="toy")
    assert (
        ev.examples == 0
        and again.examples_evaluated == 0
        and again.ingredients == first.ingredients
    )
    assert [s.examples_used for s in again.steps] == [s.examples_used for s in first.steps]
    # Another order seed: only the examples not known yet are evaluated.
    ev2 = toy.PerExampleAccuracy(xv, yv)
    other = greedy_soup(paths, ev2, sequential=True, cache=cache, evaluator_id="toy", order_seed=9)
    assert other.ingredients == first.ingredients
    assert (
        ev2.examples
        == other.examples_evaluated
        < sum(s.examples_used + s.soup_examples for s in other.steps)
    )


def test_greedy_sequential_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, KINDS[:3])
    _, xv, yv, _, _ = toy.problem()
    with pytest.raises(
        UsageError,
        match=r"sequential decisions need per-example scores, but evaluator "
        r"Accuracy has no per_example",
    ):
        greedy_soup(paths, toy.Accuracy(xv, yv), sequential=True)
    with pytest.raises(UsageError, match=r"delta must be in \(0, 1\), got 1.5"):
        greedy_soup(paths, toy.PerExampleAccuracy(xv, yv), sequential=True, delta=1.5)
    with pytest.raises(
        EvaluationError,
        match=r"evaluator .*Accuracy has no per_example\(state, indices\) / "
        r"n_examples\(\), which sequential decisions need",
    ):
        greedy_soup(paths, toy.Accuracy(xv, yv), sequential=True, backend=LocalBackend())

    class Scores(toy.PerExampleAccuracy):
        def per_example(self, state, indices):  # type: ignore[no-untyped-def]
            return super().per_example(state, indices) * 0.5

    with pytest.raises(
        EvaluationError,
        match=r"per_example returned 0.5 for example \d+; the sequential test "
        r"needs 0/1 correctness per example",
    ):
        greedy_soup(paths, Scores(xv, yv), sequential=True)


@pytest.mark.parametrize("strict", [False, True])
def test_greedy_sequential_with_delta_near_one_still_decides_ties_by_the_rule(
    tmp_path: Path, strict: bool
) -> None:
    # Identical ingredients: every candidate equals the soup (no discordant example): >= accepts,
    # > rejects, exactly as the exact mode, whenever the test stops.
    state = toy.states(["good"])[0]
    paths = [toy.write(tmp_path / f"same{i}", state) for i in range(3)]
    _, xv, yv, _, _ = toy.problem(n=200)
    r = greedy_soup(
        paths,
        toy.PerExampleAccuracy(xv, yv),
        sequential=True,
        delta=0.5,
        strict=strict,
        sequential_batch=64,
    )
    exact = greedy_soup(paths, toy.Accuracy(xv, yv), strict=strict)
    assert r.ingredients == exact.ingredients
    assert all(
        s.error_bound <= 0.5 and s.better == s.worse == 0 and s.accepted != strict for s in r.steps
    )


EVAL_MODULE = """
import torch
_x, _y = torch.load({data!r}, weights_only=True)

class PerExample:
    def __call__(self, state):
        return float(self.per_example(state, range(len(_y))).mean())
    def n_examples(self):
        return len(_y)
    def per_example(self, state, indices):
        idx = torch.as_tensor(list(indices))
        logits = _x[idx] @ state["fc.weight"].float().T + state["fc.bias"].float()
        return (logits.argmax(1) == _y[idx]).float()

per_example = PerExample()
"""


def test_cli_greedy_sequential_and_its_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _, xv, yv, _, _ = toy.problem()
    torch.save((xv, yv), tmp_path / "val.pt")
    (tmp_path / "seq_eval.py").write_text(EVAL_MODULE.format(data=str(tmp_path / "val.pt")))
    paths = [str(p.relative_to(tmp_path)) for p in toy.make_ingredients(tmp_path / "runs", KINDS)]
    base = ["greedy", "--evaluator", "seq_eval:per_example", "--no-cache", "--no-progress"]
    assert (
        main(
            base
            + [
                "--sequential",
                "--delta",
                "0.05",
                "--order-seed",
                "1",
                "--sequential-batch",
                "100",
                "--out",
                "soup",
                *paths,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "greedy soup (>=): 4 of 6 ingredients" in out and "discordant, error <=" in out
    assert "sequential decisions: delta 0.05 each, order seed 1; any of the 5 differs" in out
    g = json.loads((tmp_path / "soup" / "soupkit-report.json").read_text())["greedy"]
    assert g["sequential"]["batch"] == 100 and all(
        s["examples_used"] % 100 == 0 for s in g["steps"]
    )
    assert main(base + ["--delta", "0.05", "--out", "soup2", *paths]) == 2
    assert "--delta only apply with --sequential" in capsys.readouterr().err
    assert main(base + ["--sequential", "--delta", "2", "--out", "soup2", *paths]) == 2
    assert "delta must be in (0, 1), got 2.0" in capsys.readouterr().err


def test_plot_labels_are_cut_in_the_middle_and_titles_wrapped() -> None:
    from soupkit.search.report_plot import _ellipsize

    long = "hf-classification|/work/main/.cache/demo/standard/data/val.csv|max_length=64@0123456789abcdef"
    short = _ellipsize(long, 40)
    assert (
        len(short) == 40
        and short.startswith("hf-classification|/")
        and short.endswith("0123456789abcdef")
    )
    assert _ellipsize("short", 40) == "short"


# ---- sweeps with sequential decisions ------------------------------------------------------------


def _wise_pair(root: Path) -> tuple[Path, Path]:
    w = toy.problem()[0]
    e = 0.8 * torch.randn(toy.C, toy.D, generator=torch.Generator().manual_seed(4))
    zs = toy.write(root / "zs", {"fc.weight": w + e, "fc.bias": torch.zeros(toy.C)})
    ft = toy.write(root / "ft", {"fc.weight": w - e, "fc.bias": torch.zeros(toy.C)})
    return zs, ft


def test_sweep_sequential_picks_the_exact_best_point_on_fewer_examples(tmp_path: Path) -> None:
    from soupkit.search import sweep

    zs, ft = _wise_pair(tmp_path)
    _, xv, yv, xt, yt = toy.problem()
    values = [0.0, 0.25, 0.5, 0.75, 1.0]
    exact = sweep([ft], toy.Accuracy(xv, yv), values, base=zs)
    ev = toy.PerExampleAccuracy(xv, yv)
    r = sweep(
        [ft],
        ev,
        values,
        tmp_path / "wise",
        base=zs,
        sequential=True,
        delta=0.01,
        sequential_batch=50,
        shift_evaluator=toy.Accuracy(xt, yt, key="shift"),
    )
    assert r.best.value == exact.best.value == 0.5
    assert ev.examples == r.sequential["examples_evaluated"] < 0.6 * len(yv) * len(values)  # type: ignore[index]
    # every point was evaluated (nothing cached): 5 on the validation set, 5 on the shift set
    assert (r.evaluations, r.cache_hits) == (2 * len(values), 0)
    assert r.points[0].replaced_best is None and all(
        p.replaced_best is not None for p in r.points[1:]
    )
    assert all(p.error_bound <= 0.01 and 0 < p.examples <= len(yv) for p in r.points)
    assert [p.shift_score for p in r.points] == [
        q.score for q in sweep([ft], toy.Accuracy(xt, yt), values, base=zs).points
    ]
    report = json.loads((tmp_path / "wise" / "soupkit-report.json").read_text())["sweep"]
    assert report["decisions"] == "sequential" and report["best"]["value"] == 0.5
    assert {"examples", "examples_used", "better", "worse", "error_bound", "replaced_best"} <= set(
        report["points"][1]
    )


def test_cli_sweep_sequential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _, xv, yv, _, _ = toy.problem()
    torch.save((xv, yv), tmp_path / "val.pt")
    (tmp_path / "seq_eval.py").write_text(EVAL_MODULE.format(data=str(tmp_path / "val.pt")))
    _wise_pair(tmp_path)
    assert (
        main(
            [
                "sweep",
                "--base",
                "zs",
                "ft",
                "--values",
                "0:1:5",
                "--evaluator",
                "seq_eval:per_example",
                "--sequential",
                "--no-cache",
                "--out",
                "wise",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "best alpha=0.5" in out
        and "sequential decisions: delta 0.01 each" in out
        and "discordant" in out
    )
    assert (
        main(
            [
                "sweep",
                "--base",
                "zs",
                "ft",
                "--values",
                "0:1:5",
                "--evaluator",
                "seq_eval:per_example",
                "--order-seed",
                "3",
                "--no-cache",
                "--out",
                "wise2",
                "--no-progress",
            ]
        )
        == 2
    )
    assert "--order-seed only apply with --sequential" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("big_b", "big_a", "t"), [(20, 26, 0), (26, 20, 0), (20, 26, 1), (27, 20, 1), (20, 20, 0)]
)
def test_with_a_margin_the_error_rate_stays_under_delta_outside_the_zone(
    big_b: int, big_a: int, t: int
) -> None:
    # margin M = 5 examples: the zone is t - 6 < B - A < t + 5; just outside it, errors <= delta.
    delta, m = 0.1, 5
    err, _ = _simulate(
        400, big_b, big_a, t, delta, trials=2000, batch=40, seed=big_b + 7 * big_a + t, margin=m
    )
    if t - 1 - m < big_b - big_a < t + m:  # inside the zone: either decision is allowed
        return
    assert err <= delta + 3 * math.sqrt(delta * (1 - delta) / 2000)


def test_a_margin_decides_near_ties_earlier() -> None:
    # B - A = +1 of 39 discordant examples in 1,000: without a margin only (nearly) the end decides.
    _, used0 = _simulate(1000, 20, 19, 0, 0.05, trials=300, batch=100, seed=3)
    _, used1 = _simulate(1000, 20, 19, 0, 0.05, trials=300, batch=100, seed=3, margin=20)
    assert used1 < used0 - 100


def test_greedy_sequential_on_a_backend_makes_the_same_decisions_on_the_same_examples(
    tmp_path: Path,
) -> None:
    from soupkit.backends._worker import clear_caches

    paths = toy.make_ingredients(tmp_path, KINDS)
    _, xv, yv, xt, yt = toy.problem()
    kw = {"sequential": True, "delta": 0.01, "order_seed": 5, "sequential_batch": 50}
    here = greedy_soup(
        paths, toy.PerExampleAccuracy(xv, yv), test_evaluator=toy.Accuracy(xt, yt, key="t"), **kw
    )
    clear_caches()
    there = greedy_soup(
        paths,
        toy.PerExampleAccuracy(xv, yv),
        test_evaluator=toy.Accuracy(xt, yt, key="t"),
        backend=LocalBackend(),
        **kw,
    )
    assert there.ingredients == here.ingredients and there.score == here.score
    assert [
        (s.accepted, s.examples_used, s.better, s.worse, s.error_bound, s.examples, s.soup_examples)
        for s in there.steps
    ] == [
        (s.accepted, s.examples_used, s.better, s.worse, s.error_bound, s.examples, s.soup_examples)
        for s in here.steps
    ]
    assert there.examples_evaluated == here.examples_evaluated and there.held_out == here.held_out
    assert there.sequential == here.sequential and there.distributed is not None


def test_sweep_sequential_refuses_a_backend_before_starting_one(tmp_path: Path) -> None:
    from soupkit.search import sweep

    zs, ft = _wise_pair(tmp_path)
    _, xv, yv, _, _ = toy.problem()
    with pytest.raises(UsageError, match="sequential sweeps run in this process only"):
        sweep(
            [ft],
            toy.PerExampleAccuracy(xv, yv),
            [0.0, 1.0],
            base=zs,
            sequential=True,
            backend="ray",
        )


def test_sequential_batches_build_each_candidate_once_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each batch of examples is a job; the worker keeps the candidate's and the incumbent's
    # weights (the two the batches alternate between), so a step reads each of them once.
    from soupkit.backends import _worker

    builds: list[str] = []
    real = _worker.Worker._build

    def counted(self: _worker.Worker, job: Any) -> Any:
        builds.append(job.label)
        return real(self, job)

    monkeypatch.setattr(_worker.Worker, "_build", counted)
    paths = toy.make_ingredients(tmp_path, KINDS)
    _, xv, yv, _, _ = toy.problem()
    ev = toy.PerExampleAccuracy(xv, yv)
    r = greedy_soup(paths, ev, sequential=True, order_seed=3, sequential_batch=10)
    batches = sum(-(-(s.examples + s.soup_examples) // 10) for s in r.steps)
    steps = len(r.steps)
    assert batches > len(paths) + 2 * steps  # many batches per step ...
    assert len(builds) <= len(paths) + 2 * steps  # ... few reads: each state once per step
    assert len(set(builds)) == len(builds)  # no state built twice
