"""Evaluation-driven search over whole recipes: `optimize` (``soupkit optimize``).

A *search space* is a recipe (`soupkit.recipe.schema`, mergekit's schema) in which any parameter value
may be a search range instead of a number:

================================  ==============================================================
``{min: 0, max: 1}``              a float in ``[min, max]`` (``log: true``: log-uniform;
                                  ``step: 0.05``: on that grid)
``{choice: [a, b, c]}``           one of the values (also ``merge_method: {choice: [linear, ties]}``)
``[{min: 0, max: 1}, ...]``       a gradient (one value per anchor, interpolated over the layers
                                  as in every recipe) whose anchors are searched; numbers and
                                  ranges may be mixed
``{min: 0, max: 1, points: 6}``   shorthand for a gradient of 6 ranges: with as many points as the
                                  model has layers, one coefficient per layer (tensors outside the
                                  layers, embeddings and head, take the first point, as mergekit's
                                  ``t = 0``)
``[{filter: attn, value: R}]``    a conditional entry whose ``value`` is any of the above
================================  ==============================================================

When the method itself is a choice, a parameter is sampled (and written) only for the methods
that take it; a parameter no method of the choice takes is an error.

Every trial's recipe is merged by the engine into memory (`soupkit.engine.execute.MemorySink`: inputs
stream from the files, one candidate is held, nothing is written) and scored by the evaluator.
The search is Optuna's (TPE by default, or CMA-ES, or random; see docs/optimize.md for why TPE):
soupkit only maps the space to Optuna's distributions, the trials to recipes and scores.

* **Resumable and shareable**: trials live in an Optuna storage: SQLite in the output folder by
  default (``OUT/study.db``), any SQLAlchemy URL for a shared one. Running again continues the
  study up to the trial budget. A trial left *running* by a killed process on this machine is
  adopted and re-run under its own number with its stored parameters (its score usually comes
  from the score cache), so the study's history, and with it every later trial, is exactly what
  an uninterrupted run gives: the sampler of trial *n* is seeded from ``(seed, n)`` and sees
  only the stored history, never state of the process that asked earlier trials.
* **Cost**: scores are cached by recipe content (as `sweep` does), so a repeated candidate is
  free; a bounded evaluator (exact early rejection, e.g. the built-in classification accuracy)
  stops a candidate as soon as it certainly cannot beat the best trial so far, and the trial is
  recorded as *pruned* with that upper bound. The best trial is always scored in full.
* **Parallel**: ``parallel`` trials are asked at once and evaluated together (on a Ray backend:
  at the same time on workers); the result depends on ``(space, seed, sampler, parallel)``, not on
  the backend, so a Ray run equals a local run with the same ``parallel``.
* **Leakage**: the search selects on the validation evaluator only. The best ``top`` trials are
  then re-scored on a separate held-out evaluator and reported side by side with the number of
  trials: the more trials, the more the validation score of the winner overstates it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from soupkit import methods
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.extras import require
from soupkit._util.progress import progress_bar
from soupkit.api.merging import MergeResult, plan, run_merge_plan
from soupkit.backends import (
    Backend,
    EvalJob,
    EvalRequest,
    RecipeMerge,
    RunLog,
    remote_evaluator,
    resolve_backend,
    run_jobs,
)
from soupkit.engine import MemorySink, run_plan
from soupkit.errors import ConfigError, PlanError, SoupError, UsageError
from soupkit.evaluate.protocol import EvalResult, Evaluator, run_evaluator
from soupkit.io.checkpoint import open_checkpoint
from soupkit.recipe.schema import MergeConfig, load_recipe
from soupkit.search import _recipe_search_plot as _optimize_plot
from soupkit.search import report_plot
from soupkit.search._state import checkpoint_digest
from soupkit.search.cache import ScoreCache, cache_identity, open_cache
from soupkit.search.sweeps import _recipe_key

__all__ = ["SAMPLERS", "OptimizeResult", "SearchSpace", "TrialRecord", "load_space", "optimize"]

SAMPLERS = ("tpe", "cmaes", "random")
STUDY_DB = "study.db"
MODEL_DIR = "model"
RECIPE_NAME = "best-recipe.yaml"
REPORT_NAME = "report.json"
HISTORY_PNG = "history.png"
COEFFS_PNG = "coefficients.png"
_RANGE_KEYS = ("min", "max", "log", "step", "points")
_MAX_FAILED = 20  # refused recipes in a row before the space is declared broken


def _optuna() -> Any:
    """Optuna, or a `UsageError` with the install command."""
    return require("optuna", "optimize", "soupkit optimize")


# --------------------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Dim:
    """One searched value: a float range or a choice.

    Attributes:
        name: its name in the study (``"models[0].weight[3]"``, ``"parameters.density"``).
        low, high: the range (floats), or None for a choice.
        log: log-uniform.
        step: a grid step, or None.
        choices: the values of a choice.
        methods: the methods for which it is sampled (None: always).
    """

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    methods: tuple[str, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def fixed(self, where: str) -> Any:
        """A representative value for validation: ``where`` is ``"low"``, ``"mid"`` or ``"high"``
        (a choice: its last value for ``"high"``, else its first)."""
        if self.choices is not None:
            return self.choices[-1] if where == "high" else self.choices[0]
        assert self.low is not None and self.high is not None
        if where == "low":
            return self.low
        if where == "high":
            return self.high
        if self.log:
            return math.sqrt(self.low * self.high)
        mid = (self.low + self.high) / 2
        if self.step is not None:  # on the grid, as Optuna samples it
            mid = min(self.low + round((mid - self.low) / self.step) * self.step, self.high)
        return mid


def _is_range(v: Any) -> bool:
    return isinstance(v, dict) and ("min" in v or "max" in v or "points" in v)


def _is_choice(v: Any) -> bool:
    return isinstance(v, dict) and "choice" in v


def _number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Parser:
    """Walks a space once: collects the dims and every problem (reported together)."""

    def __init__(self) -> None:
        self.dims: list[Dim] = []
        self.errors: list[str] = []

    def range_dim(self, name: str, v: dict[str, Any], meths: tuple[str, ...] | None) -> Dim | None:
        unknown = [k for k in v if k not in _RANGE_KEYS]
        for k in unknown:
            close = difflib.get_close_matches(k, _RANGE_KEYS, n=1)
            self.errors.append(
                f"{name}: unknown range key {k!r}"
                + (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f"; allowed: {', '.join(_RANGE_KEYS[:4])}"
                )
            )
        lo, hi = v.get("min"), v.get("max")
        if not (_number(lo) and _number(hi)):
            self.errors.append(
                f"{name}: a range needs numeric min and max, got min={lo!r}, max={hi!r}"
            )
            return None
        if not lo < hi:
            self.errors.append(
                f"{name}: range min {lo} is not below max {hi}\nhint: for a fixed value write the number"
            )
            return None
        log, step = v.get("log", False), v.get("step")
        if not isinstance(log, bool):
            self.errors.append(f"{name}: log must be true or false, got {log!r}")
            return None
        if log and lo <= 0:
            self.errors.append(f"{name}: a log range needs min > 0, got {lo}")
            return None
        if step is not None and not (_number(step) and step > 0 and not log):
            self.errors.append(
                f"{name}: step must be a positive number (and not with log), got {step!r}"
            )
            return None
        if step is not None and abs((hi - lo) / step - round((hi - lo) / step)) > 1e-9:
            self.errors.append(
                f"{name}: the range [{lo}, {hi}] is not a whole number of steps {step}\n"
                "hint: choose max = min + k * step"
            )
            return None
        d = Dim(
            name,
            float(lo),
            float(hi),
            log,
            float(step) if step is not None else None,
            methods=meths,
        )
        self.dims.append(d)
        return d

    def value(self, name: str, v: Any, meths: tuple[str, ...] | None, *, top: bool = True) -> Any:
        """``v`` with every range replaced by its `Dim` (a template)."""
        if _is_choice(v):
            extra = [k for k in v if k != "choice"]
            ch = v["choice"]
            if (
                extra
                or not isinstance(ch, list)
                or not ch
                or any(isinstance(c, (dict, list)) for c in ch)
            ):
                self.errors.append(
                    f"{name}: a choice is {{choice: [value, ...]}} with at least one plain value, got {v!r}"
                )
                return None
            if len(set(map(repr, ch))) != len(ch):
                self.errors.append(f"{name}: choice {ch!r} repeats a value")
                return None
            d = Dim(name, choices=tuple(ch), methods=meths)
            self.dims.append(d)
            return d
        if _is_range(v):
            points = v.get("points")
            if points is None:
                return self.range_dim(name, v, meths)
            if not top:
                self.errors.append(f"{name}: points: is only allowed on a whole parameter value")
                return None
            if isinstance(points, bool) or not isinstance(points, int) or not 1 <= points <= 4096:
                self.errors.append(
                    f"{name}: points must be a whole number from 1 to 4096, got {points!r}"
                )
                return None
            rng = {k: x for k, x in v.items() if k != "points"}
            return [self.range_dim(f"{name}[{i}]", rng, meths) for i in range(points)]
        if isinstance(v, list):
            out = []
            for i, item in enumerate(v):
                if isinstance(item, dict) and "value" in item:  # a conditional entry
                    entry = dict(item)
                    entry["value"] = self.value(
                        f"{name}[{i}].value", item["value"], meths, top=True
                    )
                    out.append(entry)
                elif _is_range(item) or _is_choice(item):
                    out.append(self.value(f"{name}[{i}]", item, meths, top=False))
                else:
                    out.append(item)
            return out
        if isinstance(v, dict):
            self.errors.append(
                f"{name}: {v!r} is neither a range {{min, max}} nor a choice {{choice: [...]}}"
            )
            return None
        return v


def _accepts(method: str | None, key: str) -> bool:
    spec = methods.REGISTRY.get(method) if method is not None else None
    return spec is None or key in (*spec.global_names, *spec.per_model_names)


@dataclass
class SearchSpace:
    """A parsed search space (see the module docstring); build it with `load_space`.

    Attributes:
        template: the recipe with every range replaced by its `Dim`.
        dims: every searched value, in sampling order.
        methods: the merge methods to choose from (one when the method is fixed).
        source: the space as written (JSON-ready), for the report and the study's identity.
    """

    template: dict[str, Any]
    dims: list[Dim]
    methods: tuple[str, ...]
    source: dict[str, Any]
    recipe_dir: Path | None = None

    @property
    def digest(self) -> str:
        """Identity of the space (a study refuses to continue with another space)."""
        text = json.dumps(self.source, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _fill(self, pick: Callable[[Dim], Any]) -> dict[str, Any]:
        data = copy.deepcopy(self.template)
        method_dim = data.get("merge_method")
        method = pick(method_dim) if isinstance(method_dim, Dim) else method_dim
        data["merge_method"] = method

        def fill(v: Any) -> Any:
            if isinstance(v, Dim):
                return pick(v)
            if isinstance(v, list):
                return [fill(x) for x in v]
            if isinstance(v, dict):
                return {k: fill(x) for k, x in v.items()}
            return v

        def params(ps: dict[str, Any]) -> dict[str, Any]:
            return {
                k: fill(v) for k, v in ps.items() if _accepts(method, k) or len(self.methods) == 1
            }

        data["parameters"] = params(data.get("parameters") or {})
        if not data["parameters"]:
            data.pop("parameters")
        for m in data.get("models") or []:
            m["parameters"] = params(m.get("parameters") or {})
        return data

    def sample(self, trial: Any) -> dict[str, Any]:
        """The recipe (data) of an Optuna trial: every range suggested through ``trial`` in a
        fixed order (a `FrozenTrial` gives back its stored values)."""
        return self._fill(lambda d: d.suggest(trial))

    def fixed(self, where: str, method: str) -> dict[str, Any]:
        """A recipe with every range at its ``low`` / ``mid`` / ``high`` value, for ``method``."""
        return self._fill(lambda d: method if d.name == "merge_method" else d.fixed(where))

    def middle_params(self) -> dict[str, Any]:
        """Every dimension at its middle (a choice: its first value), by dimension name; for a
        method choice, only the first method's dimensions."""
        first = self.methods[0] if self.methods else None
        return {
            d.name: d.fixed("mid") for d in self.dims if d.methods is None or first in d.methods
        }

    def recipe(self, data: Mapping[str, Any]) -> MergeConfig:
        cfg = load_recipe(dict(data))
        cfg._recipe_dir = self.recipe_dir
        return cfg


