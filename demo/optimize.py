"""``python -m demo.optimize``: per-layer mixing coefficients found by `soupkit.optimize`, against
the uniform, greedy and learned soups of ``make demo``, on its untouched test set.

It runs after ``make demo``: it reuses its cached ingredients (read-only) and its soups in
``results/demo/models/``:

1. the search space: a ``linear`` recipe over the demo's fine-tunes with one weight range
   ``[0, 1]`` per model and per encoder layer (``points: 6`` for MiniLM's 6 layers; embeddings and
   the classifier head take the first point, mergekit's ``t = 0``);
2. `soupkit.optimize` with Optuna's TPE sampler against validation accuracy, with exact early
   rejection as pruning; the best trials re-scored on the test set for the leakage table (never
   used to choose);
3. the chosen recipe and make demo's uniform, greedy and learned soups scored on test, with a paired
   bootstrap interval of (optimized minus each of them);
4. ``results/demo-optimize/{report.md, report.json, history.png, coefficients.png}``.

Threads are pinned (2) and the sampler is seeded, so a re-run gives the same table (a re-run
with the same folder resumes the study and takes every score from the cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from demo.__main__ import (
    BOOTSTRAP,
    EVAL_SETTINGS,
    THREADS,
    _data_id,
    paired_bootstrap,
    pin_run,
)

LAYERS = 6  # all-MiniLM-L6-v2


def _say(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def locate(cache: Path) -> tuple[Path, list[Path], Path, Path]:
    """``(start, fine-tunes, val.csv, test.csv)`` of a finished ``make demo`` cache, read-only."""
    models = cache / "models"
    fts = sorted(p for p in models.glob("ft??-*") if (p / "ingredient.json").is_file())
    starts = sorted(p for p in models.glob("start-*") if (p / "model.safetensors").is_file())
    val, test = cache / "data" / "val.csv", cache / "data" / "test.csv"
    if not fts or not starts or not val.is_file() or not test.is_file():
        raise SystemExit(
            f"error: no finished demo ingredients in {cache}\nhint: run `make demo` first "
            "(it trains and caches them), or give --cache"
        )
    return starts[0], fts, val, test


def space(fts: Sequence[Path], points: int) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(p), "parameters": {"weight": {"min": 0.0, "max": 1.0, "points": points}}}
            for p in fts
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.optimize", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(".cache/demo/standard"),
        help="the demo's ingredient cache (read only; default .cache/demo/standard)",
    )
    parser.add_argument(
        "--demo-results",
        type=Path,
        default=Path("results/demo"),
        help="make demo's results folder, with its soups in models/ (default results/demo)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/demo-optimize"), help="results folder"
    )
    parser.add_argument("--trials", type=int, default=60, help="Optuna trials (default 60)")
    parser.add_argument(
        "--points", type=int, default=LAYERS, help="weights per model along the layers (default 6)"
    )
    parser.add_argument("--sampler", default="tpe", choices=["tpe", "cmaes", "random"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pin_run()
    t0 = time.perf_counter()

    import soupkit
    from soupkit.evaluate import HFClassificationEvaluator
    from soupkit.search import read_state
    from soupkit.search.recipe_search import optimize

    start, fts, val_csv, test_csv = locate(args.cache)
    soups = {name: args.demo_results / "models" / name for name in ("uniform", "greedy", "learned")}
    missing = [str(p) for p in soups.values() if not (p / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(
            f"error: make demo's soups are missing: {', '.join(missing)}\nhint: run `make demo` "
            "first, or give --demo-results"
        )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    val_ev = HFClassificationEvaluator(start, val_csv, **EVAL_SETTINGS)  # type: ignore[arg-type]
    test_ev = HFClassificationEvaluator(start, test_csv, **EVAL_SETTINGS)  # type: ignore[arg-type]
    vid, tid = _data_id("demo-val", val_csv), _data_id("demo-test", test_csv)
    cache = out / "scores.jsonl"  # ours: the demo's cache folder is only read

    _say(
        t0,
        f"== 1/2 optimize: {len(fts)} fine-tunes x {args.points} per-layer weights, {args.trials} trials "
        f"({args.sampler}), validation {val_csv}",
    )
    r = optimize(
        space(fts, args.points),
        val_ev,
        out / "search",
        trials=args.trials,
        holdout_evaluator=test_ev,
        sampler=args.sampler,
        seed=args.seed,
        cache=cache,
        evaluator_id=vid,
        holdout_evaluator_id=tid,
        progress=True,
    )
    t_search = time.perf_counter() - t0
    _say(
        t0,
        f"   best trial {r.best.number}: validation {100 * r.best.score:.2f} "
        f"({r.evaluations} evaluations, {r.cache_hits} cached)",
    )

    _say(t0, "== 2/2 test accuracy and paired bootstrap intervals")
    assert r.model is not None
    rows: list[dict[str, Any]] = []
    correct: dict[str, torch.Tensor] = {}
    for name, path in [
        ("optimized (per-layer)", r.model),
        *[(f"{k} soup", v) for k, v in soups.items()],
    ]:
        state = read_state(soupkit.open_checkpoint(path))
        c = test_ev.correct(state)
        correct[name] = c
        rows.append(
            {
                "name": name,
                "val": val_ev(state),
                "test": float(c.double().mean()),
                "path": str(path),
            }
        )
        del state
    best = correct["optimized (per-layer)"]
    intervals = {
        name: paired_bootstrap(best, c)
        for name, c in correct.items()
        if name != "optimized (per-layer)"
    }
    report = {
        "settings": {
            "ingredients": len(fts),
            "points": args.points,
            "parameters": len(fts) * args.points,
            "trials": len(r.trials),
            "sampler": args.sampler,
            "seed": args.seed,
            "threads": THREADS,
            "val_examples": val_ev.total,
            "test_examples": test_ev.total,
            "eval_autocast": EVAL_SETTINGS["autocast"] or "off",
            "bootstrap_samples": BOOTSTRAP,
        },
        "rows": rows,
        "bootstrap": intervals,
        "top": [{"trial": t.number, "validation": t.score, "test": t.holdout} for t in r.top],
        "search": {
            "evaluations": r.evaluations,
            "cache_hits": r.cache_hits,
            "pruned": sum(t.state == "pruned" for t in r.trials),
            "best_trial": r.best.number,
        },
        "seconds": {"search": round(t_search, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for png in r.plots:
        (out / png.name).write_bytes(png.read_bytes())
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# soupkit optimize on the demo: per-layer mixing coefficients vs the demo's soups",
        "",
        f"{s['ingredients']} fine-tunes x {s['points']} per-layer weights = {s['parameters']} parameters, "
        f"{s['trials']} trials of Optuna {s['sampler']} (seed {s['seed']}) on validation accuracy "
        f"({s['val_examples']} examples); test {s['test_examples']} examples; {s['threads']} threads; "
        f"{report['seconds']['total']:.0f} s in all ({report['seconds']['search']:.0f} s search).",
        "",
        "| model | validation acc. | test acc. | optimized minus this, test (95% paired bootstrap) |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        ci = report["bootstrap"].get(row["name"])
        diff = (
            f"{100 * ci['mean']:+.2f} [{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]"
            if ci
            else ""
        )
        lines.append(
            f"| {row['name']} | {100 * row['val']:.2f} | {100 * row['test']:.2f} | {diff} |"
        )
    lines += [
        "",
        f"Best trials by validation, with their test accuracy (selection among {s['trials']} trials "
        "inflates the validation column):",
        "",
        "| trial | validation | test |",
        "|---|---|---|",
    ]
    for t in report["top"]:
        lines.append(f"| {t['trial']} | {100 * t['validation']:.2f} | {100 * t['test']:.2f} |")
    lines += ["", "![history](history.png)", "", "![coefficients](coefficients.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
