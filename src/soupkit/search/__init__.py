"""Soups driven by evaluation: greedy soup, parameter sweeps, recipe search (optimize), learned
soup, BatchNorm recalibration.

Search code never imports a data library: it calls an `soupkit.evaluate.Evaluator`
(``state -> float``, higher is better) or, for the learned soup, a user loss function.
"""

from __future__ import annotations

from soupkit.search._state import checkpoint_digest, evaluator_identity, read_state
from soupkit.search.bn import recalibrate_bn, write_recalibrated
from soupkit.search.cache import ScoreCache, default_cache_path
from soupkit.search.greedy import (
    GreedySoupResult,
    GreedyStep,
    HeldOutScores,
    IngredientScore,
    greedy_soup,
)
from soupkit.search.learned import (
    LearnedSoupResult,
    StreamingMixture,
    classification_loss,
    learned_recipe,
    learned_soup,
)
from soupkit.search.recipe_search import (
    OptimizeResult,
    SearchSpace,
    TrialRecord,
    load_space,
    optimize,
)
from soupkit.search.sweeps import SweepPoint, SweepResult, sweep, sweep_recipes

__all__ = [
    "GreedySoupResult",
    "GreedyStep",
    "HeldOutScores",
    "IngredientScore",
    "LearnedSoupResult",
    "OptimizeResult",
    "SearchSpace",
    "ScoreCache",
    "StreamingMixture",
    "SweepPoint",
    "SweepResult",
    "TrialRecord",
    "checkpoint_digest",
    "classification_loss",
    "default_cache_path",
    "evaluator_identity",
    "greedy_soup",
    "learned_recipe",
    "learned_soup",
    "load_space",
    "optimize",
    "read_state",
    "recalibrate_bn",
    "sweep",
    "sweep_recipes",
    "write_recalibrated",
]