def explicit_per_model_defaults(cfg: MergeConfig) -> MergeConfig:
    """``cfg`` with every per-model parameter the recipe leaves to soupkit's default written out
    (mergekit requires some, e.g. ``weight``), so the file runs unchanged in mergekit too. The
    merged model is the same: the values written are the defaults soupkit would use."""
    spec = methods.get(cfg.merge_method)
    data = cfg.model_dump(mode="json", exclude_none=True)
    glob = data.get("parameters") or {}
    for entry in data.get("models") or []:
        params = entry.setdefault("parameters", {})
        for key, default in spec.params.per_model.items():
            if key not in params and key not in glob:
                params[key] = default
    out = load_recipe(data)
    out._recipe_dir = cfg._recipe_dir
    return out


def load_space(source: SearchSpace | Mapping[str, Any] | str | os.PathLike[str]) -> SearchSpace:
    """Read and check a search space (a recipe with ranges; see the module docstring).

    Every method of a choice is checked by planning (headers only) its recipe with every range at
    its middle value (then at its high and low ends, if the method refuses the middle's values),
    so a structural problem (a missing model, a parameter the method does not take) fails here,
    before any trial. A sampled point the method refuses (e.g. every weight 0
    with ``normalize``) fails only that trial, which is recorded as failed with the reason.

    Args:
        source: a YAML file, YAML text, or a mapping.

    Raises:
        ConfigError: every problem found, with the place in the space.
    """
    if isinstance(source, SearchSpace):
        return source
    label: str | None = None
    recipe_dir: Path | None = None
    if isinstance(source, Mapping):
        data: Any = copy.deepcopy(dict(source))
    else:
        text = str(source)
        if isinstance(source, os.PathLike) or (
            "\n" not in text and text.endswith((".yaml", ".yml", ".json"))
        ):
            label = str(source)
            try:
                text = Path(source).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigError(
                    [f"the search space file {label!r} does not exist (looked in {os.getcwd()})"],
                    label,
                ) from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError([f"cannot read the search space ({e})"], label) from None
            recipe_dir = Path(label).resolve().parent
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], label) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"a search space is a recipe (a mapping), got {type(data).__name__}"], label
        )
    p = _Parser()
    tpl = copy.deepcopy(data)
    mm = data.get("merge_method")
    if _is_choice(mm):
        d = p.value("merge_method", mm, None)
        tpl["merge_method"] = d
        meths = tuple(d.choices) if isinstance(d, Dim) and d.choices else ()
        for m in meths:
            if not isinstance(m, str) or m not in methods.REGISTRY:
                p.errors.append(
                    f"merge_method: {m!r} is not a registered method (see `soupkit methods`)"
                )
    else:
        meths = (mm,) if isinstance(mm, str) else ()
    for where, ps in [("parameters", data.get("parameters"))] + [
        (f"models[{i}]", m.get("parameters") if isinstance(m, dict) else None)
        for i, m in enumerate(data.get("models") or [])
    ]:
        if ps is None:
            continue
        if not isinstance(ps, dict):
            p.errors.append(f"{where}.parameters: expected a mapping, got {type(ps).__name__}")
            continue
        out = {}
        for k, v in ps.items():
            takers = tuple(m for m in meths if _accepts(m, k))
            if len(meths) > 1 and not takers:
                p.errors.append(
                    f"{where}.{k}: none of the methods {', '.join(meths)} takes parameter {k!r}"
                )
                continue
            out[k] = p.value(
                f"{where}.{k}" if where != "parameters" else f"parameters.{k}",
                v,
                takers if len(meths) > 1 else None,
            )
        if where == "parameters":
            tpl["parameters"] = out
        else:
            tpl["models"][int(where[7:-1])]["parameters"] = out
    if p.errors:
        raise ConfigError(p.errors, label)
    if not p.dims:
        raise ConfigError(
            [
                "the space has nothing to search: no {min, max} range and no {choice: [...]}\n"
                "hint: e.g. parameters: {weight: {min: 0, max: 1}}, or use `soupkit merge` for a fixed recipe"
            ],
            label,
        )
    names = [d.name for d in p.dims]
    space = SearchSpace(tpl, p.dims, meths, data, recipe_dir)
    problems: list[str] = []
    for m in meths:
        # a structural problem fails at every point; a value the method refuses (all weights 0
        # with `normalize`) fails at some only, and then just those trials fail
        first: SoupError | None = None
        for where in ("mid", "high", "low"):
            try:
                plan(space.recipe(space.fixed(where, m)))
            except SoupError as e:
                first = first or e
                continue
            first = None
            break
        if first is not None:
            problems.append(
                f"with merge_method {m} and every range at its middle value (and at its ends): {first}"
            )
    if problems:
        raise ConfigError(problems, label)
    assert len(set(names)) == len(names)
    return space


