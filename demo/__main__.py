"""``make demo``: model soups on a real pretrained model and real data, on a 2-core CPU.

The model-soups recipe (Wortsman et al., ICML 2022) at CPU scale, every soup step through
soupkit's public API:

1. ingredients (demo/ingredients.py, cached): all-MiniLM-L6-v2 with a linear-probe head (the
   shared start), then a hyperparameter sweep of full fine-tunes from that start, on the
   CrowdFlower tweet-sentiment corpus (3 classes);
2. every ingredient scored on the validation set and on the untouched test set;
3. the uniform soup (`soupkit.uniform_soup`), the greedy soup selected on validation
   (`soupkit.greedy_soup`), a WiSE-FT sweep from the start to the best fine-tune
   (`soupkit.wise_ft`) and a learned soup (`soupkit.learned_soup`), all scored on test;
4. a paired bootstrap confidence interval for greedy minus the best single model on test;
5. a table on stdout and ``results/demo/{report.md, report.json, *.png}``.

Run ``python -m demo`` (``--quick`` for the CI-sized run). Threads are pinned (2) and every
random choice is seeded, so the same run prints the same table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from demo.ingredients import bf16_available

THREADS = 2
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
BOOTSTRAP = 2000
# bfloat16 autocast where the CPU has native bf16 dot products (as the fine-tunes train): matrix
# products in bf16, weights and norms in float32, twice as fast as float32 (docs/soups.md).
EVAL_SETTINGS = {
    "max_length": 64,
    "batch_size": 128,
    "autocast": "bfloat16" if bf16_available() else None,
}


_T0 = time.perf_counter()


def _data_id(kind: str, csv: Path) -> str:
    """Evaluator identity for the score cache: the kind, the evaluator's settings and the data
    file's content (a change to any of them is a different evaluator)."""
    settings = ",".join(f"{k}={v}" for k, v in sorted(EVAL_SETTINGS.items()))
    return f"{kind}:{settings}:{hashlib.sha256(csv.read_bytes()).hexdigest()[:16]}"


class _Scorer:
    """Validation accuracy, test accuracy and per-example test correctness of a checkpoint.

    Memoised by content through soupkit's score cache (the subject is the checkpoint's
    `checkpoint_digest`, so a rewritten identical soup is not re-evaluated); the test
    correctness vector, which the paired bootstrap needs, is kept beside it as one small file per
    digest.
    """

    def __init__(
        self, val_ev: Any, test_ev: Any, cache: Any, vid: str, tid: str, folder: Path
    ) -> None:
        self.val_ev, self.test_ev, self.cache, self.vid, self.tid = val_ev, test_ev, cache, vid, tid
        self.folder = folder / hashlib.sha256(tid.encode()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, path: Path | str) -> tuple[float, float, torch.Tensor]:
        import soupkit
        from soupkit.evaluate import EvalResult, run_evaluator
        from soupkit.search import checkpoint_digest, read_state

        ck = soupkit.open_checkpoint(path)
        digest = checkpoint_digest(ck, self.cache.memo)
        self.cache.save_file_hashes()
        state: dict[str, torch.Tensor] = {}

        def load() -> dict[str, torch.Tensor]:
            if not state:
                state.update(read_state(ck))
            return state

        val = self.cache.lookup(self.vid, digest)
        if val is None:
            val = run_evaluator(self.val_ev, load(), label=str(path))
            self.cache.store(self.vid, digest, val, label=str(path))
        stored = self.folder / f"{digest}.pt"
        if stored.is_file():
            correct = torch.load(stored)
        else:
            correct = self.test_ev.correct(load())
            tmp = stored.with_suffix(".tmp")
            torch.save(correct, tmp)
            os.replace(tmp, stored)
        n = len(correct)
        test = int(correct.sum()) / n
        if self.cache.lookup(self.tid, digest) is None:
            self.cache.store(
                self.tid,
                digest,
                EvalResult(score=test, examples=n, total=n, complete=True),
                label=str(path),
            )
        return val.score, test, correct


