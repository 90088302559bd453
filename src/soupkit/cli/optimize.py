"""``soupkit optimize``: search a recipe's parameters (ranges in the YAML) by evaluation."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.format import human_seconds
from soupkit.backends import RemoteEvaluator
from soupkit.cli._backend import (
    add_backend_flags,
    distributed_lines,
    make_backend,
    remote_evaluators,
)
from soupkit.cli._common import command, progress_flag
from soupkit.cli._search_common import (
    add_cache_flags,
    add_evaluator_flags,
    build_evaluator,
    cli_record,
    open_cli_cache,
)
from soupkit.errors import UsageError
from soupkit.evaluate.lmeval import LMEvalEvaluator
from soupkit.search.recipe_search import SAMPLERS, OptimizeResult, load_space, optimize


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "optimize",
        "search a recipe's parameters (ranges in the YAML) by evaluation, with Optuna",
        """
        # per-layer weights of 4 fine-tunes (space.yaml: weight: {min: 0, max: 1, points: 6}), 100 trials
        soupkit optimize space.yaml --hf-classification val.csv --holdout-data test.csv --trials 100 --out ./opt
        # the same folder again: resumes the study (e.g. after Ctrl-C or a crash) up to 200 trials
        soupkit optimize space.yaml --hf-classification val.csv --holdout-data test.csv --trials 200 --out ./opt
        # CMA-ES, one hour, your evaluator, trials 4 at a time on Ray workers
        soupkit optimize space.yaml --evaluator my_eval.py:score --sampler cmaes --timeout 1h \\
            --backend ray --parallel 4 --out ./opt
        # several machines on one study: a shared database
        soupkit optimize space.yaml --evaluator my_eval:score --storage postgresql://me@db/soups --trials 500 --out ./opt
    """,
    )
    p.add_argument(
        "space",
        metavar="SPACE.yaml",
        help="a recipe whose parameters may be ranges {min, max}, choices {choice: [...]}, gradients of "
        "ranges, or {min, max, points: N} (see docs/optimize.md)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="study.db, best-recipe.yaml, report.json, PNG plots and the best model in OUT_DIR/model",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help="stop when the study has N finished trials (earlier runs count)",
    )
    p.add_argument(
        "--timeout",
        default=None,
        metavar="TIME",
        help="stop asking for trials after TIME (e.g. 600, 30m, 2h)",
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="tpe",
        help="Optuna sampler: tpe (default, multivariate TPE), cmaes (CMA-ES), random",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="sampler seed (trial n is sampled from (seed, n))"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="trials asked and evaluated at once (default 1; with --backend ray: the worker slots); "
        "the result depends on it, not on the backend",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage: an SQLAlchemy URL or an SQLite file (default: OUT_DIR/study.db)",
    )
    p.add_argument(
        "--study-name",
        default="soupkit-optimize",
        metavar="NAME",
        help="the study's name in the storage",
    )
    p.add_argument(
        "--no-prune",
        action="store_true",
        help="evaluate every trial fully (default: a bounded evaluator stops a trial that cannot beat the best)",
    )
    p.add_argument(
        "--no-middle-start",
        action="store_true",
        help="do not make a new study's first trial the middle of every range (for weights in [0, 1]: "
        "the uniform soup)",
    )
    p.add_argument(
        "--top",
        type=int,
        default=5,
        metavar="K",
        help="best trials listed and re-scored on the held-out set",
    )
    add_evaluator_flags(
        p,
        second="holdout",
        second_help="held-out set: the best trials are re-scored on it (never used to choose)",
    )
    g = p.add_argument_group(
        "lm-evaluation-harness (instead of the evaluators above; pip install 'soupkit[lm-eval]')"
    )
    g.add_argument(
        "--lm-eval",
        metavar="TASKS",
        default=None,
        help="score a causal LM on lm-eval tasks (comma-separated), the mean of --lm-eval-metric",
    )
    g.add_argument(
        "--holdout-lm-eval", metavar="TASKS", default=None, help="held-out lm-eval tasks"
    )
    g.add_argument(
        "--lm-eval-include",
        metavar="DIR",
        default=None,
        help="folder of local task YAML files (with local data files: runs offline)",
    )
    g.add_argument(
        "--lm-eval-metric", default="acc", help="metric to average over the tasks (default acc)"
    )
    g.add_argument(
        "--lm-eval-limit", type=int, default=None, metavar="N", help="at most N documents per task"
    )
    add_cache_flags(p)
    add_backend_flags(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="start a new study in OUT_DIR, deleting the old study.db",
    )
    p.add_argument(
        "--max-shard-size",
        default=MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"largest output shard (default {MAX_SHARD_SIZE})",
    )
    p.add_argument(
        "--no-plot", action="store_true", help="do not write history.png and coefficients.png"
    )
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.set_defaults(func=run)


def parse_duration(text: str | None) -> float | None:
    """``"90"``, ``"90s"``, ``"30m"``, ``"2h"`` -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--timeout {text!r}: expected a positive duration such as 600, 30m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def run(args: argparse.Namespace) -> int:
    timeout = parse_duration(args.timeout)
    if args.trials is None and timeout is None:
        raise UsageError("give a budget: --trials N and/or --timeout TIME")
    space = load_space(args.space)  # every problem of the space before any evaluator is built
    first = [str(m["model"]) for m in space.source.get("models") or [] if isinstance(m, dict)][:1]
    if space.source.get("base_model"):
        first = [str(space.source["base_model"])]
    backend = make_backend(args)
    if args.lm_eval or args.holdout_lm_eval:
        ev, ident, hold_ev, hold_ident = lm_eval_evaluators(args, first, remote=backend is not None)
    else:
        ev, ident, hold_ev, hold_ident = build_evaluator(args, first, second="holdout")
        if (
            backend is not None
        ):  # workers build the evaluators themselves, under the same identities
            ev, hold_ev = remote_evaluators(args, first, "holdout", ident, hold_ident)
    try:
        r = optimize(
            space,
            ev,
            args.out,
            trials=args.trials,
            timeout=timeout,
            holdout_evaluator=hold_ev,
            sampler=args.sampler,
            seed=args.seed,
            parallel=args.parallel,
            storage=args.storage,
            study_name=args.study_name,
            prune=not args.no_prune,
            start_at_middle=not args.no_middle_start,
            top=args.top,
            cache=open_cli_cache(args),
            evaluator_id=ident,
            holdout_evaluator_id=hold_ident,
            backend=backend,
            force=args.force,
            progress=progress_flag(args),
            plot=not args.no_plot,
            max_shard_size=args.max_shard_size,
            report_extra=cli_record(args),
        )
    finally:
        if backend is not None:
            backend.close()
    print(summary(r))
    return 0