# --------------------------------------------------------------------------- Optuna plumbing


def make_sampler(name: str, seed: int) -> Any:
    """The Optuna sampler ``name`` (``tpe``, ``cmaes``, ``random``) seeded with ``seed``."""
    optuna = _optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    if name == "cmaes":
        require("cmaes", "optimize", "the cmaes sampler")
        # Pruned trials count with their (rejected) upper bound: without them a generation of
        # CMA-ES would wait for trials that beat the best, and never end.
        # (`consider_pruned_trials` is flagged experimental by Optuna; its meaning is plain.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(
                seed=seed, consider_pruned_trials=True, warn_independent_sampling=False
            )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UsageError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def _trial_seed(seed: int, number: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{number}".encode()).digest()[:4], "little")


def per_trial_sampler(name: str, seed: int) -> Any:
    """A sampler that builds a fresh ``name`` sampler for each trial, seeded from ``(seed, number)``.

    So what trial *n* gets depends only on the seed and the stored history, never on what this
    process asked before: a resumed run, a run after a crash and an uninterrupted run ask the same.
    """
    optuna = _optuna()
    make_sampler(name, seed)  # fail now on a missing package, not inside the first trial

    class PerTrialSampler(optuna.samplers.BaseSampler):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self._by: dict[int, Any] = {}

        def _for(self, trial: Any) -> Any:
            s = self._by.get(trial.number)
            if s is None:
                s = self._by[trial.number] = make_sampler(name, _trial_seed(seed, trial.number))
            return s

        def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
            return self._for(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
            return self._for(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study: Any, trial: Any, param_name: str, dist: Any) -> Any:
            return self._for(trial).sample_independent(study, trial, param_name, dist)

        def before_trial(self, study: Any, trial: Any) -> None:
            self._for(trial).before_trial(study, trial)

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            self._for(trial).after_trial(study, trial, state, values)
            self._by.pop(trial.number, None)

        def reseed_rng(self) -> None:
            pass  # the per-trial seeds are the point

    return PerTrialSampler()


def _alive_here(worker: Any) -> bool:
    """Whether ``worker`` (``host:pid``) is a live process on this machine (True if elsewhere)."""
    if not isinstance(worker, str) or ":" not in worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell: leave another machine's trial alone
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()  # this process runs one search at a time: its own are left over


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial.

    Attributes:
        number: Optuna's trial number.
        state: ``"complete"`` or ``"pruned"`` (stopped early: ``score`` is a rejected upper bound).
        score: the validation score (or the bound, when pruned).
        params: the sampled values by dimension name.
        cached: the score came from the score cache.
        holdout: the held-out score, for the best trials when a held-out evaluator was given.
    """

    number: int
    state: str
    score: float
    params: dict[str, Any]
    cached: bool = False
    examples: int = 0
    total: int = 0
    holdout: float | None = None


@dataclass(frozen=True)
class OptimizeResult:
    """What `optimize` found.

    Attributes:
        best: the best trial (highest validation score; ties go to the earlier trial).
        recipe: its recipe (model paths absolute), runnable by `soupkit.merge`.
        trials: every finished trial of the study, in order.
        top: the best few complete trials, with held-out scores when a held-out evaluator was given.
        study_name / storage: where the study lives.
        evaluations / cache_hits: evaluator calls made by this run, results taken from the cache.
        adopted: trials left running by a dead process and re-run by this one.
        failed: trials of the study whose sampled recipe the method refused.
        out: the output folder; ``model``: the merged model folder; ``merge``: its merge result.
    """

    best: TrialRecord
    recipe: MergeConfig
    trials: list[TrialRecord]
    top: list[TrialRecord]
    study_name: str
    storage: str
    sampler: str
    seed: int
    parallel: int
    evaluator: str
    holdout_evaluator: str | None
    evaluations: int
    cache_hits: int
    adopted: int = 0
    failed: int = 0
    seconds: float = 0.0
    out: Path | None = None
    model: Path | None = None
    merge: MergeResult | None = field(default=None, repr=False)
    plots: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    distributed: dict[str, Any] | None = None
    space: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report (``report.json``)."""

        def rec(t: TrialRecord) -> dict[str, Any]:
            return {
                "number": t.number,
                "state": t.state,
                "score": t.score,
                "holdout": t.holdout,
                "cached": t.cached,
                "examples": t.examples,
                "total": t.total,
                "params": t.params,
            }

        n_complete = sum(t.state == "complete" for t in self.trials)
        return {
            "best": rec(self.best),
            "best_recipe": self.recipe.model_dump(mode="json", exclude_none=True),
            "selection": "highest validation score; ties go to the earlier trial",
            "trials_finished": len(self.trials),
            "trials_complete": n_complete,
            "trials_pruned": len(self.trials) - n_complete,
            "trials_failed": self.failed,
            "top": [rec(t) for t in self.top],
            "leakage_note": (
                f"the best validation score was selected among {len(self.trials)} trials, so it "
                "overstates the recipe's quality; the held-out column is the honest estimate"
            ),
            "trials": [rec(t) for t in self.trials],
            "study": {
                "name": self.study_name,
                "storage": self.storage,
                "sampler": self.sampler,
                "seed": self.seed,
                "parallel": self.parallel,
                "adopted_running_trials": self.adopted,
            },
            "evaluator": self.evaluator,
            "holdout_evaluator": self.holdout_evaluator,
            "evaluations": self.evaluations,
            "cache_hits": self.cache_hits,
            "seconds": round(self.seconds, 3),
            "space": self.space,
            "notes": list(self.notes),
            **({"distributed": self.distributed} if self.distributed is not None else {}),
        }


# --------------------------------------------------------------------------- the search


def _storage_url(storage: str | None, out: Path | None) -> str:
    if storage:
        return storage if "://" in storage else f"sqlite:///{os.path.abspath(storage)}"
    if out is None:
        raise UsageError(
            "optimize needs a place for its study: give out=DIR (SQLite in DIR) or storage=URL\n"
            "hint: storage='sqlite:///study.db', or a shared database URL"
        )
    return f"sqlite:///{os.path.abspath(out / STUDY_DB)}"


def _open_storage(optuna: Any, url: str) -> Any:
    """Optuna's RDB storage; SQLite in WAL mode with ``synchronous=NORMAL``: every write is still
    committed before the call returns (a killed process loses nothing told), without one fsync
    per suggested parameter (20 ms each on a busy disk, which dominated small searches)."""
    if not url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url)
    sqlalchemy = require("sqlalchemy", "optimize", "soupkit optimize's study storage")

    def pragmas(conn: Any, _record: Any) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    # the listener must see the very first connection (table creation), so it is attached to
    # an engine made for the purpose and handed to Optuna by its URL's pool settings
    probe = sqlalchemy.create_engine(url)
    sqlalchemy.event.listen(probe, "connect", pragmas)
    with probe.connect():
        pass  # sets WAL mode in the file (persistent)
    probe.dispose()
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # reconnect with the pragmas
    return storage


def _state_name(state: Any) -> str:
    return str(state.name).lower()


def _record(t: Any) -> TrialRecord:
    value = t.value
    if value is None and t.intermediate_values:
        value = t.intermediate_values[max(t.intermediate_values)]
    return TrialRecord(
        t.number,
        _state_name(t.state),
        float(value),
        dict(t.params),
        bool(t.user_attrs.get("cached", False)),
        int(t.user_attrs.get("examples", 0)),
        int(t.user_attrs.get("total", 0)),
    )


def optimize(
    space: SearchSpace | Mapping[str, Any] | str | os.PathLike[str],
    evaluator: Evaluator,
    out: str | os.PathLike[str] | None = None,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    holdout_evaluator: Evaluator | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    parallel: int | None = None,
    storage: str | None = None,
    study_name: str = "soupkit-optimize",
    prune: bool = True,
    start_at_middle: bool = True,
    top: int = 5,
    cache: ScoreCache | str | os.PathLike[str] | bool | None = None,
    evaluator_id: str | None = None,
    holdout_evaluator_id: str | None = None,
    backend: Backend | str | None = None,
    force: bool = False,
    progress: bool | None = None,
    plot: bool = True,
    write_model: bool = True,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    report_extra: Mapping[str, Any] | None = None,
) -> OptimizeResult:
    """Search a recipe's parameters by evaluation (see the module docstring); write the best.

    Args:
        space: the search space: a YAML file, YAML text, a mapping, or a `SearchSpace`.
        evaluator: scores a state dict, higher is better (the validation set).
        out: the output folder: ``study.db`` (unless ``storage``), ``best-recipe.yaml``,
            ``report.json``, ``history.png``, ``coefficients.png`` and the merged model in
            ``model/``. Running again with the same folder resumes the study.
        trials: stop when the study has this many finished trials (counting earlier runs).
        timeout: stop asking for trials after this many seconds of this run.
        holdout_evaluator: a separate held-out set; the best ``top`` trials are re-scored on it.
        sampler: ``"tpe"`` (default), ``"cmaes"`` or ``"random"``.
        seed: seeds the sampler (trial *n* from ``(seed, n)``) and stochastic methods' recipes.
        parallel: trials asked and evaluated at once (default: 1; on a backend its parallelism).
            Part of what determines the result.
        storage: an SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``) or an SQLite file
            path for a shared study; default SQLite in ``out``.
        study_name: the study's name in the storage.
        prune: stop a bounded evaluator's candidate once it cannot beat the best trial so far.
        start_at_middle: a new study's first trial is the middle of every range (the first value of
            every choice): for weights in [0, 1], the uniform soup, so the search starts from it.
        top: how many of the best trials the report lists (and re-scores on the held-out set).
        cache: the score cache, as for `greedy_soup` (default: memory only).
        evaluator_id: the evaluator's identity in the score cache (default: derived from it).
        holdout_evaluator_id: the held-out evaluator's identity in the score cache.
        backend: ``None`` / ``"local"`` here; ``"ray"`` or a backend object: each batch of
            ``parallel`` trials at once on workers.
        force: start a new study in ``out`` even if one exists (the old one is deleted).
        progress: show a progress bar with the best score so far (default: when stderr is a terminal).
        plot: write the PNG plots (needs matplotlib).
        write_model: write the best merge into ``out/model``.
        max_shard_size: largest output shard.
        report_extra: more entries for the report.

    Returns:
        An `OptimizeResult`.

    Raises:
        ConfigError: the space is invalid (found before any evaluation).
        UsageError: no budget, a study in the storage made with another space / seed / sampler,
            or Optuna missing (``pip install 'soupkit[optimize]'``).
        EvaluationError: the evaluator failed; the message names the trial.
    """
    t0 = time.perf_counter()
    optuna = _optuna()
    if trials is None and timeout is None:
        raise UsageError(
            "optimize needs a budget: trials=N (finished trials in the study) and/or timeout=SECONDS"
        )
    if trials is not None and trials < 1:
        raise UsageError(f"trials must be at least 1, got {trials}")
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    if top < 1:
        raise UsageError(f"top must be at least 1, got {top}")
    sp = load_space(space)
    dest = Path(out) if out is not None else None
    if dest is not None:
        if dest.exists() and not dest.is_dir():
            raise UsageError(f"{dest}: exists and is not a folder")
        if force and storage is None:
            for name in (
                STUDY_DB,
                STUDY_DB + "-wal",
                STUDY_DB + "-shm",
            ):  # a stale WAL must not meet a new file
                (dest / name).unlink(missing_ok=True)
        if (
            dest.is_dir()
            and any(dest.iterdir())
            and not (dest / STUDY_DB).exists()
            and storage is None
        ):
            raise UsageError(
                f"{dest}: exists, is not empty and holds no study ({STUDY_DB})\n"
                "hint: choose a new folder, or give the folder of an earlier optimize run to resume it"
            )
        dest.mkdir(parents=True, exist_ok=True)
    url = _storage_url(storage, dest)
    be, owned = resolve_backend(backend)
    try:
        return _run(
            optuna,
            sp,
            evaluator,
            dest,
            url,
            be,
            trials=trials,
            timeout=timeout,
            holdout_evaluator=holdout_evaluator,
            sampler=sampler,
            seed=seed,
            parallel=parallel
            if parallel is not None
            else (be.parallelism if be is not None else 1),
            study_name=study_name,
            prune=prune,
            start_at_middle=start_at_middle,
            top=top,
            cache=cache,
            evaluator_id=evaluator_id,
            holdout_evaluator_id=holdout_evaluator_id,
            progress=progress,
            plot=plot,
            write_model=write_model,
            max_shard_size=max_shard_size,
            report_extra=report_extra,
            t0=t0,
            force=force,
        )
    finally:
        if owned and be is not None:
            be.close()


def _run(
    optuna: Any,
    sp: SearchSpace,
    evaluator: Evaluator,
    dest: Path | None,
    url: str,
    be: Backend | None,
    *,
    trials: int | None,
    timeout: float | None,
    holdout_evaluator: Evaluator | None,
    sampler: str,
    seed: int,
    parallel: int,
    study_name: str,
    prune: bool,
    start_at_middle: bool,
    top: int,
    cache: Any,
    evaluator_id: str | None,
    holdout_evaluator_id: str | None,
    progress: bool | None,
    plot: bool,
    write_model: bool,
    max_shard_size: int | str,
    report_extra: Mapping[str, Any] | None,
    t0: float,
    force: bool,
) -> OptimizeResult:
    if parallel < 1:
        raise UsageError(f"parallel must be at least 1, got {parallel}")
    store = open_cache(cache)
    eid = cache_identity(evaluator, evaluator_id, store)
    hid = (
        cache_identity(holdout_evaluator, holdout_evaluator_id, store)
        if holdout_evaluator is not None
        else None
    )
    if hid is not None and hid == eid:
        raise UsageError(
            f"the evaluator and the held-out evaluator have the same identity {eid!r}\n"
            "hint: the held-out set must be a different set; give them different ids"
        )
    # The inputs' content digests: the score cache's keys do not depend on paths.
    digest: dict[str, str] = {}
    for m in sp.methods:
        cfg = sp.recipe(sp.fixed("mid", m))
        for path in [e.model for e in cfg.models] + ([cfg.base_model] if cfg.base_model else []):
            if path not in digest:
                digest[path] = checkpoint_digest(
                    open_checkpoint(cfg.resolve_model_path(path)), store.memo
                )
    store.save_file_hashes()

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            storage=_open_storage(optuna, url),
            study_name=study_name,
            direction="maximize",
            sampler=per_trial_sampler(sampler, seed),
            load_if_exists=True,
        )
    except Exception as e:  # SQLAlchemy / Optuna errors: a bad URL, an unreachable database
        optuna.logging.set_verbosity(level)
        raise UsageError(
            f"cannot open the study {study_name!r} in {url}: {type(e).__name__}: {e}\n"
            "hint: check the storage URL (sqlite:///file.db, postgresql://user@host/db)"
        ) from None
    try:
        ident = {"space": sp.digest, "sampler": sampler, "seed": seed, "evaluator": eid}
        old = {k: study.user_attrs.get(f"soupkit_{k}") for k in ident}
        if all(v is None for v in old.values()):
            for k, v in ident.items():
                study.set_user_attr(f"soupkit_{k}", v)
            if start_at_middle and not study.get_trials(deepcopy=False):
                study.enqueue_trial(sp.middle_params())
        elif old != ident:
            diff = ", ".join(
                f"{k}: stored {old[k]!r}, now {ident[k]!r}" for k in ident if old[k] != ident[k]
            )
            raise UsageError(
                f"study {study_name!r} in {url} was made with another setup ({diff})\n"
                "hint: use the same space, sampler, seed and evaluator to resume; or another "
                "--out / --study-name for a new search"
                + (
                    " (--force deletes only OUT_DIR/study.db, never a study in --storage)"
                    if force
                    else " (or --force)"
                )
            )
        return _search(
            optuna,
            study,
            sp,
            evaluator,
            eid,
            holdout_evaluator,
            hid,
            store,
            digest,
            dest,
            url,
            be,
            trials=trials,
            timeout=timeout,
            sampler=sampler,
            seed=seed,
            parallel=parallel,
            study_name=study_name,
            prune=prune,
            top=top,
            progress=progress,
            plot=plot,
            write_model=write_model,
            max_shard_size=max_shard_size,
            report_extra=report_extra,
            t0=t0,
        )
    finally:
        optuna.logging.set_verbosity(level)


