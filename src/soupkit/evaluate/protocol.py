"""What soupkit asks of an evaluator, and how search code calls one.

An **evaluator** scores a candidate set of weights: ``evaluator(state) -> float``, higher is
better. ``state`` maps tensor names to tensors, exactly as in a safetensors file. Evaluators must
not modify ``state``.

A **bounded evaluator** also has ``evaluate(state, *, need=None, strict=False) -> EvalResult``.
Search code (greedy soup) only needs to know whether a candidate *reaches* a threshold: with
``strict=False`` the candidate is accepted when ``score >= need`` (the paper's rule), with
``strict=True`` when ``score > need`` (the reference code's rule). A bounded evaluator may stop
as soon as it is *certain* that the final score cannot be accepted, for instance accuracy once
``(correct_so_far + remaining) / total`` already fails the test. The contract:

* ``need=None``: evaluate everything; ``complete=True``.
* stopped early: ``complete=False`` and ``score`` is an upper bound of the full score that is
  itself rejected, ``not meets(score, need, strict=strict)``.
* therefore ``result.meets(need, strict=strict)`` is the same decision the full evaluation
  gives, for both ``>=`` and ``>``, bit for bit. The bound is computed with the same float
  operations as the final score, so rounding cannot flip a decision (see
  :func:`accuracy_bound`).

A **per-example evaluator** also has ``n_examples() -> int`` and
``per_example(state, indices) -> Tensor``: the score of each requested example (``indices`` are
positions in the evaluation set, in any order; the result has one value per index, in that
order). For accuracy a value is 1.0 (correct) or 0.0 (wrong), and the full score is their mean:
``evaluator(state) == sum(per_example(state, range(n))) / n``. Search code asks for examples in
batches, in an order fixed by a seed, and stops as soon as a paired sequential test has decided
(`soupkit.search.sequential`); per-example results are cached like scores. A plain
``state -> float`` evaluator keeps working exactly as before (exact decisions only).

Errors: evaluators may raise anything. :func:`run_evaluator` is the one place that turns a
failure into :class:`~soupkit.errors.EvaluationError` naming the candidate (``label``), and that
checks what came back (a number that is not NaN; a bounded result that keeps the contract).
Built-in evaluators raise ``EvaluationError`` themselves for problems they can explain (a state
that does not fit the model), without a candidate name; ``run_evaluator`` adds it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from soupkit.errors import EvaluationError

__all__ = [
    "BoundedEvaluator",
    "EvalResult",
    "Evaluator",
    "PerExampleEvaluator",
    "accuracy_bound",
    "meets",
    "run_evaluator",
]


@runtime_checkable
class Evaluator(Protocol):
    """Scores a candidate state dict; higher is better. Must not modify ``state``."""

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float: ...


@dataclass(frozen=True)
class EvalResult:
    """The outcome of one (possibly early-stopped) evaluation.

    Args:
        score (`float`): the score if ``complete``; otherwise an upper bound of it that fails
            the acceptance test it was stopped for.
        examples (`int`): examples evaluated (0 when the evaluator does not count examples).
        total (`int`): examples in the evaluation set (0 when unknown).
        complete (`bool`): whether every example was evaluated.
        metrics (`dict[str, float]`): extra measurements over the evaluated examples
            (e.g. ``loss``, ``accuracy``).
    """

    score: float
    examples: int
    total: int
    complete: bool
    metrics: dict[str, float] = field(default_factory=dict)

    def meets(self, need: float | None, *, strict: bool = False) -> bool:
        """Whether this result is accepted against ``need``; see :func:`meets`."""
        return meets(self.score, need, strict=strict)


@runtime_checkable
class BoundedEvaluator(Evaluator, Protocol):
    """An evaluator that can stop as soon as a candidate certainly fails a threshold."""

    def evaluate(
        self,
        state: Mapping[str, torch.Tensor],
        *,
        need: float | None = None,
        strict: bool = False,
    ) -> EvalResult:
        """Evaluate ``state``; may stop once ``meets(final, need, strict)`` is certainly False.

        Args:
            state (`Mapping[str, torch.Tensor]`): the candidate weights.
            need (`float`, *optional*): the acceptance threshold; ``None`` evaluates everything.
            strict (`bool`): accept on ``score > need`` instead of ``score >= need``.

        Returns:
            `EvalResult`: complete, or stopped early with an upper bound that is rejected.
        """
        ...


@runtime_checkable
class PerExampleEvaluator(Evaluator, Protocol):
    """An evaluator that scores examples one by one, so a comparison can stop early."""

    def n_examples(self) -> int:
        """The number of examples in the evaluation set."""
        ...

    def per_example(
        self, state: Mapping[str, torch.Tensor], indices: Sequence[int]
    ) -> torch.Tensor:
        """Scores of the examples at ``indices`` (positions in the evaluation set), in that order.

        Args:
            state (`Mapping[str, torch.Tensor]`): the candidate weights.
            indices (`Sequence[int]`): the examples to evaluate, each in ``[0, n_examples())``.

        Returns:
            `torch.Tensor`: float, shape ``[len(indices)]``; 1.0 / 0.0 for correct / wrong when the
            score is an accuracy (what the sequential test needs).
        """
        ...


def meets(score: float, need: float | None, *, strict: bool = False) -> bool:
    """The acceptance test: ``score >= need`` (``>`` when ``strict``); True when ``need`` is None.

    Args:
        score (`float`): a score or an upper bound of one.
        need (`float`, *optional*): the threshold.
        strict (`bool`): require strictly greater.

    Returns:
        `bool`: whether the score is accepted.
    """
    if need is None:
        return True
    return score > need if strict else score >= need


def accuracy_bound(correct: int, remaining: int, total: int) -> float:
    """Best accuracy still reachable: ``(correct + remaining) / total``.

    The final accuracy is ``final_correct / total`` with ``final_correct <= correct + remaining``.
    IEEE division by the same ``total`` is monotone, so the float final score is ``<=`` this float
    bound: a bound that fails ``meets`` proves the final score fails it too, for ``>=`` and ``>``.

    Args:
        correct (`int`): correct predictions so far.
        remaining (`int`): examples not evaluated yet.
        total (`int`): all examples (positive).

    Returns:
        `float`: the upper bound.
    """
    return (correct + remaining) / total


def run_evaluator(
    evaluator: Evaluator,
    state: Mapping[str, torch.Tensor],
    *,
    label: str | None = None,
    need: float | None = None,
    strict: bool = False,
) -> EvalResult:
    """Evaluate one candidate through any evaluator, with uniform errors and checks.

    Bounded evaluators get ``need`` and ``strict`` and may stop early; plain callables always run
    fully (their result has ``examples == total == 0``).

    Args:
        evaluator (`Evaluator`): a plain or bounded evaluator.
        state (`Mapping[str, torch.Tensor]`): the candidate weights.
        label (`str`, *optional*): the candidate's name for error messages, e.g.
            ``"soup of ft03+ft07"``.
        need (`float`, *optional*): acceptance threshold for early stopping.
        strict (`bool`): accept on ``>`` instead of ``>=``.

    Returns:
        `EvalResult`: the result; ``result.meets(need, strict=strict)`` is the decision.

    Raises:
        EvaluationError: the evaluator raised, returned something that is not a number, returned
            NaN, or stopped early while its bound still met ``need``.
    """
    who = f"candidate {label!r}" if label else "candidate"
    name = getattr(evaluator, "__qualname__", type(evaluator).__qualname__)
    try:
        if isinstance(evaluator, BoundedEvaluator):
            result = evaluator.evaluate(state, need=need, strict=strict)
        else:
            raw = evaluator(state)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                raise EvaluationError(
                    f"evaluator {name} returned {type(raw).__name__} ({raw!r}); expected a "
                    "float (higher is better)\nhint: return e.g. accuracy as a Python float"
                )
            result = EvalResult(score=float(raw), examples=0, total=0, complete=True)
    except EvaluationError as e:
        raise EvaluationError(f"evaluating {who} failed: {e}") from e
    except Exception as e:
        raise EvaluationError(
            f"evaluating {who} failed: evaluator {name} raised {type(e).__name__}: {e}\n"
            "hint: the traceback above this error shows where; check that the evaluator "
            "accepts a state dict of the candidate's tensor names and shapes"
        ) from e
    if math.isnan(result.score):
        raise EvaluationError(
            f"evaluating {who}: evaluator {name} returned NaN; expected a number to compare\n"
            "hint: NaN usually means the candidate's weights overflow (check the merge) or the "
            "metric divides by zero"
        )
    if not result.complete and meets(result.score, need, strict=strict):
        raise EvaluationError(
            f"evaluating {who}: evaluator {name} stopped early at {result.examples}/"
            f"{result.total} examples with bound {result.score!r}, which still meets need="
            f"{need!r} (strict={strict}); an early stop must return a rejected upper bound\n"
            "hint: this is a bug in the evaluator's evaluate()"
        )
    return result
