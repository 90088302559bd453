"""Paired sequential comparisons through a `PerExampleEvaluator` and the score cache.

The decision rule and its error bound are in `soupkit.search.sequential`; this module feeds it:
it evaluates examples in the seeded order, in batches, for the candidate and (where not yet
known) for the incumbent, keeps every per-example result in the score cache, and counts the
examples it evaluated. Known per-example results (from the cache, or from an earlier step: the
current soup's correctness is known wherever it was evaluated) are never evaluated again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from soupkit.errors import EvaluationError, UsageError
from soupkit.evaluate.protocol import EvalResult, Evaluator, PerExampleEvaluator
from soupkit.search.cache import ScoreCache
from soupkit.search.sequential import (
    SequentialOptions,
    check_binary,
    decide,
    example_order,
)

StateFn = Callable[[], Mapping[str, torch.Tensor]]


def require_per_example(
    evaluator: Evaluator, opts: SequentialOptions, *, check_evaluator: bool = True
) -> int:
    """The number of examples, or a `UsageError` when ``evaluator`` cannot do sequential decisions
    (``check_evaluator=False``: only the options are checked, and 0 is returned; on a backend the
    workers build the evaluator and check it there)."""
    if not 0.0 < opts.delta < 1.0 or math.isnan(opts.delta):
        raise UsageError(f"delta must be in (0, 1), got {opts.delta!r}\nhint: e.g. --delta 0.01")
    if not 0.0 <= opts.margin < 1.0 or math.isnan(opts.margin):
        raise UsageError(
            f"the indifference margin must be in [0, 1) (accuracy points), got {opts.margin!r}\n"
            "hint: e.g. --margin 0.005 for half a point; 0 decides the exact rule"
        )
    if opts.batch < 1:
        raise UsageError(f"the sequential batch must be 1 or more examples, got {opts.batch}")
    if not check_evaluator:
        return 0
    if not isinstance(evaluator, PerExampleEvaluator):
        name = getattr(evaluator, "__qualname__", type(evaluator).__qualname__)
        raise UsageError(
            f"sequential decisions need per-example scores, but evaluator {name} has no "
            "per_example(state, indices) / n_examples()\nhint: use the built-in --hf-classification "
            "(accuracy), add those two methods to your evaluator (see docs/soups.md), or drop "
            "--sequential for the exact mode"
        )
    try:
        n = int(evaluator.n_examples())
    except Exception as e:
        raise EvaluationError(f"evaluator n_examples() failed: {type(e).__name__}: {e}") from e
    if n < 1:
        raise EvaluationError(f"evaluator n_examples() returned {n}; expected a positive count")
    return n


@dataclass(frozen=True)
class PairedOutcome:
    """One candidate against the incumbent.

    Attributes:
        accept: the decision (candidate not worse / better, per the threshold).
        examples: examples behind the decision (a prefix of the seeded order).
        better, worse: discordant counts over those examples.
        error_bound: see `PairedDecision` (0 when decided at the end of the data).
        score, incumbent_score: the mean per-example scores of both on those examples.
        fresh: candidate examples evaluated now; ``incumbent_fresh``: the incumbent's.
    """

    accept: bool
    examples: int
    total: int
    better: int
    worse: int
    error_bound: float
    score: float
    incumbent_score: float
    fresh: int
    incumbent_fresh: int


class PairedRunner:
    """Evaluates subjects (content keys) per example in the seeded order, through the cache."""

    def __init__(
        self,
        evaluator: PerExampleEvaluator | None,
        eid: str,
        cache: ScoreCache,
        opts: SequentialOptions,
        total: int,
        remote: Callable[[Any, list[int], str], torch.Tensor] | None = None,
    ) -> None:
        self.evaluator, self.eid, self.cache, self.opts, self.total = (
            evaluator,
            eid,
            cache,
            opts,
            total,
        )
        # On a backend, ``remote(candidate, indices, label)`` scores examples in a job and the
        # "states" passed to `full` / `compare` are job candidates, not state functions.
        self.remote = remote
        self.order = example_order(total, opts.seed)
        self.order_t = torch.tensor(self.order, dtype=torch.int64)
        self.evaluated = 0
        self.calls = 0
        self.touched: set[str] = set()  # subjects with examples evaluated now (not cached)

    def _fill(
        self,
        subject: str,
        values: torch.Tensor,
        want: list[int],
        state: Callable[[], Mapping[str, torch.Tensor]],
        label: str,
    ) -> int:
        missing = [i for i in want if math.isnan(float(values[i]))]
        if not missing:
            return 0
        who = f"candidate {label!r}"
        try:
            if self.remote is not None:
                got = self.remote(state, missing, label)
            else:
                assert self.evaluator is not None
                got = self.evaluator.per_example(state(), missing)
        except EvaluationError as e:
            if self.remote is not None:
                raise
            raise EvaluationError(f"evaluating {who} failed: {e}") from e
        except Exception as e:
            raise EvaluationError(
                f"evaluating {who} failed: per_example raised {type(e).__name__}: {e}\n"
                "hint: per_example(state, indices) must return one score per index"
            ) from e
        if not isinstance(got, torch.Tensor) or got.shape != (len(missing),):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise EvaluationError(
                f"evaluating {who}: per_example returned {shape} for {len(missing)} examples; "
                "expected a 1-D tensor with one score per index"
            )
        got = got.detach().to(torch.float64).cpu()
        check_binary(got, missing, who)
        values[torch.tensor(missing, dtype=torch.int64)] = got
        self.evaluated += len(missing)
        self.calls += 1
        self.touched.add(subject)
        return len(missing)

    def full(self, subject: str, state: StateFn, label: str) -> tuple[EvalResult, int]:
        """Every example of ``subject`` (an ingredient): ``(result, examples evaluated now)``."""
        values = self.cache.examples(self.eid, subject, self.total)
        memo = _Memo(state) if self.remote is None else None
        try:
            fresh = self._fill(
                subject, values, self.order, memo if memo is not None else state, label
            )
        finally:
            if memo is not None:
                memo.clear()
        if fresh:
            self.cache.store_examples(self.eid, subject, values, label=label)
        score = float(values.sum()) / self.total
        return EvalResult(score, fresh, self.total, True, {"accuracy": score}), fresh

    def compare(
        self,
        cand: str,
        cand_state: StateFn,
        cand_label: str,
        inc: str,
        inc_state: StateFn,
        inc_label: str,
        threshold: int,
    ) -> PairedOutcome:
        """Evaluate ``cand`` (and ``inc`` where unknown) batch by batch until the test decides."""
        cv = self.cache.examples(self.eid, cand, self.total)
        iv = self.cache.examples(self.eid, inc, self.total)
        cmemo: Any = _Memo(cand_state) if self.remote is None else cand_state
        imemo: Any = _Memo(inc_state) if self.remote is None else inc_state
        fresh = inc_fresh = pos = 0
        try:
            while True:
                nxt = min(self.total, pos + self.opts.batch)
                chunk = self.order[pos:nxt]
                inc_fresh += self._fill(inc, iv, chunk, imemo, inc_label)
                fresh += self._fill(cand, cv, chunk, cmemo, cand_label)
                pos = nxt
                seen = self.order_t[:pos]
                d = decide(
                    self.total,
                    cv[seen] - iv[seen],
                    delta=self.opts.delta,
                    threshold=threshold,
                    margin=self.opts.margin_examples(self.total),
                )
                if d.accept is not None:
                    break
        finally:
            if self.remote is None:
                cmemo.clear()
                imemo.clear()
            if fresh:
                self.cache.store_examples(self.eid, cand, cv, label=cand_label)
            if inc_fresh:
                self.cache.store_examples(self.eid, inc, iv, label=inc_label)
        return PairedOutcome(
            d.accept,
            pos,
            self.total,
            d.better,
            d.worse,
            d.error_bound,
            float(cv[seen].mean()),
            float(iv[seen].mean()),
            fresh,
            inc_fresh,
        )

    def known_score(self, subject: str) -> tuple[float, int]:
        """The mean over the examples of ``subject`` known so far, and how many those are."""
        v = self.cache.examples(self.eid, subject, self.total)
        known = ~torch.isnan(v)
        k = int(known.sum())
        return (float(v[known].mean()) if k else math.nan), k


class _Memo:
    """Builds a state at most once, on first use; ``clear`` frees it."""

    def __init__(self, fn: StateFn) -> None:
        self.fn = fn
        self.state: Mapping[str, torch.Tensor] | None = None

    def __call__(self) -> Mapping[str, torch.Tensor]:
        if self.state is None:
            self.state = self.fn()
        return self.state

    def clear(self) -> None:
        self.state = None
