"""Greedy soup (Wortsman et al., "Model soups", ICML 2022, Recipe 1; https://arxiv.org/abs/2203.05482).

Algorithm, as in the paper:

1. score every ingredient alone on the held-out (validation) set;
2. rank them by score, best first; **ties keep the order the checkpoints were given** (a stable
   sort on the score, descending), so the ranking never depends on anything else;
3. start the soup with the best ingredient; for each next ingredient in rank order, evaluate
   the uniform average of the soup's ingredients plus this one, and keep it if the score does
   not drop: ``candidate >= soup`` (the paper). ``strict=True`` uses the reference code's
   ``candidate > soup`` (mlfoundations/model-soups ``main.py``).

Memory is about one model whatever the number of ingredients: a float32 running sum of the
accepted ingredients plus the candidate being evaluated. A candidate is
``(sum + next) / (k + 1)`` cast to the ingredients' dtype; ingredients are read one tensor at a
time through `soupkit.io`. The sum (`soupkit.methods.linear.RunningSum`) is formed in recipe
order (best first, then accepted ones in rank order) with the float32 operations of the `linear`
method, so the written soup, made by the engine as `soupkit.uniform_soup` of the chosen
ingredients, equals the evaluated candidate bit for bit. When a candidate is accepted its
ingredient is read again and added to the sum in place (the sum is never copied).

**One loop.** The decisions are made by one loop (`soupkit.search._greedy_loop`) whose
evaluations are jobs on a backend (`soupkit.backends`): without one, a `LocalBackend` runs them
in this process, one at a time, on the evaluator object given; with Ray, on Ray workers. The
candidates, the cache records and the decisions are the same either way.

**Exact early rejection.** An evaluator with the richer protocol
(`soupkit.evaluate.BoundedEvaluator`, e.g. accuracy of the built-in classification evaluator)
is told the score a candidate must reach and may stop as soon as the candidate certainly cannot
reach it; the decision is identical to a full evaluation (see `soupkit.evaluate.protocol`). The
history records the bound, and the examples that were not evaluated are reported as saved.

**Paired sequential decisions** (``sequential=True``; the default is the exact mode above).
With a `soupkit.evaluate.PerExampleEvaluator`, each candidate is evaluated in batches in a
seeded random order and compared with the current soup example by example; it is decided as
soon as a sequential test on the discordant examples is sure, up to ``delta``, of the decision
the exact mode would make on every example (`soupkit.search.sequential` has the test, its
formula and the exact statement of the bound). Per-example results are cached like scores.

**Cache.** Scores are cached by content: an ingredient by the SHA-256 of its files, a candidate
soup by the ordered digests of its ingredients, each together with the evaluator's identity
(see `soupkit.search.cache`). A re-run with the same inputs evaluates nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.progress import progress_bar
from soupkit.api.merging import linear_recipe, plan
from soupkit.backends import Backend, LocalBackend, resolve_backend
from soupkit.errors import UsageError
from soupkit.evaluate.protocol import Evaluator
from soupkit.search import report_plot
from soupkit.search._greedy_loop import GreedyRun, greedy_exact
from soupkit.search._greedy_sequential import greedy_sequential
from soupkit.search._greedy_types import (
    GreedySoupResult,
    GreedyStep,
    HeldOutScores,
    IngredientScore,
    soup_key,
)
from soupkit.search._output import finish_search
from soupkit.search._paired import require_per_example
from soupkit.search._state import checkpoint_digest
from soupkit.search.cache import ScoreCache, cache_identity, open_cache
from soupkit.search.sequential import SequentialOptions

__all__ = [
    "GreedySoupResult",
    "GreedyStep",
    "HeldOutScores",
    "IngredientScore",
    "greedy_soup",
    "open_cache",
    "soup_key",
]

PLOT_NAME = "greedy-soup.png"


def greedy_soup(
    checkpoints: Sequence[str | os.PathLike[str]],
    evaluator: Evaluator,
    out: str | os.PathLike[str] | None = None,
    *,
    strict: bool = False,
    early_stop: bool = True,
    test_evaluator: Evaluator | None = None,
    cache: ScoreCache | str | os.PathLike[str] | bool | None = None,
    evaluator_id: str | None = None,
    test_evaluator_id: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    plot: bool = True,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    report_extra: Mapping[str, Any] | None = None,
    recalibrate: tuple[torch.nn.Module, Iterable[Any]] | None = None,
    backend: Backend | str | None = None,
    speculate: int | None = None,
    sequential: bool = False,
    delta: float = 0.01,
    order_seed: int = 0,
    sequential_batch: int = 128,
    margin: float = 0.0,
) -> GreedySoupResult:
    """Greedy soup of ``checkpoints`` driven by ``evaluator`` (see the module docstring).

    Args:
        checkpoints: fine-tuned checkpoints of one architecture (files or folders), in any order.
        evaluator: ``evaluator(state) -> float`` on the held-out set, higher is better; a
            `BoundedEvaluator` also allows exact early rejection.
        out: write the soup here (a Hugging Face style folder with ``soupkit-report.json`` holding
            the greedy history and a ``greedy-soup.png`` plot); ``None`` only searches.
        strict: accept only if the score improves (``>``, the reference code) instead of the
            paper's ``>=``.
        early_stop: let bounded evaluators stop a candidate once it certainly fails.
        test_evaluator: a second, held-out test set: the final soup and the best single
            ingredient are also scored on it (reported, never used for decisions).
        cache: a `ScoreCache`, a cache file path, ``True`` for the default file
            (``~/.cache/soupkit/scores.jsonl``), or ``None`` for no persistent cache.
        evaluator_id: the evaluator's identity in the cache (needed for evaluators that are
            objects or closures; see `soupkit.search.evaluator_identity`).
        test_evaluator_id: the same for ``test_evaluator``.
        force: replace a non-empty ``out``.
        progress: show progress bars (default: when stderr is a terminal).
        plot: write the PNG plot (skipped with a note if matplotlib is missing).
        max_shard_size: largest output shard.
        report_extra: more entries for the report (the CLI records its command line here).
        recalibrate: ``(model, loader)``: recompute the written soup's BatchNorm statistics in
            ``model`` on ``loader`` (see `soupkit.search.recalibrate_bn`); every other tensor
            stays the uniform soup's. Decisions are not affected (evaluate recalibrated
            candidates by recalibrating inside your evaluator).
        backend: where evaluations run (see `soupkit.backends`): ``None`` / ``"local"`` here
            (a `LocalBackend`, reported as no backend); ``"ray"`` or a `RayBackend` on Ray
            workers, which read the checkpoints from shared storage and build each candidate
            themselves. The evaluator must then be an import string / `RemoteEvaluator`, or
            picklable. Same decisions, scores and written bytes.
        speculate: with a backend, how many candidates of later steps may be evaluated ahead,
            under both accept and reject hypotheses (default: the backend's parallelism minus
            one; 0: none; without a backend: none). See `soupkit.backends.speculate`.
        sequential: decide each candidate with the paired sequential test instead of the exact
            full-set rule (`soupkit.search.sequential`): examples are evaluated in batches in a
            seeded random order, compared with the soup's correctness example by example, and the
            candidate is decided as soon as the test is sure up to ``delta``. Needs a
            `PerExampleEvaluator` with 0/1 scores (accuracy). The default (False) is the exact
            mode: the paper's decisions, independent of any seed. With a backend, each batch of
            examples is a job (no speculation); the decisions are the same as here.
        delta: with ``sequential``: each decision differs from the exact mode's with probability
            at most ``delta`` (over the evaluation order).
        order_seed: with ``sequential``: the seed of the evaluation order.
        sequential_batch: with ``sequential``: examples evaluated between two checks.
        margin: with ``sequential``: an indifference margin in accuracy (0.005 = half a point):
            candidates closer than that to the incumbent may be decided either way, the others
            keep the ``delta`` bound (see `soupkit.search.sequential`); 0 (default): none, every
            decision is bounded against the exact one.

    Returns:
        A `GreedySoupResult` with the full history.

    Raises:
        UsageError: no checkpoints, the same file given twice, or an evaluator that cannot be
            cached under a derived identity.
        PlanError: the checkpoints cannot be averaged (all problems, before any evaluation).
        EvaluationError: the evaluator failed; the message names the candidate.
    """
    t0 = time.perf_counter()
    labels = [str(c) for c in checkpoints]
    if not labels:
        raise UsageError("no checkpoints given\nhint: give the fine-tuned checkpoints to soup")
    resolved = [Path(c).resolve() for c in checkpoints]
    seen: dict[Path, str] = {}
    for lab, r in zip(labels, resolved):
        if r in seen:
            raise UsageError(
                f"checkpoint {lab!r} is given twice (also as {seen[r]!r})\n"
                "hint: each ingredient may enter the soup once; list it once"
            )
        seen[r] = lab
    opts = SequentialOptions(delta, order_seed, sequential_batch, margin) if sequential else None
    local = backend is None or backend == "local"
    # On a backend the evaluator is built on the workers, which check it there.
    if opts is not None:
        require_per_example(evaluator, opts, check_evaluator=local)
    be, owned = resolve_backend(backend)  # an unknown backend fails before any hashing
    store = open_cache(cache)
    eid = cache_identity(evaluator, evaluator_id, store)
    tid = None
    if test_evaluator is not None:
        tid = cache_identity(test_evaluator, test_evaluator_id, store)
        if tid == eid and test_evaluator is not evaluator:
            raise UsageError(
                f"the evaluator and the test evaluator have the same identity {eid!r}, so "
                "their scores would be confused in the cache\nhint: give them different "
                "evaluator_id / test_evaluator_id (or cache_key attributes)"
            )
    # Headers only: every compatibility problem is reported before anything is evaluated.
    full_plan = plan(linear_recipe(labels), max_shard_size=max_shard_size)
    ckpts = list(full_plan.models)

    bar = progress_bar(
        sum(sum(f.stat().st_size for f in c.files) for c in ckpts), progress, "hashing", "B"
    )
    try:
        digests = [checkpoint_digest(c, store.memo, bar.update) for c in ckpts]
    finally:
        bar.close()
    store.save_file_hashes()

    if be is None:  # this process: the same loop on one in-process worker, reported as local
        be, owned, speculate = LocalBackend(), True, 0
    # Jobs name checkpoints by resolved path (a Hub id is its snapshot folder in the cache).
    paths = [os.path.abspath(c.path if c.path is not None else c.label) for c in ckpts]
    run = GreedyRun(
        be,
        labels,
        paths,
        digests,
        store,
        evaluator,
        eid,
        test_evaluator,
        tid,
        strict=strict,
        progress=progress,
        keep_going=not local,
    )
    try:
        if opts is not None:
            result = greedy_sequential(run, opts)
        else:
            result = greedy_exact(run, early_stop=early_stop, speculate=speculate)
    finally:
        if owned:
            be.close()
    if local:
        result = replace(result, distributed=None)
    return finish_search(
        result,
        out,
        lambda: plan(linear_recipe(result.ingredients), max_shard_size=max_shard_size),
        "greedy",
        report_plot.greedy_plot,
        PLOT_NAME,
        t0=t0,
        force=force,
        progress=progress,
        plot=plot,
        max_shard_size=max_shard_size,
        report_extra=report_extra,
        recalibrate=recalibrate,
    )