def _search(
    optuna: Any,
    study: Any,
    sp: SearchSpace,
    evaluator: Evaluator,
    eid: str,
    holdout_evaluator: Evaluator | None,
    hid: str | None,
    store: ScoreCache,
    digest: dict[str, str],
    dest: Path | None,
    url: str,
    be: Backend | None,
    *,
    trials: int | None,
    timeout: float | None,
    sampler: str,
    seed: int,
    parallel: int,
    study_name: str,
    prune: bool,
    top: int,
    progress: bool | None,
    plot: bool,
    write_model: bool,
    max_shard_size: int | str,
    report_extra: Mapping[str, Any] | None,
    t0: float,
) -> OptimizeResult:
    Trial, TrialState = optuna.trial.Trial, optuna.trial.TrialState

    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    me = f"{socket.gethostname()}:{os.getpid()}"
    log = RunLog()
    if be is not None:
        log.start(be)
    rev = remote_evaluator(evaluator) if be is not None else None
    calls = hits = in_a_row = 0
    notes: list[str] = []
    failed: list[str] = []

    def finished() -> list[Any]:
        return [t for t in study.get_trials(deepcopy=False) if t.state in finished_states]

    def best_value() -> float | None:
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        return max(t.value for t in done) if done else None

    # Trials left running by a process of this machine that is gone: re-run under their numbers.
    stale = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not _alive_here(t.user_attrs.get("worker"))
    ]
    adopted = [Trial(study, t._trial_id) for t in sorted(stale, key=lambda t: t.number)]
    others = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) - len(adopted)
    if others:
        notes.append(
            f"{others} trial(s) of the study are running in other live processes; left to them"
        )
    n_adopted = len(adopted)
    done_before = len(finished())
    deadline = time.monotonic() + timeout if timeout is not None else None
    bar = progress_bar(trials, progress, "optimize", unit="trial")
    bar.update(min(done_before, trials or done_before))
    best_now = best_value()
    if best_now is not None:
        bar.set_postfix(best=f"{best_now:.6g}")

    def evaluate(batch: list[Any], need: float | None) -> list[tuple[EvalResult, bool, str] | str]:
        """Per trial: ``(result, cached, recipe key)``, or the reason its recipe is invalid."""
        nonlocal calls, hits
        out: list[tuple[EvalResult, bool, str] | str | None] = [None] * len(batch)
        cfgs: list[Any] = []
        plans: list[Any] = []
        keys: list[str] = []
        todo = []
        for k, trial in enumerate(batch):
            try:
                cfg = sp.recipe(sp.sample(trial))
                p = plan(
                    cfg, max_shard_size=max_shard_size
                )  # headers only: a refused point fails here
            except (ConfigError, PlanError) as e:
                out[k] = str(e)
                cfgs.append(None)
                plans.append(None)
                keys.append("")
                continue
            key = _recipe_key(cfg, digest)
            cfgs.append(cfg)
            plans.append(p)
            keys.append(key)
            got = store.lookup(eid, key, need=need, strict=True)
            if got is not None:
                hits += 1
                out[k] = (got, True, key)
            else:
                todo.append(k)
        labels = {k: f"trial {batch[k].number}" for k in todo}
        if be is None:
            for k in todo:
                p = plans[k]
                sink = MemorySink(p)
                run_plan(p, sink)
                res = run_evaluator(
                    evaluator, sink.tensors, label=labels[k], need=need, strict=True
                )
                del sink
                calls += 1
                store.store(eid, keys[k], res, label=labels[k], need=need, strict=True)
                out[k] = (res, False, keys[k])
        else:
            assert rev is not None

            def done(j: int, outcome: Any) -> None:
                k = todo[j]
                res = outcome.results[0]
                store.store(eid, keys[k], res, label=labels[k], need=need, strict=True)
                out[k] = (res, False, keys[k])

            jobs = [
                EvalJob(
                    RecipeMerge.from_config(cfgs[k]), (EvalRequest(rev, labels[k], need, True),)
                )
                for k in todo
            ]
            run_jobs(be, jobs, done, log=log)
            calls += len(todo)
        return [o for o in out if o is not None]

    try:
        while True:
            n_done = len(finished())
            if adopted:
                batch, adopted = adopted, []
            else:
                if trials is not None and n_done >= trials:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    notes.append(
                        f"stopped by the time budget ({timeout:g} s) after {n_done} finished trial(s)"
                    )
                    break
                want = parallel if trials is None else min(parallel, trials - n_done)
                batch = []
                for _ in range(want):
                    trial = study.ask()
                    trial.set_user_attr("worker", me)
                    batch.append(trial)
            need = best_value() if prune else None
            results = evaluate(batch, need)
            for trial, got in zip(batch, results):
                if isinstance(got, str):
                    trial.set_user_attr("error", got)
                    study.tell(trial, state=TrialState.FAIL)
                    failed.append(f"trial {trial.number}: {got}")
                    in_a_row += 1
                    if in_a_row >= _MAX_FAILED:
                        raise UsageError(
                            f"{in_a_row} sampled recipes in a row were refused; the last, {failed[-1]}\n"
                            "hint: narrow the ranges of the space so that its points are valid recipes"
                        )
                    continue
                in_a_row = 0
                res, cached, key = got
                trial.set_user_attr("cached", cached)
                trial.set_user_attr("examples", res.examples)
                trial.set_user_attr("total", res.total)
                trial.set_user_attr("recipe_key", key)
                if res.complete:
                    study.tell(trial, res.score)
                else:
                    trial.report(res.score, 0)
                    study.tell(trial, state=TrialState.PRUNED)
                bar.update(1)
            best_now = best_value()
            if best_now is not None:
                bar.set_postfix(best=f"{best_now:.6g}")
    finally:
        bar.close()

    if failed:
        notes.append(
            f"{len(failed)} trial(s) sampled a recipe the method refuses and were recorded as failed "
            f"(first: {failed[0].splitlines()[0]})"
        )
    records = [_record(t) for t in finished()]
    complete = [r for r in records if r.state == "complete"]
    if not complete:
        raise UsageError(
            f"study {study_name!r} has no complete trial yet ({len(records)} pruned)\n"
            "hint: raise the budget (trials / timeout)"
        )
    ranked = sorted(complete, key=lambda r: (-r.score, r.number))[:top]
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    best_cfg = sp.recipe(sp.sample(frozen[ranked[0].number]))
    best_cfg = explicit_per_model_defaults(
        load_recipe(RecipeMerge.from_config(best_cfg).recipe)
    )  # absolute paths: runs from anywhere; defaults written out: runs in mergekit too
    if holdout_evaluator is not None:
        assert hid is not None
        scores, c2, h2 = _holdout(
            sp,
            [frozen[r.number] for r in ranked],
            holdout_evaluator,
            hid,
            store,
            digest,
            be,
            log,
            max_shard_size,
        )
        calls, hits = calls + c2, hits + h2
        ranked = [
            TrialRecord(r.number, r.state, r.score, r.params, r.cached, r.examples, r.total, s)
            for r, s in zip(ranked, scores)
        ]
    result = OptimizeResult(
        best=ranked[0],
        recipe=best_cfg,
        trials=records,
        top=ranked,
        study_name=study_name,
        storage=url,
        sampler=sampler,
        seed=seed,
        parallel=parallel,
        evaluator=eid,
        holdout_evaluator=hid,
        evaluations=calls,
        cache_hits=hits,
        adopted=n_adopted,
        failed=len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        notes=notes + (log.notes(be) if be is not None else []),
        distributed=log.to_dict(be) if be is not None else None,
        space=sp.source,
    )
    if dest is None:
        return replace(result, seconds=time.perf_counter() - t0)
    return _write(
        result,
        sp,
        dest,
        plot=plot,
        write_model=write_model,
        progress=progress,
        max_shard_size=max_shard_size,
        report_extra=report_extra,
        t0=t0,
    )


