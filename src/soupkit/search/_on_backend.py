"""Greedy soup and sweeps on a backend (`soupkit.backends`): the job path of `greedy_soup` and `sweep`.

`greedy_soup(..., backend=...)` and `sweep(..., backend=...)` call these after planning and
hashing, which stay on the driver. They make the same cache lookups, evaluations (as jobs),
labels and cache records as the in-process code, in an order that does not change any result:

* greedy soup: the ingredients alone all at once; then the accept / reject loop, sequential and
  exact, with speculative evaluation of later steps (`soupkit.backends.greedy_loop`); then the
  held-out test scores (the final soup and the best single ingredient) together;
* sweep: every grid point at once, each point merged once on a worker and scored by both
  evaluators (in-distribution and shifted) there.

Every finished score is written to the cache as it arrives, so a run that fails or is
interrupted keeps what it computed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from soupkit.backends import (
    Backend,
    EvalJob,
    EvalRequest,
    Ingredient,
    RecipeMerge,
    RunLog,
    UniformSoup,
    greedy_loop,
    remote_evaluator,
    run_jobs,
)
from soupkit.errors import EvaluationError
from soupkit.evaluate.protocol import EvalResult, Evaluator
from soupkit.io.checkpoint import Checkpoint
from soupkit.recipe.schema import MergeConfig
from soupkit.search._paired import PairedRunner
from soupkit.search._state import progress_bar
from soupkit.search.cache import ScoreCache
from soupkit.search.greedy import (
    GreedySoupResult,
    GreedyStep,
    HeldOutScores,
    IngredientScore,
    _Scorer,
    sequential_step,
    sequential_summary,
    soup_key,
)
from soupkit.search.sequential import SequentialOptions, check_binary
from soupkit.search.sweeps import SweepPoint

__all__ = ["greedy_on_backend", "greedy_sequential_on_backend", "sweep_on_backend"]


def greedy_on_backend(
    be: Backend,
    ckpts: Sequence[Checkpoint],
    labels: list[str],
    digests: list[str],
    evaluator: Evaluator,
    eid: str,
    test_evaluator: Evaluator | None,
    tid: str | None,
    store: ScoreCache,
    *,
    strict: bool,
    early_stop: bool,
    speculate: int | None,
    progress: bool | None,
) -> GreedySoupResult:
    """`greedy_soup`'s evaluations as jobs on a backend: the same lookups, evaluations, labels and
    cache records as the in-process path, so the same decisions and scores."""
    log = RunLog()
    log.start(be)
    ev = remote_evaluator(evaluator)
    paths = [os.path.abspath(lab) for lab in labels]
    calls = hits = examples = 0

    def soup_job(members: Sequence[int], label: str, need: float | None, rev: Any) -> EvalJob:
        return EvalJob(
            UniformSoup(tuple(paths[j] for j in members), tuple(digests[j] for j in members)),
            (EvalRequest(rev, label, need, strict),),
        )

    # Ingredients alone: every one not in the cache at once.
    results: list[tuple[EvalResult, bool] | None] = [None] * len(ckpts)
    todo = []
    for i, digest in enumerate(digests):
        got = store.lookup(eid, digest)
        if got is not None:
            results[i] = (got, True)
            hits += 1
        else:
            todo.append(i)
    bar = progress_bar(len(ckpts), progress, "scoring ingredients")
    bar.update(len(ckpts) - len(todo))

    def scored(k: int, outcome: Any) -> None:
        i = todo[k]
        res = outcome.results[0]
        store.store(eid, digests[i], res, label=f"ingredient {labels[i]}")
        results[i] = (res, False)
        bar.update(1)

    try:
        run_jobs(
            be,
            [
                EvalJob(Ingredient(paths[i]), (EvalRequest(ev, f"ingredient {labels[i]}"),))
                for i in todo
            ],
            scored,
            log=log,
        )
    finally:
        bar.close()
    calls += len(todo)
    examples += sum(r[0].examples for r in results if r is not None and not r[1])
    scores = [r[0].score for r in results if r is not None]
    order = sorted(range(len(ckpts)), key=lambda i: (-scores[i], i))
    rank_of = {i: r for r, i in enumerate(order)}
    ingredient_scores = [
        IngredientScore(
            i,
            labels[i],
            digests[i],
            scores[i],
            rank_of[i],
            results[i][1],
            dict(results[i][0].metrics),
        )  # type: ignore[index]
        for i in range(len(ckpts))
    ]

    def soup_label(members: Sequence[int]) -> str:
        return "soup of " + " + ".join(labels[j] for j in members)

    def subject(members: Sequence[int]) -> str:
        return soup_key([digests[j] for j in members])

    bar = progress_bar(len(order) - 1, progress, "greedy soup")
    try:
        loop = greedy_loop(
            be,
            order,
            scores[order[0]],
            job=lambda c, need: soup_job(c, soup_label(c), need, ev),
            lookup=lambda c, need: store.lookup(eid, subject(c), need=need, strict=strict),
            store=lambda c, res, need: store.store(
                eid, subject(c), res, label=soup_label(c), need=need, strict=strict
            ),
            strict=strict,
            early_stop=early_stop,
            speculate=max(be.parallelism - 1, 0) if speculate is None else speculate,
            on_step=lambda _: bar.update(1),
            log=log,
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
    calls, hits, examples = (
        calls + loop.evaluations,
        hits + loop.cache_hits,
        examples + loop.examples,
    )

    held: HeldOutScores | None = None
    if test_evaluator is not None:
        assert tid is not None
        held, k_calls, k_hits, k_examples = _held_out(
            be,
            log,
            store,
            ev,
            evaluator,
            test_evaluator,
            tid,
            paths,
            digests,
            labels,
            loop.accepted,
            order[0],
        )
        calls, hits, examples = calls + k_calls, hits + k_hits, examples + k_examples

    notes = log.notes(be)
    return GreedySoupResult(
        ingredients=[labels[j] for j in loop.accepted],
        score=loop.score,
        ingredient_scores=ingredient_scores,
        steps=steps,
        strict=strict,
        evaluator=eid,
        evaluations=calls,
        cache_hits=hits,
        examples_evaluated=examples,
        examples_saved=loop.saved,
        held_out=held,
        notes=notes,
        distributed=log.to_dict(be),
    )


def greedy_sequential_on_backend(
    be: Backend,
    ckpts: Sequence[Checkpoint],
    labels: list[str],
    digests: list[str],
    evaluator: Evaluator,
    eid: str,
    test_evaluator: Evaluator | None,
    tid: str | None,
    store: ScoreCache,
    opts: SequentialOptions,
    *,
    strict: bool,
    progress: bool | None,
) -> GreedySoupResult:
    """`greedy_soup(..., sequential=True)` on a backend: every batch of examples is a job.

    The ingredients' per-example scores are computed all at once (jobs asking for every
    example); then the steps run in order, as in this process, each batch of the candidate (and,
    where not yet known, of the soup) a job on a worker that builds the soup itself (its running
    sum cache makes ``soup + next`` cheap). The same examples, counts and decisions as the
    in-process path. No speculation: a batch decides whether the next one is needed.
    """
    log = RunLog()
    log.start(be)
    ev = remote_evaluator(evaluator)
    paths = [os.path.abspath(lab) for lab in labels]

    def one(candidate: Any, indices: Sequence[int], label: str) -> torch.Tensor:
        out = run_jobs(
            be, [EvalJob(candidate, (EvalRequest(ev, label, indices=tuple(indices)),))], log=log
        )[0]
        vals = out.values[0] if out.values else None
        if vals is None or len(vals) != len(indices):
            raise EvaluationError(
                f"evaluating candidate {label!r}: the worker returned "
                f"{0 if vals is None else len(vals)} per-example scores for {len(indices)} examples"
            )
        return torch.tensor(vals, dtype=torch.float64)

    # Ingredients: every example of every one not fully known, all at once; this also tells the
    # number of examples (the evaluator is only built on the workers).
    known = [store.examples_of(eid, d) for d in digests]
    todo = [i for i, v in enumerate(known) if v is None or bool(torch.isnan(v).any())]
    bar = progress_bar(len(ckpts), progress, "scoring ingredients")
    bar.update(len(ckpts) - len(todo))
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
        store.store_examples(eid, digests[i], vals, label=f"ingredient {labels[i]}")
        bar.update(1)

    try:
        run_jobs(
            be,
            [
                EvalJob(
                    Ingredient(paths[i]), (EvalRequest(ev, f"ingredient {labels[i]}", indices=()),)
                )
                for i in todo
            ],
            scored,
            log=log,
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
    score = _Scorer(evaluator, eid, store)
    score.calls, score.hits = len(todo), len(ckpts) - len(todo)
    score.examples = sum(fresh_ing.values())
    scores = [float(v.sum()) / total for v in known if v is not None]
    order = sorted(range(len(ckpts)), key=lambda i: (-scores[i], i))
    rank_of = {i: r for r, i in enumerate(order)}
    ingredient_scores = [
        IngredientScore(
            i,
            labels[i],
            digests[i],
            scores[i],
            rank_of[i],
            i not in fresh_ing,
            {"accuracy": scores[i]},
        )
        for i in range(len(ckpts))
    ]
    runner = PairedRunner(None, eid, store, opts, total, remote=one)

    def soup_of(members: Sequence[int]) -> Any:
        if len(members) == 1:
            return Ingredient(paths[members[0]])
        return UniformSoup(tuple(paths[j] for j in members), tuple(digests[j] for j in members))

    accepted = [order[0]]
    soup_score = scores[order[0]]
    steps: list[GreedyStep] = []
    bar = progress_bar(len(order) - 1, progress, "greedy soup (sequential)")
    try:
        for rank, i in enumerate(order[1:], start=1):
            step = sequential_step(
                runner,
                score,
                rank,
                i,
                accepted,
                labels,
                digests,
                scores,
                soup_of([*accepted, i]),
                soup_of(accepted),
                soup_score,
                strict,
            )
            if step.accepted:
                accepted.append(i)
                soup_score = step.soup_score
            steps.append(step)
            bar.update(1)
    finally:
        bar.close()
    soup_score, seq_info = sequential_summary(runner, accepted, digests, len(steps))

    held: HeldOutScores | None = None
    if test_evaluator is not None:
        assert tid is not None
        held, k_calls, k_hits, k_examples = _held_out(
            be,
            log,
            store,
            ev,
            evaluator,
            test_evaluator,
            tid,
            paths,
            digests,
            labels,
            accepted,
            order[0],
        )
        score.calls, score.hits, score.examples = (
            score.calls + k_calls,
            score.hits + k_hits,
            score.examples + k_examples,
        )

    return GreedySoupResult(
        ingredients=[labels[j] for j in accepted],
        score=soup_score,
        ingredient_scores=ingredient_scores,
        steps=steps,
        strict=strict,
        evaluator=eid,
        evaluations=score.calls,
        cache_hits=score.hits,
        examples_evaluated=score.examples,
        examples_saved=score.saved,
        held_out=held,
        notes=log.notes(be),
        distributed=log.to_dict(be),
        sequential=seq_info,
    )


def _held_out(
    be: Backend,
    log: RunLog,
    store: ScoreCache,
    ev: Any,
    evaluator: Evaluator,
    test_evaluator: Evaluator,
    tid: str,
    paths: Sequence[str],
    digests: Sequence[str],
    labels: Sequence[str],
    accepted: Sequence[int],
    best: int,
) -> tuple[HeldOutScores, int, int, int]:
    """The final soup and the best single ingredient on the test set, together, through the cache:
    ``(scores, evaluations, cache hits, examples)``."""
    tev = ev if test_evaluator is evaluator else remote_evaluator(test_evaluator)
    wanted = [
        (
            soup_key([digests[j] for j in accepted]),
            EvalJob(
                UniformSoup(tuple(paths[j] for j in accepted), tuple(digests[j] for j in accepted)),
                (EvalRequest(tev, "final soup (test set)"),),
            ),
        ),
        (
            digests[best],
            EvalJob(
                Ingredient(paths[best]),
                (EvalRequest(tev, f"ingredient {labels[best]} (test set)"),),
            ),
        ),
    ]
    held_res: list[EvalResult | None] = [store.lookup(tid, subj) for subj, _ in wanted]
    hits = sum(r is not None for r in held_res)
    missing = [k for k, r in enumerate(held_res) if r is None]

    def held_done(k: int, outcome: Any) -> None:
        j = missing[k]
        held_res[j] = outcome.results[0]
        store.store(tid, wanted[j][0], outcome.results[0], label=wanted[j][1].label)

    run_jobs(be, [wanted[k][1] for k in missing], held_done, log=log)
    assert held_res[0] is not None and held_res[1] is not None
    examples = sum(r.examples for k, r in enumerate(held_res) if k in missing and r is not None)
    return (
        HeldOutScores(tid, held_res[0].score, labels[best], held_res[1].score),
        len(missing),
        hits,
        examples,
    )


def sweep_on_backend(
    be: Backend,
    name: str,
    param: str,
    values: Sequence[float],
    recipes: Sequence[MergeConfig],
    keys: Sequence[str],
    evaluator: Evaluator,
    eid: str,
    shift_evaluator: Evaluator | None,
    sid: str | None,
    store: ScoreCache,
    *,
    progress: bool | None,
) -> tuple[list[SweepPoint], int, int, dict[str, Any], list[str]]:
    """`sweep`'s grid points as jobs: ``(points, evaluations, cache_hits, distributed, notes)``."""
    log = RunLog()
    log.start(be)
    ev = remote_evaluator(evaluator)
    sev = None
    if shift_evaluator is not None:
        sev = ev if shift_evaluator is evaluator else remote_evaluator(shift_evaluator)
    got: list[dict[str, EvalResult]] = [{} for _ in values]
    fresh = [0] * len(values)
    hits = 0
    jobs: list[EvalJob] = []
    owners: list[tuple[int, list[str]]] = []
    for k, (v, cfg, key) in enumerate(zip(values, recipes, keys)):
        label = f"{name} {param}={v:g}"
        wanted = [(eid, ev, label)] + (
            [(sid, sev, label + " (shift set)")] if sid is not None else []
        )
        reqs, idents = [], []
        for ident, rev, lab in wanted:
            assert ident is not None and rev is not None
            res = store.lookup(ident, key)
            if res is not None:
                hits += 1
                got[k][ident] = res
            else:
                reqs.append(EvalRequest(rev, lab))
                idents.append(ident)
        if reqs:
            jobs.append(EvalJob(RecipeMerge.from_config(cfg), tuple(reqs)))
            owners.append((k, idents))
    bar = progress_bar(len(values), progress, f"sweep {param}")
    bar.update(len(values) - len(jobs))

    def done(j: int, outcome: Any) -> None:
        k, idents = owners[j]
        for ident, req, res in zip(idents, jobs[j].requests, outcome.results):
            store.store(ident, keys[k], res, label=req.label)
            got[k][ident] = res
            fresh[k] += 1
        bar.update(1)

    try:
        run_jobs(be, jobs, done, log=log)
    finally:
        bar.close()
    points = [
        SweepPoint(
            float(v),
            got[k][eid].score,
            got[k][sid].score if sid is not None else None,
            cached=fresh[k] == 0,
            metrics=dict(got[k][eid].metrics),
        )
        for k, v in enumerate(values)
    ]
    return points, sum(fresh), hits, log.to_dict(be), log.notes(be)
