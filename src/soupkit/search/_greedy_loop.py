"""Greedy soup's accept / reject loop, run as evaluation jobs on a backend.

There is one loop, whatever runs the evaluations: without a backend, `greedy_soup` runs it on a
`soupkit.backends.LocalBackend` (one worker, this process); with Ray, on Ray workers. Planning
and hashing stay with the caller; this module makes the cache lookups, evaluations (as jobs),
labels and cache records, in an order that does not change any result:

* the ingredients alone, all at once (every one not in the cache);
* the accept / reject steps, exact (`soupkit.backends.greedy_loop`, with speculative
  evaluation of later steps when workers are idle) or sequential (each batch of examples a job,
  `soupkit.search._greedy_sequential`);
* the held-out test scores (the final soup and the best single ingredient) together.

Every finished score is written to the cache as it arrives, so a run that fails or is
interrupted keeps what it computed. Candidates are built by the worker (its running sum makes
``soup + next`` read one checkpoint; see `soupkit.backends._worker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from soupkit._util.progress import progress_bar
from soupkit.backends import (
    Backend,
    EvalJob,
    EvalRequest,
    Ingredient,
    RunLog,
    UniformSoup,
    greedy_loop,
    remote_evaluator,
    run_jobs,
)
from soupkit.evaluate.protocol import EvalResult, Evaluator
from soupkit.search._greedy_types import (
    GreedySoupResult,
    GreedyStep,
    HeldOutScores,
    IngredientScore,
    soup_key,
)
from soupkit.search.cache import ScoreCache

__all__ = ["GreedyRun", "greedy_exact"]


@dataclass
class _Counts:
    """What the evaluations of one run cost: evaluator calls, cache hits, examples evaluated and
    examples saved (early rejection or the sequential test)."""

    calls: int = 0
    hits: int = 0
    examples: int = 0
    saved: int = 0


class GreedyRun:
    """One greedy soup's evaluations on a backend: what to evaluate and how (checkpoints by
    label, resolved absolute path and content digest; evaluators and their cache identities; the
    rule), the jobs, the cache and what they cost. ``keep_going``: after a failed evaluation,
    run the independent others (ingredients) to the end, as on a cluster (False: stop at the
    first failure, as in this process)."""

    def __init__(
        self,
        be: Backend,
        labels: Sequence[str],
        paths: Sequence[str],
        digests: Sequence[str],
        store: ScoreCache,
        evaluator: Evaluator,
        eid: str,
        test_evaluator: Evaluator | None,
        tid: str | None,
        *,
        strict: bool,
        progress: bool | None,
        keep_going: bool = True,
    ) -> None:
        self.be, self.labels, self.digests, self.store = be, labels, digests, store
        self.evaluator, self.eid, self.test_evaluator, self.tid = (
            evaluator,
            eid,
            test_evaluator,
            tid,
        )
        self.strict, self.progress, self.keep_going = strict, progress, keep_going
        self.log = RunLog()
        self.log.start(be)
        self.ev = remote_evaluator(evaluator)
        self.paths = list(paths)
        self.counts = _Counts()

    def soup(self, members: Sequence[int]) -> UniformSoup:
        return UniformSoup(
            tuple(self.paths[j] for j in members), tuple(self.digests[j] for j in members)
        )

    def ingredient(self, i: int) -> Ingredient:
        return Ingredient(self.paths[i], self.digests[i])

    def first_of_each(self, todo: Sequence[int]) -> tuple[list[int], dict[int, list[int]]]:
        """``todo`` with one ingredient per content digest, and the later copies of each."""
        first: dict[str, int] = {}
        copies: dict[int, list[int]] = {}
        for i in todo:
            j = first.setdefault(self.digests[i], i)
            if j != i:
                copies.setdefault(j, []).append(i)
        return list(first.values()), copies

    def label(self, members: Sequence[int]) -> str:
        return "soup of " + " + ".join(self.labels[j] for j in members)

    def ranked(
        self, scores: Sequence[float], cached: Sequence[bool], metrics: Sequence[dict[str, float]]
    ) -> tuple[list[int], list[IngredientScore]]:
        """The ranking (score descending, ties in the order given) and the ingredients' scores."""
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        rank_of = {i: r for r, i in enumerate(order)}
        return order, [
            IngredientScore(
                i, self.labels[i], self.digests[i], scores[i], rank_of[i], cached[i], metrics[i]
            )
            for i in range(len(scores))
        ]

    def held_out(self, accepted: Sequence[int], best: int) -> HeldOutScores | None:
        """The final soup and the best single ingredient on the test set, together, through the
        cache (counted in ``counts``); None without a test evaluator."""
        test_evaluator, tid = self.test_evaluator, self.tid
        if test_evaluator is None:
            return None
        assert tid is not None
        tev = self.ev if test_evaluator is self.evaluator else remote_evaluator(test_evaluator)
        wanted = [
            (
                soup_key([self.digests[j] for j in accepted]),
                EvalJob(self.soup(accepted), (EvalRequest(tev, "final soup (test set)"),)),
            ),
            (
                self.digests[best],
                EvalJob(
                    self.ingredient(best),
                    (EvalRequest(tev, f"ingredient {self.labels[best]} (test set)"),),
                ),
            ),
        ]
        got: list[EvalResult | None] = [self.store.lookup(tid, subj) for subj, _ in wanted]
        self.counts.hits += sum(r is not None for r in got)
        missing = [k for k, r in enumerate(got) if r is None]

        def done(k: int, outcome: Any) -> None:
            j = missing[k]
            got[j] = res = outcome.results[0]
            self.store.store(tid, wanted[j][0], res, label=wanted[j][1].label)
            self.counts.calls += 1
            self.counts.examples += res.examples

        run_jobs(
            self.be,
            [wanted[k][1] for k in missing],
            done,
            log=self.log,
            keep_going=self.keep_going,
        )
        assert got[0] is not None and got[1] is not None
        return HeldOutScores(tid, got[0].score, self.labels[best], got[1].score)

    def result(
        self,
        accepted: Sequence[int],
        score: float,
        ingredient_scores: list[IngredientScore],
        steps: list[GreedyStep],
        held: HeldOutScores | None,
        sequential: dict[str, Any] | None = None,
    ) -> GreedySoupResult:
        c = self.counts
        return GreedySoupResult(
            ingredients=[self.labels[j] for j in accepted],
            score=score,
            ingredient_scores=ingredient_scores,
            steps=steps,
            strict=self.strict,
            evaluator=self.eid,
            evaluations=c.calls,
            cache_hits=c.hits,
            examples_evaluated=c.examples,
            examples_saved=c.saved,
            held_out=held,
            notes=self.log.notes(self.be),
            distributed=self.log.to_dict(self.be),
            sequential=sequential,
        )