def _say(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def paired_bootstrap(
    a: torch.Tensor, b: torch.Tensor, *, samples: int = BOOTSTRAP, seed: int = 0
) -> dict[str, float]:
    """95% percentile interval of mean(a) - mean(b) over examples resampled with replacement.

    Args:
        a, b: per-example correctness (0/1) of two models on the same examples.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs equal lengths, got {a.shape} and {b.shape}")
    diff = a.double() - b.double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (samples, len(diff)), generator=g)
    means = diff[idx].mean(dim=1).sort().values
    return {
        "mean": float(diff.mean()),
        "low": float(means[int(0.025 * samples)]),
        "high": float(means[int(0.975 * samples) - 1]),
        "samples": samples,
    }


def _plot_summary(rows: list[dict[str, Any]], wise: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    names = [r["name"] for r in rows]
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [100 * r["val"] for r in rows], width=0.4, label="validation")
    ax1.bar([i + 0.2 for i in x], [100 * r["test"] for r in rows], width=0.4, label="test")
    ax1.set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
    lo = min(100 * min(r["val"], r["test"]) for r in rows)
    ax1.set_ylim(max(0.0, lo - 3), 100 * max(max(r["val"], r["test"]) for r in rows) + 2)
    ax1.set_ylabel("accuracy (%)")
    ax1.set_title("ingredients and soups")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)
    ax2.plot([w["alpha"] for w in wise], [100 * w["val"] for w in wise], "o-", label="validation")
    ax2.plot([w["alpha"] for w in wise], [100 * w["test"] for w in wise], "s-", label="test")
    ax2.set_xlabel("alpha (0 = shared start, 1 = best fine-tune)")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("WiSE-FT")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        "# soupkit demo: model soups on all-MiniLM-L6-v2, tweet sentiment",
        "",
        f"{report['settings']['ingredients']} fine-tunes of one shared start "
        f"(pretrained encoder + linear probe); validation {report['settings']['val_examples']} "
        f"examples, test {report['settings']['test_examples']}; {report['settings']['threads']} "
        f"CPU threads; evaluation autocast: {report['settings']['eval_autocast']}; "
        f"{report['seconds']['total']:.0f} s in all.",
        "",
        "| model | validation acc. | test acc. | note |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {100 * r['val']:.2f} | {100 * r['test']:.2f} | {r.get('note', '')} |"
        )
    ci = report["bootstrap"]
    lines += [
        "",
        f"**Greedy soup minus best single fine-tune (by validation), test accuracy:** "
        f"{100 * ci['mean']:+.2f} points, 95% paired-bootstrap interval "
        f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] ({ci['samples']} resamples).",
        "",
        f"**Outcome.** {report['outcome']}",
        "",
        "![summary](summary.png)",
        "",
        "![greedy](greedy-soup.png)",
        "",
    ]
    return "\n".join(lines)


def _outcome(
    best: dict[str, Any],
    greedy: dict[str, Any],
    uniform: dict[str, Any],
    wise_best: dict[str, Any],
    ci: dict[str, float],
) -> str:
    d = 100 * (greedy["test"] - best["test"])
    if ci["low"] > 0:
        verdict = f"the greedy soup beats the best single fine-tune on test by {d:.2f} points, and the interval excludes zero."
    elif ci["high"] < 0:
        verdict = f"the greedy soup is worse than the best single fine-tune on test by {-d:.2f} points (the interval excludes zero)."
    else:
        verdict = (
            f"the greedy soup differs from the best single fine-tune on test by {d:+.2f} points; "
            "the interval includes zero, so this run does not show a significant difference."
        )
    u = 100 * (uniform["test"] - best["test"])
    w = 100 * (wise_best["test"] - best["test"])
    return (
        f"On this run {verdict} The uniform soup is {u:+.2f} points against the best single "
        f"model; the best WiSE-FT point on validation (alpha {wise_best['alpha']}) is {w:+.2f} "
        "points on test (there is no distribution-shift set here, which is where WiSE-FT helps)."
    )


def pin_run() -> None:
    """Offline, 2 threads, seeded: the same run prints the same table (also used by demo.optimize)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    random.seed(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI-sized run: a few hundred examples, 3 ingredients"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default results/demo[-quick])"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(".cache/demo"),
        help="data and trained ingredients (reused)",
    )
    parser.add_argument(
        "--learned-steps", type=int, default=None, help="learned-soup optimisation steps"
    )
    args = parser.parse_args(argv)

    pin_run()
    out: Path = args.out or Path("results/demo-quick" if args.quick else "results/demo")
    cache_dir = args.cache / ("quick" if args.quick else "standard")
    out.mkdir(parents=True, exist_ok=True)
    models_out = out / "models"

    import soupkit
    from demo.ingredients import build_ingredients
    from soupkit.evaluate import HFClassificationEvaluator
    from soupkit.search import ScoreCache

    t0 = time.perf_counter()
    _say("== 1/6 ingredients: data split, shared start (linear probe), fine-tune sweep (cached)")
    ing = build_ingredients(cache_dir, quick=args.quick, threads=THREADS)
    t_ing = time.perf_counter() - t0
    names = [p.name.split("-")[0] for p in ing.ingredients]

    _say("== 2/6 scoring every ingredient on validation and test")
    t1 = time.perf_counter()
    val_ev = HFClassificationEvaluator(ing.start, ing.data.val, **EVAL_SETTINGS)  # type: ignore[arg-type]
    test_ev = HFClassificationEvaluator(ing.start, ing.data.test, **EVAL_SETTINGS)  # type: ignore[arg-type]
    # greedy's content-hash cache, shared by every score of the run: a re-run evaluates nothing
    # twice, and greedy finds the ingredients' scores already there
    cache = ScoreCache(cache_dir / "scores.jsonl")
    vid, tid = _data_id("demo-val", ing.data.val), _data_id("demo-test", ing.data.test)
    score = _Scorer(val_ev, test_ev, cache, vid, tid, cache_dir / "test-correct")

    rows: list[dict[str, Any]] = []
    sv, st, _ = score(ing.start)
    rows.append(
        {"name": "shared start (probe)", "val": sv, "test": st, "note": "zero-shot analogue"}
    )
    singles = []
    for name, path in zip(names, ing.ingredients):
        v, t, c = score(path)
        singles.append({"name": name, "path": str(path), "val": v, "test": t, "correct": c})
        _say(f"   {name}: val {100 * v:.2f}  test {100 * t:.2f}")
    best = max(singles, key=lambda r: (r["val"], -singles.index(r)))
    for s in singles:
        rows.append(
            {
                "name": s["name"],
                "val": s["val"],
                "test": s["test"],
                "note": "best single (by validation)" if s is best else "fine-tune",
            }
        )

    _say("== 3/6 uniform soup")
    uni = soupkit.uniform_soup(ing.ingredients, models_out / "uniform", force=True)
    uv, ut, _ = score(uni.out)
    rows.append(
        {"name": "uniform soup", "val": uv, "test": ut, "note": f"all {len(singles)} ingredients"}
    )

    _say("== 4/6 greedy soup (selected on validation)")
    gr = soupkit.greedy_soup(
        ing.ingredients,
        val_ev,
        models_out / "greedy",
        test_evaluator=test_ev,
        cache=cache,
        evaluator_id=vid,
        test_evaluator_id=tid,
        force=True,
    )
    gv, gt, gcorrect = score(models_out / "greedy")
    chosen = [Path(p).name.split("-")[0] for p in gr.ingredients]
    rows.append(
        {"name": "greedy soup", "val": gv, "test": gt, "note": "ingredients: " + ", ".join(chosen)}
    )

    _say("== 5/6 WiSE-FT from the shared start to the best fine-tune")
    wise_runs = soupkit.wise_ft(
        ing.start, best["path"], models_out / "wise-ft", alphas=WISE_ALPHAS, force=True
    )
    wise = []
    for alpha, r in zip(WISE_ALPHAS, wise_runs):
        v, t, _ = score(r.out)
        wise.append({"alpha": alpha, "val": v, "test": t})
    wise_best = max(wise, key=lambda w: (w["val"], w["alpha"]))
    for w in wise:
        if 0 < w["alpha"] < 1:
            rows.append(
                {
                    "name": f"WiSE-FT alpha {w['alpha']}",
                    "val": w["val"],
                    "test": w["test"],
                    "note": "best WiSE-FT point" if w is wise_best else "",
                }
            )

    _say("== 6/6 learned soup (per-model coefficients trained on validation)")
    steps = args.learned_steps or (5 if args.quick else 30)
    model = val_ev.model  # the evaluator's model: built once, its weights are overwritten anyway
    model.requires_grad_(True)  # the evaluator froze it; coefficients need parameter gradients
    model.eval()  # no dropout: the loss is a function of the coefficients alone
    data = val_ev.labelled_batches()
    random.Random(0).shuffle(data)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=EVAL_SETTINGS["autocast"] is not None):
        lr_res = soupkit.learned_soup(
            ing.ingredients,
            data,
            models_out / "learned",
            model=model,
            steps=steps,
            lr=0.05,
            force=True,
        )
    lv, lt, _ = score(models_out / "learned")
    coeffs = ", ".join(f"{c:.2f}" for c in lr_res.coefficients)  # type: ignore[union-attr]
    rows.append(
        {
            "name": "learned soup",
            "val": lv,
            "test": lt,
            "note": f"coefficients {coeffs} ({steps} steps)",
        }
    )

    ci = paired_bootstrap(gcorrect, best["correct"])
    t_soups = time.perf_counter() - t1
    report: dict[str, Any] = {
        "settings": {
            "quick": args.quick,
            "threads": torch.get_num_threads(),
            "ingredients": len(singles),
            "val_examples": val_ev.total,
            "test_examples": test_ev.total,
            "eval_autocast": EVAL_SETTINGS["autocast"] or "off",
            "torch": torch.__version__,
            "soupkit": soupkit.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "rows": rows,
        "greedy": {
            "ingredients": chosen,
            "evaluations": gr.evaluations,
            "cache_hits": gr.cache_hits,
            "examples_saved": gr.examples_saved,
            "steps": [
                {
                    "candidate": Path(s.label).name.split("-")[0],
                    "score": s.candidate_score,
                    "complete": s.complete,
                    "accepted": s.accepted,
                }
                for s in gr.steps
            ],
        },
        "wise_ft": wise,
        "learned": {"coefficients": lr_res.coefficients, "steps": steps},
        "bootstrap": ci,
        "seconds": {
            "ingredients": round(t_ing, 1),
            "soups_and_scoring": round(t_soups, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
        "ingredient_training_seconds": ing.seconds,
    }
    report["outcome"] = _outcome(best, {"test": gt}, {"test": ut}, wise_best, ci)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if gr.plot is not None:
        (out / "greedy-soup.png").write_bytes(Path(gr.plot).read_bytes())
    _plot_summary(rows, wise, out / "summary.png")
    (out / "report.md").write_text(_markdown(report))

    width = max(len(r["name"]) for r in rows)
    print(f"\n{'model':<{width}}  {'val acc':>8}  {'test acc':>8}  note")
    for r in rows:
        print(
            f"{r['name']:<{width}}  {100 * r['val']:>8.2f}  {100 * r['test']:>8.2f}  {r.get('note', '')}"
        )
    print(
        f"\ngreedy - best single (test): {100 * ci['mean']:+.2f} points, 95% paired bootstrap "
        f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]"
    )
    print(report["outcome"])
    print(
        f"\n{report['seconds']['total']:.0f} s in all ({t_ing:.0f} s ingredients); wrote {out}/report.md, "
        f"report.json, summary.png, greedy-soup.png"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
