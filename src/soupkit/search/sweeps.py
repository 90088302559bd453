"""Parameter sweeps: evaluate a merge over a grid of one parameter, keep the best, plot the curve.

Typical sweeps:

==================  ===========  =====================================================================
method              parameter    what it trades
==================  ===========  =====================================================================
``wise_ft``         ``alpha``    zero-shot (``alpha=0``) against fine-tuned (``alpha=1``) weights:
                                 WiSE-FT, Wortsman et al., CVPR 2022, https://arxiv.org/abs/2109.01903
``linear``          ``alpha``    the same interpolation as ``linear`` with weights ``[1-alpha, alpha]``
                                 (``normalize: false``), for registries without ``wise_ft``
``task_arithmetic`` ``lambda``   how much of the summed task vectors to add (Ilharco et al., ICLR 2023)
``ties``,           ``density``  the fraction of each task vector kept (TIES / DARE)
``dare_ties``, ...
==================  ===========  =====================================================================

Any other numeric global parameter of any registered method can be swept the same way; the
value is set under the recipe's top-level ``parameters`` (so for a per-model parameter such as
``density`` it is the default of every model).

Each grid point is merged by the engine into memory (`soupkit.engine.execute.MemorySink`: the inputs
stream from the files, one output model is held) and scored by the evaluator. Every point is
evaluated on every example (no early stopping): the curve, not only the winner, is the result.
With ``sequential=True`` each point is instead compared with the best point before it by the
paired sequential test (`soupkit.search.sequential`) and evaluated only until it is decided.
The best point (highest score; ties go to the value listed first) is then written by the same
engine, so the written model equals the evaluated one bit for bit. With a second evaluation set
(``shift_evaluator``, e.g. a distribution shift), every point is also scored there and the plot
adds the in-distribution vs shifted scatter of the WiSE-FT paper; the choice still uses only
the first set.

Scores are cached like greedy soup's: the key is the recipe with every checkpoint path replaced
by the checkpoint's content digest, plus the evaluator's identity.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from soupkit import methods
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.progress import progress_bar
from soupkit.api.merging import MergeResult, plan
from soupkit.backends import Backend, resolve_backend
from soupkit.engine import MemorySink, run_plan
from soupkit.errors import ConfigError, UsageError
from soupkit.evaluate.protocol import Evaluator, run_evaluator
from soupkit.io.checkpoint import open_checkpoint
from soupkit.planning.plan import MergePlan
from soupkit.recipe.schema import MergeConfig, load_recipe
from soupkit.search import report_plot
from soupkit.search._output import finish_search
from soupkit.search._paired import PairedRunner, require_per_example
from soupkit.search._state import checkpoint_digest
from soupkit.search._sweep_jobs import sweep_on_backend
from soupkit.search.cache import ScoreCache, cache_identity, open_cache
from soupkit.search.sequential import SequentialOptions

__all__ = ["DEFAULT_PARAM", "SweepPoint", "SweepResult", "sweep", "sweep_recipes"]

PLOT_NAME = "sweep.png"

# The parameter a sweep varies when none is named.
DEFAULT_PARAM: dict[str, str] = {
    "wise_ft": "alpha",
    "linear": "alpha",
    "slerp": "t",
    "task_arithmetic": "lambda",
    "ties": "density",
    "dare_ties": "density",
    "dare_linear": "density",
    "breadcrumbs": "density",
    "breadcrumbs_ties": "density",
    "della": "density",
    "della_linear": "density",
}


@dataclass(frozen=True)
class SweepPoint:
    """One grid point.

    Attributes:
        value: the parameter's value.
        score: its score on the (in-distribution) evaluation set.
        shift_score: its score on the second set, if one was given.
        cached: the score(s) came from the cache.
        metrics: the evaluator's extra measurements, if any.
        examples: sequential sweeps: the examples behind ``score`` (its accuracy on those
            examples of the seeded order; 0 in the exact mode, where ``score`` is on every example).
        examples_used, better, worse, error_bound: sequential sweeps: the paired decision against
            the best point before it (examples it used, examples only this point / only the best
            gets right, the decision's error bound; see `soupkit.search.sequential`).
        replaced_best: sequential sweeps: this point was decided better than the best before it.
    """

    value: float
    score: float
    shift_score: float | None = None
    cached: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    examples: int = 0
    examples_used: int = 0
    better: int | None = None
    worse: int | None = None
    error_bound: float = 0.0
    replaced_best: bool | None = None


@dataclass(frozen=True)
class SweepResult:
    """What `sweep` found.

    Attributes:
        method: the merge method.
        param: the swept parameter.
        points: every grid point, in the order given.
        best: the chosen point (highest score, first listed on ties).
        recipe: the best point's recipe.
        evaluator: the evaluator's identity; ``shift_evaluator`` likewise.
        evaluations: evaluator calls made; ``cache_hits``: results taken from the cache.
        out: the output folder, when written; ``merge``: the engine's result for it.
        plot: the PNG written beside the model.
        distributed: with a backend: what it ran (workers, jobs, retries, worker time against
            wall time).
    """

    method: str
    param: str
    points: list[SweepPoint]
    best: SweepPoint
    recipe: MergeConfig
    evaluator: str
    shift_evaluator: str | None
    evaluations: int
    cache_hits: int
    out: Path | None = None
    merge: MergeResult | None = field(default=None, repr=False)
    plot: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    distributed: dict[str, Any] | None = None
    sequential: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready history written under ``"sweep"`` in ``soupkit-report.json``."""
        spec = methods.REGISTRY.get(self.method)
        return {
            "method": self.method,
            "paper": spec.paper if spec is not None else None,
            "param": self.param,
            "selection": "highest score on the first evaluation set; ties go to the value listed first",
            "evaluator": self.evaluator,
            "evaluator_short": re.split(r"[@|#]", self.evaluator)[0][-60:],
            "shift_evaluator": self.shift_evaluator,
            "decisions": "sequential" if self.sequential is not None else "exact",
            **({"sequential": self.sequential} if self.sequential is not None else {}),
            "points": [asdict(p) for p in self.points],
            "best": asdict(self.best),
            "best_recipe": self.recipe.model_dump(mode="json", exclude_none=True),
            "evaluations": self.evaluations,
            "cache_hits": self.cache_hits,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            **({"distributed": self.distributed} if self.distributed is not None else {}),
        }


def sweep_recipes(
    checkpoints: Sequence[str | os.PathLike[str]],
    values: Sequence[float],
    *,
    method: str | None = None,
    param: str | None = None,
    base: str | os.PathLike[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    out_dtype: str | None = None,
) -> tuple[str, str, list[MergeConfig]]:
    """The recipe of every grid point (validated), with the method and parameter resolved.

    Defaults: ``param="alpha"`` uses ``wise_ft`` when it is registered, else ``linear`` with
    weights ``[1 - alpha, alpha]``; a method alone uses its `DEFAULT_PARAM`. For ``alpha``
    sweeps the zero-shot model is ``base`` with one fine-tuned checkpoint, or the first of two
    checkpoints.

    Returns:
        ``(method, param, recipes)``.

    Raises:
        UsageError: no values, or inputs that do not fit the method.
        ConfigError: a recipe is invalid (e.g. a parameter the method does not take).
    """
    if not values:
        raise UsageError("no values to sweep\nhint: give e.g. values=[0, 0.25, 0.5, 0.75, 1]")
    if len(set(values)) != len(values):
        raise UsageError(f"values {list(values)} repeat a value; each grid point is evaluated once")
    if method is None:
        if param in (None, "alpha"):
            method = "wise_ft" if "wise_ft" in methods.REGISTRY else "linear"
        else:
            raise UsageError(
                f"sweeping {param!r} needs a method\nhint: e.g. method='task_arithmetic' "
                "for lambda, method='ties' for density"
            )
    spec = methods.get(method)
    if param is None:
        if spec.name not in DEFAULT_PARAM:
            raise UsageError(
                f"method {spec.name!r} has no default parameter to sweep\n"
                f"hint: name one of its parameters: {', '.join(spec.global_names + spec.per_model_names)}"
            )
        param = DEFAULT_PARAM[spec.name]
    elif param not in spec.global_names + spec.per_model_names and param != "alpha":
        # a recipe accepts (and ignores) the parameters mergekit ignores; sweeping one is a mistake
        raise ConfigError(
            [
                f"unknown parameter {param!r} for method {spec.name!r}: it does not use it; "
                f"it takes: {', '.join(sorted(spec.global_names + spec.per_model_names))}"
            ]
        )
    paths = [str(c) for c in checkpoints]
    base_s = str(base) if base is not None else None
    mp = [dict(m) for m in model_parameters] if model_parameters is not None else None
    alpha_pair = param == "alpha" and spec.name in ("wise_ft", "linear")
    if alpha_pair:
        pair = ([base_s] if base_s is not None else []) + paths
        if len(pair) != 2:
            raise UsageError(
                f"an alpha sweep interpolates two models (zero-shot and fine-tuned), got {len(pair)}: "
                f"{', '.join(pair) or 'none'}\nhint: give base=ZERO_SHOT and one fine-tuned checkpoint, "
                "or two checkpoints, zero-shot first"
            )
        if spec.name == "wise_ft":
            base_s, paths = pair[0], [pair[1]]
        else:
            base_s, paths = None, pair
    if not paths:
        raise UsageError("no checkpoints given")
    recipes = []
    for v in values:
        glob = {**dict(parameters or {})}
        models: list[dict[str, Any]]
        if alpha_pair and spec.name == "linear":
            glob["normalize"] = False
            models = [
                {"model": paths[0], "parameters": {"weight": 1.0 - float(v)}},
                {"model": paths[1], "parameters": {"weight": float(v)}},
            ]
        else:
            glob[param] = float(v)
            models = [
                {"model": p, "parameters": (mp[i] if mp else {})} for i, p in enumerate(paths)
            ]
        data: dict[str, Any] = {
            "merge_method": spec.name,
            "models": models,
            "parameters": glob,
            "seed": seed,
        }
        if base_s is not None:
            data["base_model"] = base_s
        if dtype is not None:
            data["dtype"] = dtype
        if out_dtype is not None:
            data["out_dtype"] = out_dtype
        recipes.append(load_recipe(data))
    return spec.name, param, recipes


def _recipe_key(cfg: MergeConfig, digest: Mapping[str, str]) -> str:
    data = cfg.model_dump(mode="json", exclude_none=True)
    data.pop("name", None)
    data.pop("tokenizer_source", None)  # carried files do not change the weights
    for m in data["models"]:
        m["model"] = digest[m["model"]]
    if "base_model" in data:
        data["base_model"] = digest[data["base_model"]]
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(("soupkit-recipe-v1\n" + text).encode()).hexdigest()


def sweep(
    checkpoints: Sequence[str | os.PathLike[str]],
    evaluator: Evaluator,
    values: Sequence[float],
    out: str | os.PathLike[str] | None = None,
    *,
    method: str | None = None,
    param: str | None = None,
    base: str | os.PathLike[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    out_dtype: str | None = None,
    shift_evaluator: Evaluator | None = None,
    cache: ScoreCache | str | os.PathLike[str] | bool | None = None,
    evaluator_id: str | None = None,
    shift_evaluator_id: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    plot: bool = True,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    report_extra: Mapping[str, Any] | None = None,
    recalibrate: tuple[Any, Iterable[Any]] | None = None,
    backend: Backend | str | None = None,
    sequential: bool = False,
    delta: float = 0.01,
    order_seed: int = 0,
    sequential_batch: int = 128,
    margin: float = 0.0,
) -> SweepResult:
    """Evaluate a merge at every value of one parameter; keep (and write) the best.

    Args:
        checkpoints: the models to merge (for ``alpha``: the fine-tuned one, or zero-shot and
            fine-tuned; see `sweep_recipes`).
        evaluator: scores a state dict, higher is better.
        values: the grid, e.g. ``[0, 0.1, ..., 1]``.
        out: write the best merge here (with ``soupkit-report.json`` and ``sweep.png``).
        method: a registered merge method (default: see `sweep_recipes`).
        param: the parameter to vary (default: the method's `DEFAULT_PARAM`).
        base: the base (zero-shot / pretrained) model, for methods that use one.
        parameters: other global parameters, fixed over the sweep.
        model_parameters: per-model parameters, one mapping per checkpoint.
        seed: seed of stochastic methods (DARE).
        dtype: cast inputs to this dtype before merging.
        out_dtype: output dtype.
        shift_evaluator: a second evaluation set (e.g. under distribution shift), scored at every
            point for the report and the scatter plot; never used for the choice.
        cache: as for `greedy_soup`.
        evaluator_id: the evaluator's cache identity (see `soupkit.search.evaluator_identity`).
        shift_evaluator_id: the same for ``shift_evaluator``.
        force: replace a non-empty ``out``.
        progress: show a progress bar (default: when stderr is a terminal).
        plot: write the PNG plot (needs matplotlib).
        max_shard_size: largest output shard.
        report_extra: more entries for the report.
        recalibrate: ``(model, loader)``: recompute the written model's BatchNorm statistics
            (see `soupkit.search.recalibrate_bn`); scores are those of the merge as evaluated.
        backend: where the grid points are evaluated (see `soupkit.backends`): ``None`` /
            ``"local"`` one after another here; ``"ray"`` or a `RayBackend` all at once on Ray
            workers, each merging its point from shared storage. The evaluators must then be
            import strings / `RemoteEvaluator`, or picklable. Same scores and written bytes.
        sequential: instead of scoring every point on every example, compare each point with
            the best point before it by the paired sequential test (`soupkit.search.sequential`,
            threshold ``>``: a later point must be better, as ties go to the first listed) and
            stop as soon as it has decided; the curve then holds each point's accuracy on the
            examples it was evaluated on. Needs a `PerExampleEvaluator` with 0/1 scores. The
            default (False) evaluates everything: the exact curve.
        delta: with ``sequential``: each decision differs from the exact one with probability
            at most ``delta``.
        order_seed: with ``sequential``: the seed of the evaluation order.
        sequential_batch: with ``sequential``: examples evaluated between two checks.
        margin: with ``sequential``: an indifference margin in accuracy (0.005 = half a point):
            candidates closer than that to the incumbent may be decided either way, the others
            keep the ``delta`` bound (see `soupkit.search.sequential`); 0 (default): none, every
            decision is bounded against the exact one.

    Returns:
        A `SweepResult`.

    Raises:
        ConfigError / PlanError: a grid point cannot be merged (found before any evaluation).
        EvaluationError: the evaluator failed; the message names the grid point.
    """
    t0 = time.perf_counter()
    name, param, recipes = sweep_recipes(
        checkpoints,
        values,
        method=method,
        param=param,
        base=base,
        parameters=parameters,
        model_parameters=model_parameters,
        seed=seed,
        dtype=dtype,
        out_dtype=out_dtype,
    )
    opts = SequentialOptions(delta, order_seed, sequential_batch, margin) if sequential else None
    if opts is not None and backend not in (None, "local"):
        raise UsageError(
            "sequential sweeps run in this process only (greedy soup's sequential decisions also "
            "run on a backend)\nhint: drop --backend, or sweep exactly on the backend"
        )
    n_examples = require_per_example(evaluator, opts) if opts is not None else 0
    be, owned = resolve_backend(backend)  # an unknown backend fails before any hashing
    store = open_cache(cache)
    eid = cache_identity(evaluator, evaluator_id, store)
    sid = (
        cache_identity(shift_evaluator, shift_evaluator_id, store)
        if shift_evaluator is not None
        else None
    )
    if sid is not None and sid == eid and shift_evaluator is not evaluator:
        raise UsageError(
            f"the evaluator and the shift evaluator have the same identity {eid!r}\n"
            "hint: give them different evaluator_id / shift_evaluator_id"
        )
    # Plan every point first (headers only): all configuration problems before any evaluation.
    plans: list[MergePlan] = [plan(r, max_shard_size=max_shard_size) for r in recipes]
    known = {ck.label: ck for p in plans for ck in (*p.models, *([p.base] if p.base else []))}
    digest: dict[str, str] = {}
    for cfg in recipes:
        for path in [m.model for m in cfg.models] + ([cfg.base_model] if cfg.base_model else []):
            if path not in digest:
                ck = known.get(path) or open_checkpoint(path)
                digest[path] = checkpoint_digest(ck, store.memo)
    store.save_file_hashes()

    calls = hits = 0
    points: list[SweepPoint] = []
    distributed: dict[str, Any] | None = None
    notes: list[str] = []
    if be is not None:  # every point at once on the backend; the loop below is the local path
        try:
            on_be, fresh_on_be, hits, distributed, notes = sweep_on_backend(
                be,
                name,
                param,
                values,
                recipes,
                [_recipe_key(cfg, digest) for cfg in recipes],
                evaluator,
                eid,
                shift_evaluator,
                sid,
                store,
                progress=progress,
            )
        finally:
            if owned:
                be.close()
        calls = sum(fresh_on_be)
        points = [
            SweepPoint(
                float(v),
                on_be[k][eid].score,
                on_be[k][sid].score if sid is not None else None,
                cached=fresh_on_be[k] == 0,
                metrics=dict(on_be[k][eid].metrics),
            )
            for k, v in enumerate(values)
        ]
    seq_info: dict[str, Any] | None = None
    best_i: int | None = None
    if opts is not None:  # each point against the best before it; the loop below is the exact path
        runner = PairedRunner(evaluator, eid, store, opts, n_examples)  # type: ignore[arg-type]
        points, best_i, calls, hits = _sequential_points(
            runner,
            name,
            param,
            values,
            recipes,
            plans,
            digest,
            shift_evaluator,
            sid,
            store,
            progress,
        )
        seq_info = {
            **opts.report(n_examples, len(points) - 1),
            "examples_evaluated": runner.evaluated,
            "rule": "a point replaces the best before it if it is better (>); ties go to the first listed",
        }
    exact_here = be is None and opts is None
    bar = progress_bar(len(recipes) if exact_here else 0, progress, f"sweep {param}")
    try:
        for v, cfg, p in zip(values, recipes, plans) if exact_here else ():
            key = _recipe_key(cfg, digest)
            label = f"{name} {param}={v:g}"
            wanted = [(eid, evaluator, label)] + (
                [(sid, shift_evaluator, label + " (shift set)")] if sid else []
            )
            got = {}
            fresh = 0
            state: dict[str, Any] | None = None
            for ident, ev, lab in wanted:
                assert ev is not None and ident is not None
                res = store.lookup(ident, key)
                if res is not None:
                    hits += 1
                else:
                    if state is None:
                        sink = MemorySink(p)
                        run_plan(p, sink)
                        state = sink.tensors
                    res = run_evaluator(ev, state, label=lab)
                    calls += 1
                    fresh += 1
                    store.store(ident, key, res, label=lab)
                got[ident] = res
            del state
            main = got[eid]
            points.append(
                SweepPoint(
                    float(v),
                    main.score,
                    got[sid].score if sid else None,
                    cached=fresh == 0,
                    metrics=dict(main.metrics),
                )
            )
            bar.update(1)
    finally:
        bar.close()
    if best_i is None:
        best_i = max(range(len(points)), key=lambda i: (points[i].score, -i))
    result = SweepResult(
        name,
        param,
        points,
        points[best_i],
        recipes[best_i],
        eid,
        sid,
        calls,
        hits,
        notes=notes,
        distributed=distributed,
        sequential=seq_info,
    )
    best_plan = plans[best_i]
    return finish_search(
        result,
        out,
        lambda: best_plan,
        "sweep",
        report_plot.sweep_plot,
        PLOT_NAME,
        t0=t0,
        force=force,
        progress=progress,
        plot=plot,
        max_shard_size=max_shard_size,
        report_extra=report_extra,
        recalibrate=recalibrate,
    )


def _sequential_points(
    runner: PairedRunner,
    name: str,
    param: str,
    values: Sequence[float],
    recipes: Sequence[MergeConfig],
    plans: Sequence[MergePlan],
    digest: Mapping[str, str],
    shift_evaluator: Evaluator | None,
    sid: str | None,
    store: ScoreCache,
    progress: bool | None,
) -> tuple[list[SweepPoint], int, int, int]:
    """A sweep by paired sequential decisions: ``(points, index of the best, evaluations, cache hits)``.

    The first point is the first best; each later point is compared with the best before it
    and replaces it when the test decides it is better. The best point's weights stay in
    memory, as its correctness may be needed on more examples for a later comparison. The
    shift set, if any, is scored on every example of every point (reported, never decided on).
    """
    calls = hits = 0
    keys = [_recipe_key(cfg, digest) for cfg in recipes]
    labels = [f"{name} {param}={v:g}" for v in values]
    states: dict[int, Mapping[str, Any]] = {}

    def state_of(k: int) -> Mapping[str, Any]:
        if k not in states:
            sink = MemorySink(plans[k])
            run_plan(plans[k], sink)
            states[k] = sink.tensors
        return states[k]

    decided: list[dict[str, Any]] = [{}]
    best = 0
    bar = progress_bar(len(recipes), progress, f"sweep {param} (sequential)")
    try:
        for k in range(1, len(recipes)):
            po = runner.compare(
                keys[k],
                functools.partial(state_of, k),
                labels[k],
                keys[best],
                functools.partial(state_of, best),
                labels[best],
                threshold=1,
            )
            decided.append(
                {
                    "examples_used": po.examples,
                    "better": po.better,
                    "worse": po.worse,
                    "error_bound": po.error_bound,
                    "replaced_best": po.accept,
                }
            )
            if po.accept:
                states.pop(best, None)
                best = k
            for j in [j for j in states if j != best]:
                states.pop(j)
            bar.update(1)
        if len(recipes) == 1:  # nothing to compare: the one point is scored on every example
            runner.full(keys[0], lambda: state_of(0), labels[0])
        # a point counts as evaluated if any of its examples was evaluated now, else as cached
        calls += len(runner.touched & set(keys))
        hits += len(set(keys) - runner.touched)
        shift: list[float | None] = [None] * len(recipes)
        if shift_evaluator is not None and sid is not None:
            for k in range(len(recipes)):
                res = store.lookup(sid, keys[k])
                if res is None:
                    res = run_evaluator(
                        shift_evaluator, state_of(k), label=labels[k] + " (shift set)"
                    )
                    store.store(sid, keys[k], res, label=labels[k] + " (shift set)")
                    calls += 1
                else:
                    hits += 1
                if k != best:
                    states.pop(k, None)
                shift[k] = res.score
        bar.update(1)
    finally:
        bar.close()
        states.clear()
    points = []
    for k, v in enumerate(values):
        score, known = runner.known_score(keys[k])
        points.append(
            SweepPoint(float(v), score, shift[k], cached=False, examples=known, **decided[k])
        )
    return points, best, calls, hits
