"""A sweep's grid points as evaluation jobs on a backend (`soupkit.backends`).

`sweep(..., backend=...)` calls this after planning and hashing, which stay on the driver: every
grid point at once, each merged once on a worker and scored by both evaluators (in-distribution
and shifted) there, with the same cache lookups, labels and records as the in-process sweep.
Every finished score is written to the cache as it arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from soupkit._util.progress import progress_bar
from soupkit.backends import (
    Backend,
    EvalJob,
    EvalRequest,
    RecipeMerge,
    RunLog,
    remote_evaluator,
    run_jobs,
)
from soupkit.evaluate.protocol import EvalResult, Evaluator
from soupkit.recipe.schema import MergeConfig
from soupkit.search.cache import ScoreCache

__all__ = ["sweep_on_backend"]


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
) -> tuple[list[dict[str, EvalResult]], list[int], int, dict[str, Any], list[str]]:
    """`sweep`'s grid points as jobs: ``(results, fresh, cache_hits, distributed, notes)``:
    per point, the results by evaluator identity and how many of them were evaluated now."""
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
    return got, fresh, hits, log.to_dict(be), log.notes(be)
