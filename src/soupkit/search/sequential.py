"""Paired sequential decisions: accept / reject a candidate on as few examples as the evidence allows.

**What is decided.** A candidate and an incumbent (greedy soup: the current soup; sweep: the best
grid point so far) are compared on the same ``N`` evaluation examples. Each example is
*concordant* (both right or both wrong), *better* (only the candidate right) or *worse* (only
the incumbent right). Over the whole set, with ``B`` better and ``A`` worse examples, the
candidate's accuracy minus the incumbent's is ``(B - A) / N``, so the exact (full-set) rule is::

    accept  <=>  B - A >= t        t = 0 for greedy soup's ``>=`` (the paper), 1 for ``>``

(``t = 1`` also for a sweep, where a later grid point must be strictly better to replace an
earlier one). The sequential test decides *this* exact full-set decision, the one the exact
mode makes, not a statement about some larger population: the only randomness is the order in
which the examples are evaluated, a uniformly random permutation fixed by a seed.

**The test**: a betting martingale for sampling without replacement (Waudby-Smith & Ramdas,
"Estimating means of bounded random variables by betting", JRSS-B 2023,
https://arxiv.org/abs/2010.09686, Section 6). The examples, in the seeded random order, are
draws without replacement from the ``N`` paired differences ``Z = cand - inc`` in ``{-1, 0, 1}``,
whose total is ``B - A``. Under a hypothesised total ``T``, the mean of the examples not yet
drawn before draw ``i`` is::

    mu_i(T) = (T - S_{i-1}) / (N - i + 1)          S_{i-1} = Z_1 + ... + Z_{i-1}

and ``E[Z_i | past] = mu_i(B - A)``. For a bet ``lambda_i >= 0`` chosen from the past only,
the wealth::

    K_n(T) = prod_{i <= n} (1 + lambda_i (Z_i - mu_i(T)))

has ``E[factor | past] = 1 + lambda_i (mu_i(B - A) - mu_i(T)) <= 1`` whenever ``B - A <= T``:
it is a nonnegative supermartingale with ``K_0 = 1`` under every total at or below ``T``. By
Ville's inequality ``P(exists n: K_n(T) >= 1/delta) <= delta``, for every stopping rule. The
mirror bet ``prod (1 - lambda_i (Z_i - mu_i(T')))`` does the same for every total at or above
``T'``. The test stops at the first check where

* **not worse** (accept): the wealth against ``T = t - 1`` (every "worse" total) reached
  ``1/delta``, or no "worse" total is possible any more (``S_n - (N - n) >= t``);
* **worse** (reject): the mirror wealth against ``T' = t`` reached ``1/delta``, or no "not
  worse" total is possible (``S_n + (N - n) < t``);
* otherwise it continues; at ``n = N`` the total is known and the decision is exactly the exact
  mode's.

The bets are the aGRAPA rule of the paper (``lambda_i = (m - mu_i) / (v + (m - mu_i)^2)`` from
the running mean ``m`` and variance ``v`` of the past differences, clipped to ``[0, 0.75 /
(1 + mu_i)]`` so that a factor never reaches 0); concordant examples (``Z = 0``) cost almost
nothing, so the evidence grows with the discordant examples, as in McNemar's test.

**The error bound.** For every candidate and every threshold rule, whatever the candidate,
``P(sequential decision != exact full-set decision) <= delta`` over the random order (a wrong
accept needs ``K_n(t - 1) >= 1/delta`` while ``B - A <= t - 1``, and vice versa). Ties are not
special: ``B = A`` is an accept for ``>=`` and a reject for ``>``, and the bound holds at that
boundary too (the property tests simulate it, and check ``E[K_n] <= 1`` exactly on small urns).
With ``K`` sequential decisions in one search, the chance that any of them differs from the
exact mode's is at most ``K * delta`` (union bound); a differing decision changes the path of a
greedy soup from there on. Each step reports ``error_bound = 1 / max K`` of the side it
excluded (an anytime-valid p-value, ``<= delta``; 0 when the remaining examples could no longer
change the decision).

**Indifference margin** (optional, ``margin`` = ``M`` examples, e.g. half a point of accuracy:
``M = floor(0.005 * N)``). Candidates that differ from the incumbent by a fraction of a point
can only be told apart near the end of the data. With a margin the two bets are placed against
``T = t - 1 - M`` (clearly worse) and ``T' = t + M`` (clearly not worse); the test stops once
either wins (both: the difference is inside the zone, and the rule's tie side is taken: accept
for ``>=``, reject for ``>``). The bound then reads: *whenever the full-set difference is outside
the zone* (``B - A <= t - 1 - M`` or ``B - A >= t + M``), ``P(decision != exact decision) <=
delta``; inside the zone, where the two differ by less than ``M / N`` in accuracy, either
decision may be taken. ``M = 0`` (the default) is the exact target.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from soupkit.errors import EvaluationError

__all__ = [
    "PairedDecision",
    "SequentialOptions",
    "decide",
    "decide_many",
    "example_order",
    "log_wealth",
]

PAPER = (
    "betting martingale for sampling without replacement, Waudby-Smith & Ramdas, JRSS-B 2023, "
    "https://arxiv.org/abs/2010.09686"
)


@dataclass(frozen=True)
class SequentialOptions:
    """Settings of paired sequential decisions.

    Attributes:
        delta: the error probability of each decision (against the exact full-set decision).
        seed: fixes the evaluation order (a uniformly random permutation of the examples).
        batch: examples evaluated between two checks of the test.
        margin: indifference margin in accuracy (0.005 = half a point); 0 decides the exact rule.
    """

    delta: float = 0.01
    seed: int = 0
    batch: int = 128
    margin: float = 0.0

    def margin_examples(self, total: int) -> int:
        """``M``: the margin in examples of a set of ``total`` (accuracy points times examples)."""
        return math.floor(self.margin * total + 1e-9)

    def report(self, examples: int, decisions: int) -> dict[str, Any]:
        """The report's ``"sequential"`` entries for ``decisions`` decisions on ``examples`` examples."""
        return {
            "delta": self.delta,
            "seed": self.seed,
            "batch": self.batch,
            "margin": self.margin,
            "test": PAPER,
            "examples": examples,
            "any_decision_differs_at_most": min(1.0, self.delta * max(decisions, 0)),
            "order": "uniformly random permutation of the examples, fixed by the seed",
            "bound_applies": (
                "to every decision"
                if self.margin == 0
                else "to decisions whose full-set difference is outside the margin"
            ),
        }