def greedy_exact(run: GreedyRun, *, early_stop: bool, speculate: int | None) -> GreedySoupResult:
    """`greedy_soup` with the exact rule (and exact early rejection) on ``run.be``; ``speculate``:
    see `soupkit.backends.greedy_loop` (None: the backend's parallelism minus one)."""
    be, labels, digests, store, eid = run.be, run.labels, run.digests, run.store, run.eid
    strict, progress, c = run.strict, run.progress, run.counts
    # Ingredients alone: every one not in the cache at once (one job per content: a copy of an
    # ingredient is a cache hit, as if scored after it).
    cached = [store.lookup(eid, d) for d in digests]
    results = [(r, True) if r is not None else None for r in cached]
    todo, copies = run.first_of_each([i for i, r in enumerate(cached) if r is None])
    c.hits += len(labels) - len(todo)
    bar = progress_bar(len(labels), progress, "scoring ingredients")
    bar.update(len(labels) - len(todo) - sum(map(len, copies.values())))

    def scored(k: int, outcome: Any) -> None:
        i = todo[k]
        res = outcome.results[0]
        store.store(eid, digests[i], res, label=f"ingredient {labels[i]}")
        results[i] = (res, False)
        for j in copies.get(i, ()):
            results[j] = (res, True)
        c.calls += 1
        c.examples += res.examples
        bar.update(1 + len(copies.get(i, ())))

    try:
        run_jobs(
            be,
            [
                EvalJob(run.ingredient(i), (EvalRequest(run.ev, f"ingredient {labels[i]}"),))
                for i in todo
            ],
            scored,
            log=run.log,
            keep_going=run.keep_going,
        )
    finally:
        bar.close()
    done = [r for r in results if r is not None]
    scores = [r.score for r, _ in done]
    order, ingredient_scores = run.ranked(
        scores, [hit for _, hit in done], [dict(r.metrics) for r, _ in done]
    )

    def subject(members: Sequence[int]) -> str:
        return soup_key([digests[j] for j in members])

    bar = progress_bar(len(order) - 1, progress, "greedy soup")
    try:
        loop = greedy_loop(
            be,
            order,
            scores[order[0]],
            job=lambda m, need: EvalJob(
                run.soup(m), (EvalRequest(run.ev, run.label(m), need, strict),)
            ),
            lookup=lambda m, need: store.lookup(eid, subject(m), need=need, strict=strict),
            store=lambda m, res, need: store.store(
                eid, subject(m), res, label=run.label(m), need=need, strict=strict
            ),
            strict=strict,
            early_stop=early_stop,
            speculate=max(be.parallelism - 1, 0) if speculate is None else speculate,
            on_step=lambda _: bar.update(1),
            log=run.log,
        )
    finally:
        bar.close()
    steps: list[GreedyStep] = []
    size, soup_score = 1, scores[order[0]]
    for d in loop.decisions:
        if d.accepted:
            size, soup_score = size + 1, d.result.score
        steps.append(
            GreedyStep(
                rank=d.rank,
                label=labels[d.index],
                ingredient_score=scores[d.index],
                need=d.need,
                candidate_score=d.result.score,
                complete=d.result.complete,
                accepted=d.accepted,
                soup_size=size,
                soup_score=soup_score,
                examples=0 if d.cached else d.result.examples,
                total=d.result.total,
                cached=d.cached,
                examples_used=d.result.examples if d.result.examples else d.result.total,
            )
        )
    c.calls += loop.evaluations
    c.hits += loop.cache_hits
    c.examples += loop.examples
    c.saved += loop.saved
    held = run.held_out(loop.accepted, order[0])
    return run.result(loop.accepted, loop.score, ingredient_scores, steps, held)
