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
time through `soupkit.io`. The sum is formed in recipe order (best first, then accepted ones in
rank order) with the same float32 operations as the `linear` method, so the written soup, made
by the engine as `soupkit.uniform_soup` of the chosen ingredients, equals the evaluated candidate
bit for bit. When a candidate is accepted its ingredient is read again and added to the sum in
place (the sum is never copied).

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

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from soupkit.api.merging import MergeResult, linear_recipe, plan, run_merge_plan
from soupkit.backends import Backend, resolve_backend
from soupkit.errors import UsageError
from soupkit.evaluate.protocol import EvalResult, Evaluator, meets, run_evaluator
from soupkit.io.checkpoint import Checkpoint
from soupkit.io.reader import TensorReader
from soupkit.planning.plan import MergePlan
from soupkit.search._paired import PairedRunner, require_per_example
from soupkit.search._state import (
    checkpoint_digest,
    evaluator_identity,
    progress_bar,
    read_state,
    start_sum,
)
from soupkit.search.bn import write_recalibrated
from soupkit.search.cache import ScoreCache, default_cache_path
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


@dataclass(frozen=True)
class IngredientScore:
    """One ingredient evaluated alone.

    Attributes:
        index: its position in the list given.
        label: the path as given.
        digest: content hash (see `soupkit.search.checkpoint_digest`).
        score: its score.
        rank: its position in the ranking (0 = best).
        cached: the score came from the cache.
    """

    index: int
    label: str
    digest: str
    score: float
    rank: int
    cached: bool
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GreedyStep:
    """One accept / reject decision.

    Attributes:
        rank: the ingredient's rank (1 = second best; rank 0 starts the soup and has no step).
        label: the ingredient tried.
        ingredient_score: its score alone.
        need: the soup's score before the step (what the candidate had to reach).
        candidate_score: the candidate soup's score; an upper bound when ``complete`` is False.
        complete: the candidate was evaluated on every example (False: rejected early).
        accepted: the ingredient joined the soup.
        soup_size: ingredients in the soup after the step.
        soup_score: the soup's score after the step.
        examples: examples evaluated (0 if the evaluator does not count them or it was cached).
        total: examples in the evaluation set (0 if unknown).
        cached: the result came from the cache (no evaluation).
        test: ``"exact"`` (the full-set rule, with exact early rejection) or ``"sequential"``
            (paired sequential test; see `soupkit.search.sequential`).
        examples_used: examples behind the decision (sequential: a prefix of the seeded order,
            whether evaluated now or known from the cache; exact: ``examples`` or ``total``).
        better, worse: sequential only: examples only the candidate / only the soup gets right.
        error_bound: probability bound that the decision differs from the exact full-set
            decision: 0.0 for the exact mode and for sequential decisions that the remaining
            examples could no longer change; otherwise the test's anytime p-value (<= delta).
        soup_examples: sequential only: examples of the soup evaluated at this step (its
            per-example correctness is needed where it was not yet known).
    """

    rank: int
    label: str
    ingredient_score: float
    need: float
    candidate_score: float
    complete: bool
    accepted: bool
    soup_size: int
    soup_score: float
    examples: int
    total: int
    cached: bool
    test: str = "exact"
    examples_used: int = 0
    better: int | None = None
    worse: int | None = None
    error_bound: float = 0.0
    soup_examples: int = 0


@dataclass(frozen=True)
class HeldOutScores:
    """Scores on a second (test) set: the final soup and the best single ingredient."""

    evaluator: str
    soup_score: float
    best_single: str
    best_single_score: float