@dataclass(frozen=True)
class PairedDecision:
    """The state of a paired comparison after ``n`` examples.

    Attributes:
        accept: True (not worse), False (worse) or None (undecided: continue).
        n: examples compared.
        better: examples only the candidate gets right.
        worse: examples only the incumbent gets right.
        error_bound: for a decision, ``1 / max K`` of the side it excluded (<= delta; 0 when
            certain); for no decision, the smaller of the two sides' values.
    """

    accept: bool | None
    n: int
    better: int
    worse: int
    error_bound: float


def example_order(n: int, seed: int) -> list[int]:
    """The evaluation order: a uniformly random permutation of ``range(n)`` fixed by ``seed``
    (Python's Mersenne Twister, so it is the same on every platform and torch version)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


_CAP = 0.75  # largest bet, as a fraction of the one that could lose everything on one example


def log_wealth(z: torch.Tensor, total: int, target: int, sign: float) -> torch.Tensor:
    """``log K_i`` for i = 1..n of the bet against the total ``target`` (see the module docstring).

    Args:
        z: paired differences in draw order, ``[T, n]`` (float64, values in {-1, 0, 1}).
        total: N.
        target: the hypothesised total ``T`` of all N differences.
        sign: ``+1`` bets that the total is above ``target`` (wealth grows when it is: rejects
            every total ``<= target``); ``-1`` the mirror.

    Returns:
        ``[T, n]`` float64 log-wealth after each draw.
    """
    rows, n = z.shape
    zero = torch.zeros(rows, 1, dtype=torch.float64)
    prev = torch.cat([zero, torch.cumsum(z, 1)[:, :-1]], 1)  # S_{i-1}
    prev_sq = torch.cat([zero, torch.cumsum(z * z, 1)[:, :-1]], 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)[None, :]
    mu = (target - prev) / (total - i + 1)  # mean of the undrawn, under T
    mean = prev / i  # past mean, shrunk towards 0
    var = ((prev_sq + 0.25) / i - mean * mean).clamp(min=1e-3)
    gap = sign * (mean - mu)
    lam = (gap / (var + gap * gap)).clamp(min=0.0)
    # 1 + sign * lam * (z - mu) >= 1 - CAP for every z in [-1, 1]
    reach = (1.0 + sign * mu).clamp(min=1e-12)
    lam = torch.minimum(lam, _CAP / reach)
    lam = torch.where(mu.abs() >= 1.0, torch.zeros_like(lam), lam)  # nothing left to win (or lose)
    return torch.cumsum(torch.log1p(sign * lam * (z - mu)), 1)


def decide_many(
    total: int, z: torch.Tensor, *, delta: float, threshold: int, margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised :func:`decide` over rows of ``z`` (``[T, n]``): ``(accept, reject, error_bound)``."""
    z = z.to(torch.float64)
    rows, n = z.shape
    if n == 0:
        return (
            torch.zeros(rows, dtype=torch.bool),
            torch.zeros(rows, dtype=torch.bool),
            torch.ones(rows, dtype=torch.float64),
        )
    s = z.sum(1)
    rest = total - n
    up = (
        log_wealth(z, total, threshold - 1 - margin, 1.0).max(1).values
    )  # against every "worse" total
    down = (
        log_wealth(z, total, threshold + margin, -1.0).max(1).values
    )  # against every "not worse" total
    level = math.log(1.0 / delta)
    sure_acc = s - rest >= threshold  # even if every remaining example went to the incumbent
    sure_rej = s + rest < threshold  # even if every remaining example went to the candidate
    accept = sure_acc | ((up >= level) & ~sure_rej)
    reject = sure_rej | ((down >= level) & ~sure_acc)
    if threshold >= 1:  # both bets won (only with a margin): inside the zone, the rule's tie side
        accept = accept & ~reject
    else:
        reject = reject & ~accept
    p_acc = torch.where(sure_acc, torch.zeros_like(up), torch.exp(-up.clamp(min=0.0)))
    p_rej = torch.where(sure_rej, torch.zeros_like(down), torch.exp(-down.clamp(min=0.0)))
    bound = torch.where(accept, p_acc, torch.where(reject, p_rej, torch.minimum(p_acc, p_rej)))
    return accept, reject, bound