def lm_eval_evaluators(
    args: argparse.Namespace, first: list[str], *, remote: bool
) -> tuple[Any, str, Any | None, str | None]:
    """The ``--lm-eval`` evaluators (built on the workers with a backend), with their identities."""
    others = [
        f
        for f in (
            "evaluator",
            "hf_classification",
            "hf_perplexity",
            "holdout_evaluator",
            "holdout_data",
        )
        if getattr(args, f)
    ]
    if not args.lm_eval or others:
        raise UsageError(
            "--lm-eval replaces the other evaluators: give --lm-eval TASKS (and optionally "
            "--holdout-lm-eval TASKS) without "
            + (", ".join("--" + f.replace("_", "-") for f in others) or "them")
        )
    model_dir = args.model_dir or (first[0] if first else None)
    if model_dir is None:
        raise UsageError(
            "--lm-eval needs --model-dir (a Hugging Face folder with config and tokenizer)"
        )
    if Path(model_dir).is_file():
        model_dir = str(Path(model_dir).parent)
    kw = {
        "include_path": args.lm_eval_include,
        "metric": args.lm_eval_metric,
        "limit": args.lm_eval_limit,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.eval_dtype,
    }
    out: list[Any] = []
    for tasks in (args.lm_eval, args.holdout_lm_eval):
        if not tasks:
            out += [None, None]
            continue
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        local = LMEvalEvaluator(model_dir, names, **kw)
        ident = (
            args.evaluator_id if args.evaluator_id and tasks == args.lm_eval else local.cache_key
        )
        if remote:
            out += [
                RemoteEvaluator.from_factory(LMEvalEvaluator, model_dir, names, key=ident, **kw),
                ident,
            ]
        else:
            out += [local, ident]
    return out[0], out[1], out[2], out[3]


def summary(r: OptimizeResult) -> str:
    """The table printed after a search: the best trials, validation next to held-out."""
    hold = r.holdout_evaluator is not None
    lines = [f"{'trial':>6}  {'validation':>10}" + (f"  {'held-out':>10}" if hold else "")]
    for t in r.top:
        mark = "  <- best" if t.number == r.best.number else ""
        lines.append(
            f"{t.number:>6}  {t.score:>10.6g}"
            + (f"  {t.holdout:>10.6g}" if hold and t.holdout is not None else "")
            + mark
        )
    n = len(r.trials)
    pruned = sum(t.state != "complete" for t in r.trials)
    lines.append("")
    lines.append(
        f"best of {n} finished trials ({pruned} pruned): trial {r.best.number}, validation {r.best.score:.6g}"
        + (f", held-out {r.best.holdout:.6g}" if r.best.holdout is not None else "")
        + f"; this run: {r.evaluations} evaluations, {r.cache_hits} from the cache"
        + (f", {r.adopted} interrupted trial(s) re-run" if r.adopted else "")
    )
    if n > 1:
        lines.append(
            f"note: the validation score is the best of {n} trials and overstates the recipe; "
            "the held-out score is the honest one"
            if hold
            else f"note: the validation score is the best of {n} trials and overstates the recipe; "
            "give --holdout-data / --holdout-evaluator for an honest estimate"
        )
    lines += distributed_lines(r.distributed)
    if r.out is not None:
        lines.append(
            f"wrote {r.out}: best-recipe.yaml, report.json"
            + "".join(f", {p.name}" for p in r.plots)
            + (f", model in {r.model}" if r.model else "")
            + f" (study: {r.storage}) in {human_seconds(r.seconds)}"
        )
    lines += [f"note: {n_}" for n_ in r.notes]
    return "\n".join(lines)