def _holdout(
    sp: SearchSpace,
    frozen: Sequence[Any],
    ev: Evaluator,
    hid: str,
    store: ScoreCache,
    digest: Mapping[str, str],
    be: Backend | None,
    log: RunLog,
    max_shard_size: int | str,
) -> tuple[list[float], int, int]:
    """Held-out scores of the given trials (complete evaluations, through the cache)."""
    cfgs = [sp.recipe(sp.sample(t)) for t in frozen]
    keys = [_recipe_key(c, digest) for c in cfgs]
    labels = [f"trial {t.number} (held-out set)" for t in frozen]
    got: list[float | None] = []
    hits = 0
    for key in keys:
        res = store.lookup(hid, key)
        hits += res is not None
        got.append(res.score if res is not None else None)
    todo = [k for k, g in enumerate(got) if g is None]
    if be is None:
        for k in todo:
            p = plan(cfgs[k], max_shard_size=max_shard_size)
            sink = MemorySink(p)
            run_plan(p, sink)
            res = run_evaluator(ev, sink.tensors, label=labels[k])
            store.store(hid, keys[k], res, label=labels[k])
            got[k] = res.score
    else:
        hev = remote_evaluator(ev)

        def done(j: int, outcome: Any) -> None:
            k = todo[j]
            store.store(hid, keys[k], outcome.results[0], label=labels[k])
            got[k] = outcome.results[0].score

        run_jobs(
            be,
            [
                EvalJob(RecipeMerge.from_config(cfgs[k]), (EvalRequest(hev, labels[k]),))
                for k in todo
            ],
            done,
            log=log,
        )
    return [float(g) for g in got if g is not None], len(todo), hits


