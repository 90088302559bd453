"""What a greedy soup reports: the ingredients' scores, every decision, the result."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soupkit.api.merging import MergeResult

__all__ = ["GreedySoupResult", "GreedyStep", "HeldOutScores", "IngredientScore", "soup_key"]


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