def decide(
    total: int, z: torch.Tensor, *, delta: float, threshold: int, margin: int = 0
) -> PairedDecision:
    """Test after the differences ``z`` (candidate minus incumbent, in draw order) of ``total``.

    Args:
        total: N, the examples in the evaluation set.
        z: the paired differences (-1, 0, 1) of the examples compared so far, in the seeded
            random order.
        delta: error probability, in (0, 1).
        threshold: ``t``: the exact rule accepts when ``B - A >= t``.
        margin: ``M``, the indifference zone in examples (see the module docstring); 0: none.

    Returns:
        A `PairedDecision`; at ``len(z) == total`` always decided, exactly as the full-set rule.
    """
    n = len(z)
    better, worse = int((z > 0).sum()), int((z < 0).sum())
    if n >= total:
        return PairedDecision(better - worse >= threshold, n, better, worse, 0.0)
    acc, rej, bound = decide_many(
        total, z.reshape(1, -1), delta=delta, threshold=threshold, margin=margin
    )
    verdict = True if bool(acc[0]) else (False if bool(rej[0]) else None)
    return PairedDecision(verdict, n, better, worse, float(bound[0]))


def check_binary(values: torch.Tensor, indices: Sequence[int], who: str) -> None:
    """Raise `EvaluationError` unless every value is 0 or 1 (the test needs correctness)."""
    bad = ~((values == 0) | (values == 1))
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0])
        raise EvaluationError(
            f"evaluating {who}: per_example returned {float(values[k])!r} for example {indices[k]}; the "
            "sequential test needs 0/1 correctness per example\nhint: leave out --sequential (the exact "
            "mode) for scores that are not accuracies, or return 1.0 for a correct and 0.0 for a wrong example"
        )
