from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from soupkit.errors import EvaluationError
from soupkit.evaluate import (
    BoundedEvaluator,
    EvalResult,
    Evaluator,
    accuracy_bound,
    meets,
    run_evaluator,
)

STATE = {"w": torch.ones(2)}


def test_meets_distinguishes_ge_and_gt() -> None:
    assert meets(0.5, 0.5) is True
    assert meets(0.5, 0.5, strict=True) is False
    assert meets(0.6, 0.5, strict=True) is True
    assert meets(0.4, 0.5) is False
    assert meets(float("-inf"), None) is True


@given(
    total=st.integers(1, 5000),
    data=st.data(),
)
def test_accuracy_bound_never_below_final_accuracy(total: int, data: st.DataObject) -> None:
    # Whatever happens on the remaining examples, the float final score stays <= the float bound,
    # so a bound that fails `meets` proves the final score fails it as well.
    done = data.draw(st.integers(0, total))
    correct = data.draw(st.integers(0, done))
    more = data.draw(st.integers(0, total - done))
    assert (correct + more) / total <= accuracy_bound(correct, total - done, total)


def test_plain_function_is_an_evaluator_and_runs_fully() -> None:
    def score(state: Mapping[str, torch.Tensor]) -> float:
        return float(state["w"].sum())

    assert isinstance(score, Evaluator)
    assert not isinstance(score, BoundedEvaluator)
    result = run_evaluator(score, STATE, label="ft01", need=100.0)
    assert result == EvalResult(score=2.0, examples=0, total=0, complete=True)
    assert not result.meets(100.0)


def test_run_evaluator_names_the_candidate_when_the_evaluator_raises() -> None:
    def broken(state: Mapping[str, torch.Tensor]) -> float:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(EvaluationError) as info:
        run_evaluator(broken, STATE, label="soup of ft01+ft02")
    message = str(info.value)
    assert "candidate 'soup of ft01+ft02'" in message
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in message
    assert "hint:" in message
    assert isinstance(info.value.__cause__, RuntimeError)


def test_run_evaluator_prefixes_evaluation_errors_with_the_candidate() -> None:
    def refuses(state: Mapping[str, torch.Tensor]) -> float:
        raise EvaluationError("the candidate's tensors do not fit the model")

    with pytest.raises(
        EvaluationError, match=r"^evaluating candidate 'ft07' failed: the candidate"
    ):
        run_evaluator(refuses, STATE, label="ft07")


@pytest.mark.parametrize("value", ["0.9", None, True, torch.tensor(0.5)])
def test_run_evaluator_rejects_non_numbers(value: object) -> None:
    with pytest.raises(EvaluationError, match=r"returned .*expected a float"):
        run_evaluator(lambda state: value, STATE, label="x")  # type: ignore[arg-type, return-value]


def test_run_evaluator_rejects_nan() -> None:
    with pytest.raises(EvaluationError, match="returned NaN"):
        run_evaluator(lambda state: math.nan, STATE, label="x")


def test_run_evaluator_accepts_int_and_infinite_scores() -> None:
    assert run_evaluator(lambda state: 3, STATE).score == 3.0
    assert run_evaluator(lambda state: -math.inf, STATE).score == -math.inf


class _Cheater:
    """A bounded evaluator that stops early although its bound still meets the threshold."""

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        return 0.9

    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> EvalResult:
        return EvalResult(score=0.9, examples=3, total=10, complete=False)


def test_run_evaluator_catches_a_broken_early_stop_contract() -> None:
    assert isinstance(_Cheater(), BoundedEvaluator)
    with pytest.raises(EvaluationError, match=r"stopped early at 3/10 examples with bound 0.9"):
        run_evaluator(_Cheater(), STATE, label="x", need=0.8)


def test_run_evaluator_passes_need_and_strict_to_bounded_evaluators() -> None:
    seen: list[tuple[float | None, bool]] = []

    class Recorder(_Cheater):
        def evaluate(
            self,
            state: Mapping[str, torch.Tensor],
            *,
            need: float | None = None,
            strict: bool = False,
        ) -> EvalResult:
            seen.append((need, strict))
            return EvalResult(score=0.5, examples=10, total=10, complete=True)

    assert run_evaluator(Recorder(), STATE, need=0.7, strict=True).score == 0.5
    assert seen == [(0.7, True)]
