"""Greedy soup with paired sequential decisions, run as evaluation jobs on a backend.

The same loop as `soupkit.search._greedy_loop` (and the same `GreedyRun`: jobs, cache, counts), with
each step decided by the paired sequential test (`soupkit.search.sequential`) on batches of
examples, each batch a job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from soupkit._util.progress import progress_bar
from soupkit.backends import EvalJob, EvalRequest, run_jobs
from soupkit.errors import EvaluationError
from soupkit.search._greedy_loop import GreedyRun
from soupkit.search._greedy_types import GreedySoupResult, GreedyStep, soup_key
from soupkit.search._paired import PairedRunner
from soupkit.search.sequential import SequentialOptions, check_binary

__all__ = ["greedy_sequential"]


def greedy_sequential(run: GreedyRun, opts: SequentialOptions) -> GreedySoupResult:
    """`greedy_soup(..., sequential=True)` on ``run.be``: every batch of examples is a job.

    The ingredients' per-example scores are computed all at once (jobs asking for every
    example); then the steps run in order, each batch of the candidate (and, where not yet
    known, of the soup) a job on a worker that builds the soup itself (its running sum makes
    ``soup + next`` cheap, and it keeps the two states the batches alternate between). No
    speculation: a batch decides whether the next one is needed.
    """
    be, labels, digests, store, eid = run.be, run.labels, run.digests, run.store, run.eid
    strict, progress, c = run.strict, run.progress, run.counts

    keep: tuple[Any, ...] = ()  # the step's weights worth keeping on the worker

    def one(candidate: Any, indices: Sequence[int], label: str) -> torch.Tensor:
        request = EvalRequest(run.ev, label, indices=tuple(indices))
        out = run_jobs(be, [EvalJob(candidate, (request,), keep=keep)], log=run.log)[0]
        vals = out.values[0] if out.values else None
        if vals is None or len(vals) != len(indices):
            raise EvaluationError(
                f"evaluating candidate {label!r}: the worker returned "
                f"{0 if vals is None else len(vals)} per-example scores for {len(indices)} examples"
            )
        return torch.tensor(vals, dtype=torch.float64)

    # Ingredients: every example of every one not fully known, all at once; this also tells the
    # number of examples (the evaluator may be built on the workers only).
    known = [store.examples_of(eid, d) for d in digests]
    todo, copies = run.first_of_each(
        [i for i, v in enumerate(known) if v is None or bool(torch.isnan(v).any())]
    )
    bar = progress_bar(len(labels), progress, "scoring ingredients")
    bar.update(len(labels) - len(todo) - sum(map(len, copies.values())))
    fresh_ing: dict[int, int] = {}

    def scored(k: int, outcome: Any) -> None:
        i = todo[k]
        vals = torch.tensor(outcome.values[0], dtype=torch.float64)
        check_binary(vals, range(len(vals)), f"candidate 'ingredient {labels[i]}'")
        old = known[i]
        fresh_ing[i] = (
            len(vals) if old is None or len(old) != len(vals) else int(torch.isnan(old).sum())
        )
        known[i] = vals
        for j in copies.get(i, ()):
            known[j] = vals
        store.store_examples(eid, digests[i], vals, label=f"ingredient {labels[i]}")
        bar.update(1 + len(copies.get(i, ())))

    try:
        run_jobs(
            be,
            [
                EvalJob(
                    run.ingredient(i),
                    (EvalRequest(run.ev, f"ingredient {labels[i]}", indices=()),),
                )
                for i in todo
            ],
            scored,
            log=run.log,
            keep_going=run.keep_going,
        )
    finally:
        bar.close()
    sizes = {len(v) for v in known if v is not None}
    if len(sizes) != 1:
        raise EvaluationError(
            f"the ingredients' per-example results have different lengths {sorted(sizes)}\n"
            "hint: every candidate must be scored on the same examples"
        )
    total = sizes.pop()
    c.calls, c.hits = len(todo), len(labels) - len(todo)
    c.examples = sum(fresh_ing.values())
    scores = [float(v.sum()) / total for v in known if v is not None]
    order, ingredient_scores = run.ranked(
        scores, [i not in fresh_ing for i in range(len(labels))], [{"accuracy": x} for x in scores]
    )
    runner = PairedRunner(None, eid, store, opts, total, remote=one)

    def soup_of(members: Sequence[int]) -> Any:
        return run.ingredient(members[0]) if len(members) == 1 else run.soup(members)

    accepted = [order[0]]
    soup_score = scores[order[0]]
    steps: list[GreedyStep] = []
    bar = progress_bar(len(order) - 1, progress, "greedy soup")
    try:
        for rank, i in enumerate(order[1:], start=1):
            cand, soup = soup_of([*accepted, i]), soup_of(accepted)
            # The soup's weights are needed again only where its examples are not all known.
            soup_known = store.examples(eid, _soup_subject(accepted, digests), total)
            keep = (cand, soup) if bool(torch.isnan(soup_known).any()) else (cand,)
            step = _sequential_step(
                runner, run, rank, i, accepted, scores, cand, soup, soup_score, strict
            )
            if step.accepted:
                accepted.append(i)
                soup_score = step.soup_score
            steps.append(step)
            bar.update(1)
    finally:
        bar.close()
    final, known_examples = runner.known_score(_soup_subject(accepted, digests))
    info = {**opts.report(runner.total, len(steps)), "score_examples": known_examples}
    held = run.held_out(accepted, order[0])
    return run.result(accepted, final, ingredient_scores, steps, held, info)


def _soup_subject(accepted: Sequence[int], digests: Sequence[str]) -> str:
    """The incumbent's cache subject: the ingredient's digest alone, else the soup's key."""
    return digests[accepted[0]] if len(accepted) == 1 else soup_key([digests[j] for j in accepted])


def _sequential_step(
    runner: PairedRunner,
    run: GreedyRun,
    rank: int,
    i: int,
    accepted: Sequence[int],
    scores: Sequence[float],
    cand: Any,
    soup: Any,
    soup_score: float,
    strict: bool,
) -> GreedyStep:
    """One greedy step by the paired sequential test (the caller adds the ingredient if
    accepted); ``cand`` / ``soup`` are the job candidates; ``run.counts`` counts the work."""
    digests, c = run.digests, run.counts
    po = runner.compare(
        soup_key([digests[j] for j in accepted] + [digests[i]]),
        cand,
        run.label([*accepted, i]),
        _soup_subject(accepted, digests),
        soup,
        run.label(accepted),
        1 if strict else 0,
    )
    c.examples += po.fresh + po.incumbent_fresh
    c.saved += po.total - po.examples - po.incumbent_fresh
    c.calls += int(po.fresh > 0)
    c.hits += int(po.fresh == 0)
    return GreedyStep(
        rank=rank,
        label=run.labels[i],
        ingredient_score=scores[i],
        need=po.incumbent_score,
        candidate_score=po.score,
        complete=po.examples == po.total,
        accepted=po.accept,
        soup_size=len(accepted) + int(po.accept),
        soup_score=po.score if po.accept else soup_score,
        examples=po.fresh,
        total=po.total,
        cached=po.fresh == 0,
        test="sequential",
        examples_used=po.examples,
        better=po.better,
        worse=po.worse,
        error_bound=po.error_bound,
        soup_examples=po.incumbent_fresh,
    )