def _write(
    result: OptimizeResult,
    sp: SearchSpace,
    dest: Path,
    *,
    plot: bool,
    write_model: bool,
    progress: bool | None,
    max_shard_size: int | str,
    report_extra: Mapping[str, Any] | None,
    t0: float,
) -> OptimizeResult:
    notes = list(result.notes)
    p = plan(result.recipe, max_shard_size=max_shard_size)
    (dest / RECIPE_NAME).write_text(
        "# the best recipe found by `soupkit optimize`; reproduce the model with:\n"
        f"#   soupkit merge {dest / RECIPE_NAME} OUT_DIR\n" + result.recipe.to_yaml(),
        encoding="utf-8",
    )
    plots: list[Path] = []
    report = replace(result, seconds=time.perf_counter() - t0).to_dict()
    if plot:
        if report_plot.matplotlib_available():
            (dest / HISTORY_PNG).write_bytes(_optimize_plot.history_plot(report))
            plots.append(dest / HISTORY_PNG)
            coeffs = _optimize_plot.coefficients(p, result.recipe)
            if coeffs["series"]:
                report["coefficients"] = coeffs
                (dest / COEFFS_PNG).write_bytes(_optimize_plot.coefficients_plot(coeffs))
                plots.append(dest / COEFFS_PNG)
            else:
                notes.append(
                    "no per-model numeric parameter to plot per layer; coefficients.png not written"
                )
        else:
            notes.append("plots skipped: matplotlib is not installed (pip install 'soupkit[plot]')")
    model = merged = None
    if write_model:
        model = dest / MODEL_DIR
        merged = run_merge_plan(
            p,
            model,
            force=True,
            progress=progress,
            extra_report={
                "optimize": {k: report[k] for k in ("best", "study", "evaluator")},
                **dict(report_extra or {}),
            },
        )
    report["notes"] = notes
    report.update(dict(report_extra or {}))
    tmp = dest / (REPORT_NAME + ".partial")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, dest / REPORT_NAME)
    return replace(
        result,
        out=dest,
        model=model,
        merge=merged,
        plots=plots,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
