"""Scoring candidate weights: the Evaluator protocol, a loader for user evaluators, built-ins.

Search code depends only on :class:`Evaluator` (``state -> float``, higher is better) and calls
it through :func:`run_evaluator`, which names the candidate in errors and, for a
:class:`BoundedEvaluator`, lets evaluation stop early once a candidate certainly fails.
The Hugging Face evaluators in :mod:`soupkit.evaluate.builtin` import ``transformers`` only when
constructed (the ``eval`` extra).
"""

from __future__ import annotations

from soupkit.evaluate.builtin import HFCausalLMPerplexityEvaluator, HFClassificationEvaluator
from soupkit.evaluate.loader import load_evaluator
from soupkit.evaluate.protocol import (
    BoundedEvaluator,
    EvalResult,
    Evaluator,
    PerExampleEvaluator,
    accuracy_bound,
    meets,
    run_evaluator,
)

__all__ = [
    "BoundedEvaluator",
    "EvalResult",
    "Evaluator",
    "HFCausalLMPerplexityEvaluator",
    "HFClassificationEvaluator",
    "PerExampleEvaluator",
    "accuracy_bound",
    "load_evaluator",
    "meets",
    "run_evaluator",
]
