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

**The test** (Waudby-Smith & Ramdas, "Confidence sequences for sampling without replacement",
NeurIPS 2020, https://arxiv.org/abs/2006.04347, the prior-posterior-ratio martingale, Sec. 3).
The evaluated examples are draws *without replacement* from an urn of ``N`` balls of three
colours, ``theta = (C, B, A)`` (concordant, better, worse). After ``n`` draws with counts
``(c, b, a)`` the probability of the observed sequence is::

    L_n(theta) = [C]_c [B]_b [A]_a / [N]_n          ([x]_k = x (x-1) ... (x-k+1), falling factorial)

With the prior ``theta ~ DirichletMultinomial(N; 1, 1, 1)`` the marginal probability of the
sequence is the Polya-urn probability::

    m_n = Gamma(3) / Gamma(3 + n) * Gamma(1 + c) Gamma(1 + b) Gamma(1 + a)

and for the true ``theta*`` the ratio ``M_n(theta*) = m_n / L_n(theta*)`` (prior over posterior
of ``theta*``) is a nonnegative martingale with ``M_0 = 1``. By Ville's inequality,
``P(exists n: M_n(theta*) >= 1/delta) <= delta``, for every stopping rule. The test stops at
the first check where one side is excluded:

* **not worse** (accept) once every ``theta`` with ``B - A <= t - 1`` has ``M_n(theta) >= 1/delta``;
* **worse** (reject) once every ``theta`` with ``B - A >= t`` has ``M_n(theta) >= 1/delta``;
* otherwise it continues; at ``n = N`` every ``theta`` but the true one has ``L_N = 0``, so the
  decision at the end of the data is exactly the exact mode's.

**The error bound.** For every candidate and every threshold rule, whatever the candidate,
``P(sequential decision != exact full-set decision) <= delta`` over the random order (a wrong
accept needs ``M_n(theta*) >= 1/delta`` with ``theta*`` in the reject set, and vice versa).
Ties are not special: ``B = A`` is an accept for ``>=`` and a reject for ``>``, and the bound
holds at that boundary too (the property tests simulate it). With ``K`` sequential decisions in
one search, the chance that any of them differs from the exact mode's is at most ``K * delta``
(union bound); a differing decision changes the path of a greedy soup from there on. Each step
reports ``error_bound = max over the excluded side of 1 / M_n(theta)`` (an anytime-valid
p-value, ``<= delta``; 0 when the remaining examples can no longer change the decision).

**Indifference margin** (optional, ``margin`` = ``M`` examples, e.g. half a point of accuracy:
``M = floor(0.005 * N)``). Candidates that differ from the incumbent by a fraction of a point
can only be told apart near the end of the data. With a margin, the two sides shrink to
``B - A <= t - 1 - M`` (clearly worse) and ``B - A >= t + M`` (clearly not worse); the test
stops once either is excluded (both excluded: the difference is inside the zone, and the rule's
tie side is taken: accept for ``>=``, reject for ``>``). The bound then reads: *whenever the
full-set difference is outside the zone* (``B - A <= t - 1 - M`` or ``B - A >= t + M``),
``P(decision != exact decision) <= delta``; inside the zone, where the two differ by less than
``M / N`` in accuracy, either decision may be taken. ``M = 0`` (the default) is the exact target.

The maximum over a side is exact and takes ``O(N)``: for a fixed number ``D = A + B`` of
discordant examples, ``[B]_b [D - B]_a`` is log-concave in ``B`` with its unconstrained maximum
at ``B* = floor((b D - a) / (a + b)) + 1`` (clipped to ``[b, D - a]``), so the constrained
maximum is at ``B*`` moved to the side's boundary.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PairedDecision", "SequentialOptions", "decide", "example_order", "log_marginal", "side_max_log_lik"]

PAPER = "Waudby-Smith & Ramdas 2020, https://arxiv.org/abs/2006.04347 (prior-posterior-ratio martingale)"


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
        return int(math.floor(self.margin * total + 1e-9))

    def to_dict(self) -> dict[str, object]:
        return {"delta": self.delta, "seed": self.seed, "batch": self.batch, "margin": self.margin,
                "test": PAPER}


@dataclass(frozen=True)
class PairedDecision:
    """The state of a paired comparison after ``n`` examples.

    Attributes:
        accept: True (not worse), False (worse) or None (undecided: continue).
        n: examples compared.
        better: examples only the candidate gets right.
        worse: examples only the incumbent gets right.
        error_bound: for a decision, ``max 1/M_n`` over the excluded side (<= delta; 0 when
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


def _log_fact(n: int) -> torch.Tensor:
    """``log k!`` for k = 0..n, float64."""
    return torch.lgamma(torch.arange(n + 1, dtype=torch.float64) + 1)


def _logff(lf: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``log [x]_k`` (falling factorial), ``-inf`` where ``x < k``."""
    ok = x >= k
    xs = torch.where(ok, x, k)
    out = lf[xs] - lf[xs - k]
    return torch.where(ok, out, torch.full_like(out, -math.inf))


def log_marginal(n: int, better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """``log m_n``: the Polya-urn (Dirichlet-multinomial, alpha = 1, 1, 1) probability of an
    observed sequence with these counts (concordant = n - better - worse)."""
    b = better.to(torch.float64)
    a = worse.to(torch.float64)
    c = n - a - b
    return (math.lgamma(3.0) - math.lgamma(3.0 + n) + torch.lgamma(c + 1) + torch.lgamma(b + 1)
            + torch.lgamma(a + 1))


def side_max_log_lik(total: int, n: int, better: torch.Tensor, worse: torch.Tensor, lo: int | None,
                     hi: int | None, lf: torch.Tensor | None = None) -> torch.Tensor:
    """``max log L_n(theta)`` over urns with ``lo <= B - A <= hi`` (either may be None: unbounded),
    vectorised over the counts (1-D tensors of equal length); ``-inf`` where no urn is possible.

    Args:
        total: N, the examples in the evaluation set.
        n: examples drawn so far.
        better, worse: observed counts ``b``, ``a`` (int64 tensors, shape ``[T]``).
        lo, hi: the side, on ``B - A``.
        lf: ``log k!`` for k = 0..total (computed if not given).
    """
    if lf is None:
        lf = _log_fact(total)
    shape = (len(better), total + 1)
    b = better.to(torch.int64)[:, None].expand(shape)
    a = worse.to(torch.int64)[:, None].expand(shape)
    c = n - a - b
    d = torch.arange(total + 1, dtype=torch.int64)[None, :].expand(shape)   # D = A + B
    feasible = (d >= a + b) & (d <= total - c)
    # Unconstrained maximiser of [B]_b [D-B]_a: B* = floor((bD - a)/(a+b)) + 1 (any B if a+b = 0).
    den = torch.clamp(a + b, min=1)
    bstar = torch.where(a + b > 0, torch.div(b * d - a, den, rounding_mode="floor") + 1, b)
    low = b
    high = d - a
    if lo is not None:   # B - A >= lo  <=>  B >= ceil((D + lo) / 2)
        low = torch.maximum(low, torch.div(d + lo + 1, 2, rounding_mode="floor"))
    if hi is not None:   # B - A <= hi  <=>  B <= floor((D + hi) / 2)
        high = torch.minimum(high, torch.div(d + hi, 2, rounding_mode="floor"))
    feasible &= low <= high
    bb = torch.minimum(torch.maximum(bstar, low), high)
    bb = torch.where(feasible, bb, b)
    dd = torch.where(feasible, d, a + b)
    ll = _logff(lf, total - dd, c) + _logff(lf, bb, b) + _logff(lf, dd - bb, a) - (lf[total] - lf[total - n])
    ll = torch.where(feasible, ll, torch.full_like(ll, -math.inf))
    return ll.max(dim=1).values


def decide_many(total: int, n: int, better: torch.Tensor, worse: torch.Tensor, *, delta: float,
                threshold: int, lf: torch.Tensor | None = None, margin: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised :func:`decide`: ``(accept, reject, error_bound)`` tensors over the counts."""
    if lf is None:
        lf = _log_fact(total)
    key = better.to(torch.int64) * (total + 1) + worse.to(torch.int64)
    uniq, inverse = torch.unique(key, return_inverse=True)
    if len(uniq) < len(key):   # many orders share counts: decide each distinct pair once
        acc, rej, bound = decide_many(total, n, uniq // (total + 1), uniq % (total + 1), delta=delta,
                                      threshold=threshold, lf=lf, margin=margin)
        return acc[inverse], rej[inverse], bound[inverse]
    lm = log_marginal(n, better, worse)
    rej_side = side_max_log_lik(total, n, better, worse, None, threshold - 1 - margin, lf)   # "worse" urns
    acc_side = side_max_log_lik(total, n, better, worse, threshold + margin, None, lf)       # "not worse" urns
    log_delta = math.log(delta)
    accept = rej_side - lm <= log_delta
    reject = acc_side - lm <= log_delta
    if threshold >= 1:   # both sides excluded (only with a margin): inside the zone, the rule's tie side
        accept = accept & ~reject
    p_acc = torch.exp(torch.clamp(rej_side - lm, max=0.0))
    p_rej = torch.exp(torch.clamp(acc_side - lm, max=0.0))
    bound = torch.where(accept, p_acc, torch.where(reject, p_rej, torch.minimum(p_acc, p_rej)))
    return accept, reject & ~accept, bound


def decide(total: int, n: int, better: int, worse: int, *, delta: float, threshold: int,
           margin: int = 0) -> PairedDecision:
    """Test after ``n`` of ``total`` examples (see the module docstring).

    Args:
        total: N, the examples in the evaluation set.
        n: examples compared so far (a uniformly random subset, evaluated in random order).
        better: of those, examples only the candidate gets right.
        worse: examples only the incumbent gets right.
        delta: error probability, in (0, 1).
        threshold: ``t``: the exact rule accepts when ``B - A >= t``.
        margin: ``M``, the indifference zone in examples (see the module docstring); 0: none.

    Returns:
        A `PairedDecision`; at ``n == total`` always decided, exactly as the full-set rule.
    """
    if n >= total:
        ok = better - worse >= threshold
        return PairedDecision(ok, n, better, worse, 0.0)
    acc, rej, bound = decide_many(total, n, torch.tensor([better]), torch.tensor([worse]), delta=delta,
                                  threshold=threshold, margin=margin)
    verdict = True if bool(acc[0]) else (False if bool(rej[0]) else None)
    return PairedDecision(verdict, n, better, worse, float(bound[0]))


def counts(cand: torch.Tensor, inc: torch.Tensor) -> tuple[int, int]:
    """``(better, worse)``: examples only ``cand`` / only ``inc`` gets right (0/1 tensors)."""
    return int(((cand > 0.5) & (inc < 0.5)).sum()), int(((cand < 0.5) & (inc > 0.5)).sum())


def check_binary(values: torch.Tensor, indices: Sequence[int], who: str) -> None:
    """Raise `EvaluationError` unless every value is 0 or 1 (the test needs correctness)."""
    from soupkit.errors import EvaluationError

    bad = ~((values == 0) | (values == 1))
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0, 0])
        raise EvaluationError(
            f"evaluating {who}: per_example returned {float(values[k])!r} for example {indices[k]}; the "
            "sequential test needs 0/1 correctness per example\nhint: use --exact (the default) for "
            "scores that are not accuracies, or return 1.0 for a correct and 0.0 for a wrong example")
