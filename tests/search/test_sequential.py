"""The paired sequential test: its error rate stays under delta, its decisions at the end are exact,
and greedy soup / sweeps use it through the CLI and the Python API."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soupkit.search.sequential import decide, decide_many, example_order, side_max_log_lik


def _brute_side(total: int, n: int, b: int, a: int, lo: int | None, hi: int | None) -> float:
    def lff(x: int, k: int) -> float:
        return -math.inf if x < k else math.lgamma(x + 1) - math.lgamma(x - k + 1)

    best = -math.inf
    for big_b in range(total + 1):
        for big_a in range(total + 1 - big_b):
            if (lo is not None and big_b - big_a < lo) or (hi is not None and big_b - big_a > hi):
                continue
            v = lff(total - big_a - big_b, n - a - b) + lff(big_b, b) + lff(big_a, a) - lff(total, n)
            best = max(best, v)
    return best


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_the_o_n_side_maximum_equals_brute_force(data: st.DataObject) -> None:
    total = data.draw(st.integers(1, 20))
    n = data.draw(st.integers(0, total))
    b = data.draw(st.integers(0, n))
    a = data.draw(st.integers(0, n - b))
    lo, hi = data.draw(st.sampled_from([(None, -1), (0, None), (None, 0), (1, None), (None, None), (-2, 3)]))
    got = float(side_max_log_lik(total, n, torch.tensor([b]), torch.tensor([a]), lo, hi)[0])
    want = _brute_side(total, n, b, a, lo, hi)
    assert (got == want == -math.inf) or got == pytest.approx(want, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.data(), st.sampled_from([0, 1]), st.sampled_from([0.001, 0.05, 0.3]))
def test_at_the_end_of_the_data_the_decision_is_the_exact_rule(total: int, data: st.DataObject,
                                                               t: int, delta: float) -> None:
    b = data.draw(st.integers(0, total))
    a = data.draw(st.integers(0, total - b))
    d = decide(total, total, b, a, delta=delta, threshold=t)
    assert d.accept == (b - a >= t) and d.error_bound == 0.0


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 200), st.data(), st.sampled_from([0, 1]))
def test_a_decision_the_remaining_examples_cannot_change_is_certain(total: int, data: st.DataObject, t: int) -> None:
    n = data.draw(st.integers(1, total - 1))
    b = data.draw(st.integers(0, n))
    a = data.draw(st.integers(0, n - b))
    d = decide(total, n, b, a, delta=0.01, threshold=t)
    rest = total - n
    if b - a - rest >= t:        # even if every remaining example goes to the soup: accepted
        assert d.accept is True and d.error_bound == 0.0
    elif b - a + rest < t:       # even if every remaining example goes to the candidate: rejected
        assert d.accept is False and d.error_bound == 0.0
    if d.accept is not None:     # a decision is never against the data
        assert d.error_bound <= 0.01


def test_decisions_are_symmetric_between_candidate_and_incumbent() -> None:
    # Swapping the roles (better <-> worse) with threshold t <-> 1 - t mirrors the decision.
    for total, n, b, a in [(500, 100, 20, 3), (500, 100, 3, 20), (800, 300, 40, 30), (200, 150, 9, 9)]:
        d0 = decide(total, n, b, a, delta=0.05, threshold=0)
        d1 = decide(total, n, a, b, delta=0.05, threshold=1)
        assert (d0.accept is None) == (d1.accept is None)
        if d0.accept is not None:
            assert d0.accept != d1.accept
            assert d0.error_bound == pytest.approx(d1.error_bound)


def _simulate(total: int, big_b: int, big_a: int, t: int, delta: float, trials: int, batch: int,
              seed: int) -> tuple[float, float]:
    """Run the test on ``trials`` random orders of one urn; ``(error rate, mean examples used)``."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.zeros(total, dtype=torch.int64)          # 0 concordant, 1 better, 2 worse
    kinds[:big_b] = 1
    kinds[big_b:big_b + big_a] = 2
    perms = torch.stack([kinds[torch.randperm(total, generator=g)] for _ in range(trials)])
    cb = torch.cumsum(perms == 1, dim=1)
    ca = torch.cumsum(perms == 2, dim=1)
    truth = big_b - big_a >= t
    verdict = torch.zeros(trials, dtype=torch.int8)        # 0 undecided, 1 accept, -1 reject
    used = torch.full((trials,), total, dtype=torch.int64)
    lf = torch.lgamma(torch.arange(total + 1, dtype=torch.float64) + 1)
    for n in range(batch, total, batch):
        live = verdict == 0
        if not bool(live.any()):
            break
        acc, rej, _ = decide_many(total, n, cb[live, n - 1], ca[live, n - 1], delta=delta, threshold=t, lf=lf)
        idx = torch.nonzero(live)[:, 0]
        newly = acc | rej
        verdict[idx[acc]] = 1
        verdict[idx[rej]] = -1
        used[idx[newly]] = n
    verdict[verdict == 0] = 1 if truth else -1             # the end of the data: exact
    wrong = (verdict == -1) if truth else (verdict == 1)
    return float(wrong.float().mean()), float(used.float().mean())


@pytest.mark.parametrize(("big_b", "big_a", "t"), [
    (20, 20, 0),   # the boundary for >=: equal accuracy is accepted; rejecting is the error
    (19, 20, 0),   # one example short: rejecting is right, accepting the error
    (20, 20, 1),   # the boundary for > : equal accuracy is rejected
    (21, 20, 1),
    (60, 45, 0),   # a real but small difference
    (45, 60, 0),
    (5, 0, 0),     # few discordant examples
])
def test_error_rate_stays_under_delta_at_and_near_the_boundary(big_b: int, big_a: int, t: int) -> None:
    delta = 0.1    # a large delta, so that a too-liberal test would show in 2,000 orders
    err, used = _simulate(400, big_b, big_a, t, delta, trials=2000, batch=20, seed=big_b * 100 + big_a + t)
    # 2,000 Bernoulli(<= 0.1) draws: the mean exceeds 0.1 + 3 standard errors with probability < 0.2 %.
    assert err <= delta + 3 * math.sqrt(delta * (1 - delta) / 2000), (err, used)


def test_clear_differences_stop_early_and_stay_correct() -> None:
    err, used = _simulate(2000, 120, 20, 0, 0.01, trials=500, batch=100, seed=1)
    assert err <= 0.01 and used < 1000
    err, used = _simulate(2000, 20, 120, 0, 0.01, trials=500, batch=100, seed=2)
    assert err <= 0.01 and used < 1000


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
    assert sorted(a) == list(range(1000)) and a == example_order(1000, 3) and a != example_order(1000, 4)
    assert example_order(5, 0) == [2, 1, 0, 4, 3]   # pinned: Python's random.Random(0).shuffle