@dataclass(frozen=True)
class GreedySoupResult:
    """What `greedy_soup` found.

    Attributes:
        ingredients: the chosen checkpoints, in recipe order (best first).
        score: the soup's validation score.
        ingredient_scores: every ingredient alone, in the order given.
        steps: every accept / reject decision, in rank order.
        strict: the acceptance rule was ``>`` (else ``>=``).
        evaluations: evaluator calls made (ingredients, candidates and held-out).
        cache_hits: results taken from the cache instead.
        examples_evaluated: examples the evaluator went through (counting evaluators only).
        examples_saved: examples early rejection (or the sequential test, net of the soup's own
            examples it needed) did not need to evaluate, against evaluating every candidate fully.
        held_out: scores on the test set, when one was given.
        out: the output folder, when written.
        merge: the engine's result for the written soup.
        plot: the PNG written beside the soup (None without matplotlib or output).
        seconds: wall time.
        distributed: with a backend: what it ran (workers, jobs, retries, speculative
            evaluations used / wasted / cancelled, worker time against wall time).
        sequential: with paired sequential decisions: their settings (delta, order seed, batch,
            the test), the union bound ``steps * delta`` on any decision differing from the
            exact mode's, and ``score_examples``: the examples behind ``score`` (which is then
            the soup's accuracy on the examples evaluated for it, not on the whole set).
    """

    ingredients: list[str]
    score: float
    ingredient_scores: list[IngredientScore]
    steps: list[GreedyStep]
    strict: bool
    evaluator: str
    evaluations: int
    cache_hits: int
    examples_evaluated: int
    examples_saved: int
    held_out: HeldOutScores | None = None
    out: Path | None = None
    merge: MergeResult | None = field(default=None, repr=False)
    plot: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    distributed: dict[str, Any] | None = None
    sequential: dict[str, Any] | None = None

    @property
    def best_single(self) -> IngredientScore:
        """The best ingredient alone (rank 0)."""
        return next(s for s in self.ingredient_scores if s.rank == 0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready history written under ``"greedy"`` in ``soupkit-report.json``."""
        return {
            "paper": "https://arxiv.org/abs/2203.05482",
            "rule": ">" if self.strict else ">=",
            "strict": self.strict,
            "ranking": "score descending; ties keep the order the checkpoints were given",
            "evaluator": self.evaluator,
            "evaluator_short": re.split(r"[@|#]", self.evaluator)[0][-60:],
            "decisions": "sequential" if self.sequential is not None else "exact",
            **({"sequential": self.sequential} if self.sequential is not None else {}),
            "ingredients": [asdict(s) for s in self.ingredient_scores],
            "steps": [asdict(s) for s in self.steps],
            "final": {"ingredients": list(self.ingredients), "score": self.score},
            "evaluations": self.evaluations,
            "cache_hits": self.cache_hits,
            "examples": {"evaluated": self.examples_evaluated, "saved": self.examples_saved},
            "held_out": asdict(self.held_out) if self.held_out is not None else None,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            **({"distributed": self.distributed} if self.distributed is not None else {}),
        }


def soup_key(digests: Sequence[str]) -> str:
    """Cache subject of the uniform soup of ingredients with these digests, in this order
    (float sums depend on the order, so the order is part of the key)."""
    return hashlib.sha256(("soupkit-uniform-soup-v1\n" + "\n".join(digests)).encode()).hexdigest()


def open_cache(cache: ScoreCache | str | os.PathLike[str] | bool | None) -> ScoreCache:
    """``True`` -> the default file, a path -> that file, ``None``/``False`` -> memory only."""
    if isinstance(cache, ScoreCache):
        return cache
    if cache is True:
        return ScoreCache(default_cache_path())
    if cache is None or cache is False:
        return ScoreCache(None)
    return ScoreCache(cache)


class _Scorer:
    """Evaluates through the cache and counts what it spends."""

    def __init__(self, evaluator: Evaluator, eid: str, cache: ScoreCache) -> None:
        self.evaluator, self.eid, self.cache = evaluator, eid, cache
        self.calls = self.hits = self.examples = self.saved = 0

    def __call__(
        self,
        subject: str,
        state_fn: Any,
        label: str,
        need: float | None = None,
        strict: bool = False,
    ) -> tuple[EvalResult, bool]:
        got = self.cache.lookup(self.eid, subject, need=need, strict=strict)
        if got is not None:
            self.hits += 1
            return got, True
        state = state_fn()
        result = run_evaluator(self.evaluator, state, label=label, need=need, strict=strict)
        del state
        self.calls += 1
        self.examples += result.examples
        if not result.complete and result.total:
            self.saved += result.total - result.examples
        self.cache.store(self.eid, subject, result, label=label, need=need, strict=strict)
        return result, False


def _uniform_divisor(n: int) -> torch.Tensor:
    # Exactly what `linear` divides by: the float32 sum of n weights of 1.0.
    return torch.ones(n, dtype=torch.float32).sum()


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
    max_shard_size: int | str = "5GB",
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
        backend: where evaluations run (see `soupkit.backends`): ``None`` / ``"local"`` here;
            ``"ray"`` or a `RayBackend` on Ray workers, which read the checkpoints from shared
            storage and build each candidate themselves. The evaluator must then be an import
            string / `RemoteEvaluator`, or picklable. Same decisions, scores and written bytes.
        speculate: with a backend, how many candidates of later steps may be evaluated ahead,
            under both accept and reject hypotheses (default: the backend's parallelism minus
            one; 0: none). See `soupkit.backends.speculate`.
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
    n_examples = (
        require_per_example(evaluator, opts, check_evaluator=local) if opts is not None else 0
    )
    be, owned = resolve_backend(backend)  # an unknown backend fails before any hashing
    store = open_cache(cache)
    eid = _identity(evaluator, evaluator_id, store)
    tid = None
    if test_evaluator is not None:
        tid = _identity(test_evaluator, test_evaluator_id, store)
        if tid == eid and test_evaluator is not evaluator:
            raise UsageError(
                f"the evaluator and the test evaluator have the same identity {eid!r}, so "
                "their scores would be confused in the cache\nhint: give them different "
                "evaluator_id / test_evaluator_id (or cache_key attributes)"
            )
    # Headers only: every compatibility problem is reported before anything is evaluated.
    full_plan = plan(linear_recipe(labels), max_shard_size=max_shard_size)
    ckpts: list[Checkpoint] = list(full_plan.models)
    notes: list[str] = []

    bar = progress_bar(
        sum(sum(f.stat().st_size for f in c.files) for c in ckpts), progress, "hashing", "B"
    )
    try:
        digests = [checkpoint_digest(c, store.memo, bar.update) for c in ckpts]
    finally:
        bar.close()
    store.save_file_hashes()

    if be is not None:
        from soupkit.search._on_backend import greedy_on_backend, greedy_sequential_on_backend

        try:
            if opts is not None:
                result = greedy_sequential_on_backend(
                    be,
                    ckpts,
                    labels,
                    digests,
                    evaluator,
                    eid,
                    test_evaluator,
                    tid,
                    store,
                    opts,
                    strict=strict,
                    progress=progress,
                )
            else:
                result = greedy_on_backend(
                    be,
                    ckpts,
                    labels,
                    digests,
                    evaluator,
                    eid,
                    test_evaluator,
                    tid,
                    store,
                    strict=strict,
                    early_stop=early_stop,
                    speculate=speculate,
                    progress=progress,
                )
        finally:
            if owned:
                be.close()
        if out is None:
            return _replace(result, seconds=time.perf_counter() - t0)
        return _write(
            result,
            out,
            force=force,
            progress=progress,
            plot=plot,
            max_shard_size=max_shard_size,
            report_extra=report_extra,
            t0=t0,
            recalibrate=recalibrate,
        )

    score = _Scorer(evaluator, eid, store)
    runner = PairedRunner(evaluator, eid, store, opts, n_examples) if opts is not None else None  # type: ignore[arg-type]
    results: list[tuple[EvalResult, bool]] = []
    bar = progress_bar(len(ckpts), progress, "scoring ingredients")
    try:
        for c, d, lab in zip(ckpts, digests, labels):
            if runner is not None:
                res, fresh = runner.full(d, lambda c=c: read_state(c), f"ingredient {lab}")
                score.calls += int(fresh > 0)
                score.hits += int(fresh == 0)
                score.examples += fresh
                results.append((res, fresh == 0))
            else:
                results.append(score(d, lambda c=c: read_state(c), f"ingredient {lab}"))
            bar.update(1)
    finally:
        bar.close()
    scores = [r.score for r, _ in results]
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
        )
        for i in range(len(ckpts))
    ]

    best = order[0]
    accepted = [best]
    soup_score = scores[best]
    steps: list[GreedyStep] = []
    ref = ckpts[best]
    with TensorReader() as reader:
        acc, fixed, out_dtype = start_sum(ref, reader)

        def candidate(i: int) -> dict[str, torch.Tensor]:
            div = _uniform_divisor(len(accepted) + 1)
            state: dict[str, torch.Tensor] = {}
            for name, info in ckpts[i].tensors.items():
                if name in fixed:
                    state[name] = fixed[name]
                    continue
                c = acc[name] + reader.read(info).reshape(info.shape).to(torch.float32)
                c /= div
                state[name] = c.to(out_dtype[name])
            return {name: state[name] for name in ref.tensors}

        def soup_now() -> dict[str, torch.Tensor]:
            if len(accepted) == 1:
                return read_state(ref, reader)
            div = _uniform_divisor(len(accepted))
            return {
                n: fixed[n] if n in fixed else (acc[n] / div).to(out_dtype[n]) for n in ref.tensors
            }

        bar = progress_bar(len(order) - 1, progress, "greedy soup")
        try:
            for rank, i in enumerate(order[1:], start=1):
                chosen = [labels[j] for j in accepted] + [labels[i]]
                subject = soup_key([digests[j] for j in accepted] + [digests[i]])
                if runner is not None:
                    step = sequential_step(
                        runner,
                        score,
                        rank,
                        i,
                        accepted,
                        labels,
                        digests,
                        scores,
                        lambda i=i: candidate(i),
                        soup_now,
                        soup_score,
                        strict,
                    )
                    if step.accepted:
                        for name, info in ckpts[i].tensors.items():
                            if name in acc:
                                acc[name] += reader.read(info).reshape(info.shape).to(torch.float32)
                        accepted.append(i)
                        soup_score = step.soup_score
                    steps.append(step)
                    bar.update(1)
                    continue
                need = soup_score
                res, cached = score(
                    subject,
                    lambda i=i: candidate(i),
                    "soup of " + " + ".join(chosen),
                    need=need if early_stop else None,
                    strict=strict,
                )
                ok = meets(res.score, need, strict=strict)
                if ok:
                    for name, info in ckpts[i].tensors.items():
                        if name in acc:
                            acc[name] += reader.read(info).reshape(info.shape).to(torch.float32)
                    accepted.append(i)
                    soup_score = res.score
                steps.append(
                    GreedyStep(
                        rank=rank,
                        label=labels[i],
                        ingredient_score=scores[i],
                        need=need,
                        candidate_score=res.score,
                        complete=res.complete,
                        accepted=ok,
                        soup_size=len(accepted),
                        soup_score=soup_score,
                        examples=0 if cached else res.examples,
                        total=res.total,
                        cached=cached,
                        examples_used=res.examples if res.examples else res.total,
                    )
                )
                bar.update(1)
        finally:
            bar.close()

        held: HeldOutScores | None = None
        if test_evaluator is not None:
            assert tid is not None
            tscore = _Scorer(test_evaluator, tid, store)
            div = _uniform_divisor(len(accepted))

            def final_state() -> dict[str, torch.Tensor]:
                return {
                    n: fixed[n] if n in fixed else (acc[n] / div).to(out_dtype[n])
                    for n in ref.tensors
                }

            soup_res, _ = tscore(
                soup_key([digests[j] for j in accepted]), final_state, "final soup (test set)"
            )
            single_res, _ = tscore(
                digests[best],
                lambda: read_state(ref, reader),
                f"ingredient {labels[best]} (test set)",
            )
            held = HeldOutScores(tid, soup_res.score, labels[best], single_res.score)
            score.calls += tscore.calls
            score.hits += tscore.hits
            score.examples += tscore.examples
        acc.clear()  # the running sum is not needed to write the soup
        fixed.clear()

    seq_info = None
    if runner is not None:
        soup_score, seq_info = sequential_summary(runner, accepted, digests, len(steps))
    result = GreedySoupResult(
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
        notes=notes,
        sequential=seq_info,
    )
    if out is None:
        return _replace(result, seconds=time.perf_counter() - t0)
    return _write(
        result,
        out,
        force=force,
        progress=progress,
        plot=plot,
        max_shard_size=max_shard_size,
        report_extra=report_extra,
        t0=t0,
        recalibrate=recalibrate,
    )


def _soup_subject(accepted: Sequence[int], digests: Sequence[str]) -> str:
    """The incumbent's cache subject: the ingredient's digest alone, else the soup's key."""
    return digests[accepted[0]] if len(accepted) == 1 else soup_key([digests[j] for j in accepted])


def sequential_step(
    runner: PairedRunner,
    score: _Scorer,
    rank: int,
    i: int,
    accepted: Sequence[int],
    labels: Sequence[str],
    digests: Sequence[str],
    scores: Sequence[float],
    cand: Any,
    soup: Any,
    soup_score: float,
    strict: bool,
) -> GreedyStep:
    """One greedy step by the paired sequential test (the caller adds the ingredient if accepted).

    ``cand`` / ``soup`` are the candidate's and the current soup's weights: state functions in
    this process, job candidates on a backend (see `PairedRunner`). ``score`` counts the work.
    """
    chosen = [labels[j] for j in accepted]
    po = runner.compare(
        soup_key([digests[j] for j in accepted] + [digests[i]]),
        cand,
        "soup of " + " + ".join(chosen + [labels[i]]),
        _soup_subject(accepted, digests),
        soup,
        "soup of " + " + ".join(chosen),
        1 if strict else 0,
    )
    score.examples += po.fresh + po.incumbent_fresh
    score.saved += po.total - po.examples - po.incumbent_fresh
    score.calls += int(po.fresh > 0)
    score.hits += int(po.fresh == 0)
    return GreedyStep(
        rank=rank,
        label=labels[i],
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


def sequential_summary(
    runner: PairedRunner, accepted: Sequence[int], digests: Sequence[str], steps: int
) -> tuple[float, dict[str, Any]]:
    """The final soup's score on the examples known for it, and the report's ``"sequential"``."""
    final, known = runner.known_score(_soup_subject(accepted, digests))
    opts = runner.opts
    return final, {**opts.report(runner.total, steps), "score_examples": known}


def _identity(evaluator: object, given: str | None, store: ScoreCache) -> str:
    """The cache identity: derived strictly for a persistent cache; for a memory-only cache any
    name unique to this object will do (nothing outlives the run)."""
    if store.path is not None:
        return evaluator_identity(evaluator, given)
    if given is not None:
        return given
    try:
        return evaluator_identity(evaluator)
    except UsageError:
        name = getattr(evaluator, "__qualname__", None) or type(evaluator).__qualname__
        mod = getattr(evaluator, "__module__", None) or type(evaluator).__module__
        return f"{mod}:{name}#{id(evaluator):x}"


def _replace(r: GreedySoupResult, **kw: Any) -> GreedySoupResult:
    return replace(r, **kw)


def write_search_output(
    p: MergePlan,
    out: str | os.PathLike[str],
    key: str,
    history: dict[str, Any],
    notes: Sequence[str],
    plot_fn: Callable[[dict[str, Any]], bytes],
    plot_name: str,
    *,
    force: bool,
    progress: bool | None,
    plot: bool,
    max_shard_size: int | str,
    report_extra: Mapping[str, Any] | None,
    recalibrate: tuple[torch.nn.Module, Iterable[Any]] | None = None,
) -> tuple[Path, MergeResult, Path | None, list[str]]:
    """Write a search's chosen soup (plan ``p``) atomically, with its history under ``key`` in the
    report and ``plot_fn(history)`` as ``plot_name`` beside it (a note when matplotlib is missing).

    Returns the output folder, the merge result, the plot's path (or None) and the notes.
    """
    from soupkit.search import report_plot

    notes = list(notes)
    files: dict[str, bytes] = {}
    dest = Path(out)
    plot_path = None
    if plot:
        if report_plot.matplotlib_available():
            files[plot_name] = plot_fn(history)
            plot_path = dest / plot_name
        else:
            notes.append("plot skipped: matplotlib is not installed (pip install 'soupkit[plot]')")
            history["notes"] = notes
    extra = {key: history, **dict(report_extra or {})}
    if recalibrate is not None:
        merged = write_recalibrated(
            p,
            dest,
            recalibrate[0],
            recalibrate[1],
            force=force,
            progress=progress,
            max_shard_size=max_shard_size,
            extra_report=extra,
            extra_files=files,
        )
    else:
        merged = run_merge_plan(
            p, dest, force=force, progress=progress, extra_report=extra, extra_files=files
        )
    return dest, merged, plot_path, notes


def _write(
    result: GreedySoupResult,
    out: str | os.PathLike[str],
    *,
    force: bool,
    progress: bool | None,
    plot: bool,
    max_shard_size: int | str,
    report_extra: Mapping[str, Any] | None,
    t0: float,
    recalibrate: tuple[torch.nn.Module, Iterable[Any]] | None = None,
) -> GreedySoupResult:
    from soupkit.search import report_plot

    history = _replace(result, seconds=time.perf_counter() - t0).to_dict()
    p = plan(linear_recipe(result.ingredients), max_shard_size=max_shard_size)
    dest, merged, plot_path, notes = write_search_output(
        p,
        out,
        "greedy",
        history,
        result.notes,
        report_plot.greedy_plot,
        PLOT_NAME,
        force=force,
        progress=progress,
        plot=plot,
        max_shard_size=max_shard_size,
        report_extra=report_extra,
        recalibrate=recalibrate,
    )
    return _replace(
        result,
        out=dest,
        merge=merged,
        plot=plot_path,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
