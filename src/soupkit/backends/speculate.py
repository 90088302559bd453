"""Greedy soup's accept / reject loop on a backend, with exact speculative evaluation.

The loop itself is sequential: step ``r`` tries the ingredient of rank ``r`` against the soup
that steps ``1..r-1`` produced, and keeps it if ``meets(candidate_score, soup_score)``. Each
decision only depends on the scores before it, so this module makes *the same decisions in the
same order* as the local loop, whatever order results come back in.

**Speculation.** While step ``r``'s candidate is being evaluated, idle workers can evaluate
the candidates of later steps under each hypothesis about the pending decisions. The
hypotheses form a binary tree: below a step, *reject* keeps the soup (the next candidate is
``soup + next``) and *accept* adds the ingredient (the next candidate is
``soup + this + next``). Up to ``speculate`` extra jobs run at once, chosen breadth first from
the current step (nearest steps first). Of the two branches, the one the last decision took goes
first (accept before the first decision): ingredients are tried best first, so decisions come in
runs, typically accepts then rejects. When a decision is made, every job under the
branch not taken is stale: queued ones are dropped, running ones are cancelled (on Ray, an
actor finishes the evaluator call it is in, so a stale evaluation keeps its worker busy until
then; hence the default of one speculative job per idle worker), finished ones are kept only in
the score cache. The numbers of speculative jobs used, wasted and cancelled are
reported.

Exactness: a candidate is always judged against the soup score the sequential loop would use,
with the same acceptance test, so accepted ingredients, scores and the written soup are those
of the local run. One visible difference is possible with early rejection: a candidate
evaluated before its threshold was known (the accept branch) is evaluated fully, so its step
shows the full score (``complete=True``) where the local run may show the early-stop bound; the
decision is the same (`soupkit.evaluate.protocol` guarantees a bound is rejected only if the
full score is). With ``speculate=0`` nothing is evaluated ahead and the history is identical.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from soupkit.backends.jobs import EvalJob, JobOutcome
from soupkit.backends.run import Backend, RunLog
from soupkit.errors import EvaluationError
from soupkit.evaluate.protocol import EvalResult, meets

__all__ = ["Decision", "GreedyLoop", "greedy_loop"]

Soup = tuple[int, ...]


@dataclass(frozen=True)
class Decision:
    """One step of the loop.

    Attributes:
        rank: the rank of the ingredient tried (1 = second best).
        index: the ingredient's index in the list given.
        need: the soup's score before the step.
        result: the candidate's result.
        cached: the result came from the score cache.
        accepted: the ingredient joined the soup.
    """

    rank: int
    index: int
    need: float
    result: EvalResult
    cached: bool
    accepted: bool


@dataclass(frozen=True)
class GreedyLoop:
    """The loop's outcome: ``accepted`` (indices in recipe order), the soup's ``score``, every
    ``decision``, and the counts a `GreedySoupResult` reports."""

    accepted: list[int]
    score: float
    decisions: list[Decision]
    evaluations: int
    cache_hits: int
    examples: int
    saved: int


@dataclass
class _Node:
    soup: Soup  # the candidate: the soup's ingredients plus the one tried
    need_sent: float | None  # the threshold its job was given (None: full evaluation)
    speculative: bool
    handle: int | None = None
    result: EvalResult | None = None
    outcome: JobOutcome | None = None
    error: EvaluationError | None = None
    cached: bool = False
    rechecked: bool = False


def greedy_loop(
    backend: Backend,
    order: Sequence[int],
    first_score: float,
    *,
    job: Callable[[Soup, float | None], EvalJob],
    lookup: Callable[[Soup, float | None], EvalResult | None],
    store: Callable[[Soup, EvalResult, float | None], None],
    strict: bool = False,
    early_stop: bool = True,
    speculate: int = 0,
    on_step: Callable[[Decision], None] | None = None,
    log: RunLog | None = None,
) -> GreedyLoop:
    """Run greedy soup's decisions for ingredients ranked ``order`` (best first).

    Args:
        backend: where candidates are evaluated.
        order: ingredient indices, best first; ``order[0]`` starts the soup.
        first_score: the score of ``order[0]`` alone.
        job: ``job(candidate, need)``: the `EvalJob` evaluating the uniform soup of
            ``candidate`` (ingredient indices in recipe order) with threshold ``need``.
        lookup: ``lookup(candidate, need)``: a cached result giving the decision a fresh
            evaluation would give against ``need`` (``None``: only complete results), or None.
        store: ``store(candidate, result, need)``: record a fresh result in the cache.
        strict: acceptance is ``>`` instead of ``>=``.
        early_stop: pass thresholds to the evaluator (exact early rejection).
        speculate: how many jobs may run ahead of the current step (0: none).
        on_step: called after each decision.
        log: counts jobs, speculation and time.

    Returns:
        A `GreedyLoop`.

    Raises:
        EvaluationError: the evaluation of a candidate the loop needed failed. A speculative
            evaluation that fails raises only if its step is reached.
    """
    n = len(order)
    rank_of = {i: r for r, i in enumerate(order)}
    soup: Soup = (order[0],)
    soup_score = first_score
    r = 1
    nodes: dict[Soup, _Node] = {}
    inflight: dict[int, Soup] = {}
    decisions: list[Decision] = []
    last_accepted = True  # which branch speculation tries first: the last decision's
    evaluations = hits = examples = saved = 0
    t0 = time.perf_counter()

    def need_of(acc: Soup) -> float | None:
        if acc == soup:
            return soup_score
        nd = nodes.get(acc)
        return nd.result.score if nd is not None and nd.result is not None else None

    def consistent(cand: Soup) -> bool:
        """Whether ``cand`` is still evaluated on some path the pending decisions may take."""
        s_end = rank_of[cand[-1]]
        if s_end < r or cand[: len(soup)] != soup:
            return False
        extra = cand[len(soup) : -1]
        if any(rank_of[j] < r for j in extra):
            return False
        acc = soup
        for s in range(r, s_end):
            j = order[s]
            hyp = j in extra
            nd = nodes.get(acc + (j,))
            need = need_of(acc)
            if nd is not None and nd.result is not None and need is not None:
                if meets(nd.result.score, need, strict=strict) != hyp:
                    return False
            acc = acc + (j,) if hyp else acc
        return True

    def frontier() -> list[tuple[Soup, Soup]]:
        """Live candidates breadth first from the current step: ``(candidate, its soup)``."""
        out: list[tuple[Soup, Soup]] = []
        queue: deque[tuple[Soup, int, int]] = deque([(soup, r, 0)])
        while queue and len(out) < 64 + 4 * speculate:
            acc, s, d = queue.popleft()
            if s >= n:
                continue
            cand = acc + (order[s],)
            out.append((cand, acc))
            if d >= speculate:
                continue
            nd = nodes.get(cand)
            need = need_of(acc)
            if nd is not None and nd.result is not None and need is not None:
                queue.append(
                    (cand if meets(nd.result.score, need, strict=strict) else acc, s + 1, d + 1)
                )
            else:
                branches = [(cand, s + 1, d + 1), (acc, s + 1, d + 1)]
                queue.extend(branches if last_accepted else branches[::-1])
        return out

    def submit(cand: Soup, need: float | None, speculative: bool) -> _Node:
        nd = _Node(cand, need, speculative)
        nd.handle = backend.submit(job(cand, need))
        inflight[nd.handle] = cand
        nodes[cand] = nd
        if log is not None:
            log.jobs += 1
            log.speculative_launched += int(speculative)
        return nd

    def fill() -> None:
        budget = 1 + speculate - len(inflight)
        if budget <= 0:
            return
        for cand, acc in frontier():
            if budget <= 0:
                break
            if cand in nodes:
                continue
            need = need_of(acc) if early_stop else None
            hit = lookup(cand, need)
            if hit is not None:
                nodes[cand] = _Node(cand, need, True, result=hit, cached=True)
                continue
            submit(cand, need, True)
            budget -= 1

    def retire(cand: Soup) -> None:
        """A node the decisions made stale: keep its result in the cache, count the waste."""
        nd = nodes.pop(cand)
        if nd.handle is not None and nd.handle in inflight:
            inflight.pop(nd.handle)
            backend.cancel(nd.handle)
            if log is not None:
                log.cancelled += 1
            return
        if nd.error is not None and log is not None:
            log.failed_speculative += 1
        if nd.outcome is not None and nd.result is not None:
            store(cand, nd.result, nd.need_sent)
            if log is not None:
                log.finished(nd.outcome, used=False)

    try:
        while r < n:
            cand = soup + (order[r],)
            need = soup_score
            eff = need if early_stop else None
            nd = nodes.get(cand)
            if nd is None:
                hit = lookup(cand, eff)
                nd = (
                    _Node(cand, eff, False, result=hit, cached=True)
                    if hit is not None
                    else submit(cand, eff, False)
                )
                nodes[cand] = nd
            elif not nd.cached and not nd.rechecked and nd.need_sent is None and eff is not None:
                nd.rechecked = True
                # Evaluated ahead before its threshold was known: the local loop would have asked
                # the cache with the threshold, which may hold an early-stop record for it.
                hit = lookup(cand, eff)
                if hit is not None:
                    if nd.handle is not None and nd.handle in inflight:
                        inflight.pop(nd.handle)
                        backend.cancel(nd.handle)
                        if log is not None:
                            log.cancelled += 1
                    elif nd.outcome is not None and log is not None:
                        log.finished(nd.outcome, used=False)
                    nd = nodes[cand] = _Node(cand, eff, nd.speculative, result=hit, cached=True)
            if nd.result is None and nd.error is None:
                fill()
                for h in backend.wait(list(inflight)):
                    done = nodes[inflight.pop(h)]
                    try:
                        done.outcome = backend.result(h)
                        done.result = done.outcome.results[0]
                    except EvaluationError as e:
                        done.error = e
                    if not consistent(done.soup):
                        retire(done.soup)
                continue
            if nd.error is not None:
                raise nd.error
            assert nd.result is not None
            res = nd.result
            ok = meets(res.score, need, strict=strict)
            if nd.cached:
                hits += 1
            else:
                store(cand, res, nd.need_sent)
                evaluations += 1
                examples += res.examples
                if not res.complete and res.total:
                    saved += res.total - res.examples
                if log is not None and nd.outcome is not None:
                    log.finished(nd.outcome, used=True)
            if log is not None and nd.speculative and not nd.cached:
                log.speculative_used += 1
            step = Decision(r, order[r], need, res, nd.cached, ok)
            decisions.append(step)
            del nodes[cand]
            if ok:
                soup, soup_score = cand, res.score
            last_accepted = ok
            r += 1
            for other in [c for c in nodes if not consistent(c)]:
                retire(other)
            if on_step is not None:
                on_step(step)
    finally:
        for h in list(inflight):  # an error or an interruption: stop what is still running
            backend.cancel(h)
        if log is not None:
            log.wall_seconds += time.perf_counter() - t0
            log.speculate = speculate
    return GreedyLoop(list(soup), soup_score, decisions, evaluations, hits, examples, saved)
