"""Greedy soup with paired sequential decisions against the exact mode, on the demo's ingredients.

Question: how many validation examples does the greedy soup evaluate with
``greedy_soup(..., sequential=True, delta=...)`` compared with the exact mode, and how often does
it select a different soup, over many seeds of the evaluation order?

Every candidate soup met (in any run) is evaluated **once** on every validation example with the
demo's own evaluator (`HFClassificationEvaluator`, the demo's settings), and its per-example
correctness is kept in ``--store`` (keyed by a fingerprint of the weights). The runs then go
through the real `soupkit.greedy_soup` code with an evaluator that answers from that store and
counts every example it is asked for: the counts are exactly what each mode would have evaluated,
and repeating over many orders costs no model evaluation. Both modes see the same per-example
correctness, so "same soup" compares decisions, not rounding differences between batchings.

The exact mode here uses soupkit's exact early rejection (batches of 128 in file order), as a
`BoundedEvaluator` does.

Run (from the repository root, after ``make demo`` has built the ingredients)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/greedy_sequential.py --seeds 50 --delta 0.01 \\
        --delta 0.05 --margin 0 --margin 0.01 --results benchmarks/results/greedy-sequential
    # where candidates differ clearly: the test suite's toy problem (seconds)
    .venv/bin/python benchmarks/greedy_sequential.py --toy --seeds 100 --delta 0.01 --batch 100 \\
        --store benchmarks/out/toy-correctness.pt --results benchmarks/results/greedy-sequential-toy

Writes ``RESULTS.json`` and ``RESULTS.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A content key of a state dict: every tensor's name, dtype, shape and first 4096 values
    (distinct soups of these ingredients differ in every averaged tensor)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().view(-1)[:4096]
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}".encode())
        h.update(
            t.view(torch.uint8).numpy().tobytes()
            if t.dtype != torch.bfloat16
            else t.view(torch.int16).numpy().tobytes()
        )
    return h.hexdigest()


class StoredCorrectness:
    """Per-example correctness of every state met, computed once with ``inner``, kept in ``path``.

    ``__call__`` / ``evaluate`` (exact early rejection, batches of ``batch`` in file order) and
    ``per_example`` answer from it; ``asked`` counts the examples each call asked for.
    """

    def __init__(self, inner: Any, path: Path, batch: int = 128) -> None:
        self.inner, self.path, self.batch = inner, path, batch
        self.n = int(inner.n_examples())
        self.table: dict[str, torch.Tensor] = torch.load(path) if path.is_file() else {}
        self.asked = 0
        self.computed = 0

    def _vector(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        key = fingerprint(state)
        got = self.table.get(key)
        if got is None:
            got = self.inner.per_example(state, range(self.n)).to(torch.bool)
            self.table[key] = got
            self.computed += 1
            tmp = self.path.with_suffix(".tmp")
            torch.save(self.table, tmp)
            os.replace(tmp, self.path)
        return got

    def n_examples(self) -> int:
        return self.n

    def per_example(
        self, state: Mapping[str, torch.Tensor], indices: Sequence[int]
    ) -> torch.Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        self.asked += len(idx)
        return self._vector(state)[idx].float()

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        return self.evaluate(state).score

    def evaluate(
        self, state: Mapping[str, torch.Tensor], *, need: float | None = None, strict: bool = False
    ) -> Any:
        from soupkit.evaluate.protocol import EvalResult, accuracy_bound, meets

        v = self._vector(state)
        correct = done = 0
        for a in range(0, self.n, self.batch):
            if need is not None and not meets(
                accuracy_bound(correct, self.n - done, self.n), need, strict=strict
            ):
                return EvalResult(
                    accuracy_bound(correct, self.n - done, self.n), done, self.n, False
                )
            part = v[a : a + self.batch]
            correct += int(part.sum())
            done += len(part)
        self.asked += done
        return EvalResult(correct / self.n, done, self.n, True)


def run_once(
    ingredients: list[str], ev: StoredCorrectness, workdir: Path, tag: str, **kw: Any
) -> dict[str, Any]:
    from soupkit.search import ScoreCache, greedy_soup

    before = ev.asked
    # A fresh score cache per run (nothing answered from an earlier run); file digests are shared
    # through soupkit's own cache of input digests, so the runs do not re-hash the checkpoints.
    r = greedy_soup(
        ingredients,
        ev,
        cache=ScoreCache(workdir / f"{tag}.jsonl"),
        evaluator_id=f"bench-{tag}",
        progress=False,
        **kw,
    )
    n = ev.n
    steps = [
        {
            "label": Path(s.label).name,
            "accepted": s.accepted,
            "examples_used": s.examples_used,
            "soup_examples": s.soup_examples,
            "better": s.better,
            "worse": s.worse,
            "error_bound": s.error_bound,
            "candidate_score": s.candidate_score,
        }
        for s in r.steps
    ]
    cand = (
        sum(s.examples + s.soup_examples for s in r.steps)
        if kw.get("sequential")
        else sum(s.examples for s in r.steps)
    )
    return {
        "soup": [Path(p).name for p in r.ingredients],
        "examples_all": ev.asked - before,
        "examples_candidates": cand,
        "examples_ingredients": len(ingredients) * n,
        "steps": steps,
        "score": r.score,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--demo-cache",
        type=Path,
        default=ROOT / ".cache" / "demo" / "standard",
        help="the demo's cache (make demo): models/ and data/ (read only)",
    )
    ap.add_argument(
        "--toy",
        action="store_true",
        help="instead of the demo: the test suite's toy problem (tests/search/soup_toy.py: 4 good, "
        "2 harmful ingredients, 2,000 examples), where candidates differ clearly",
    )
    ap.add_argument("--seeds", type=int, default=100, help="evaluation orders (seeds 0..N-1)")
    ap.add_argument(
        "--delta",
        type=float,
        action="append",
        default=None,
        help="delta (repeatable; default 0.01)",
    )
    ap.add_argument(
        "--margin",
        type=float,
        action="append",
        default=None,
        help="indifference margin in accuracy (repeatable; default 0); every delta x margin is run",
    )
    ap.add_argument(
        "--batch", type=int, default=128, help="examples between two checks of the test"
    )
    ap.add_argument(
        "--store",
        type=Path,
        default=ROOT / "benchmarks" / "out" / "greedy-sequential-correctness.pt",
        help="per-example correctness of every soup met (reused by later runs)",
    )
    ap.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "greedy-sequential"
    )
    args = ap.parse_args(argv)
    configs = [(d, m) for d in (args.delta or [0.01]) for m in (args.margin or [0.0])]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    args.store.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.toy:
            sys.path.insert(0, str(ROOT / "tests" / "search"))
            import soup_toy as toy

            kinds = ["good", "perm", "good", "noisy", "good", "good"]
            ingredients = [str(p) for p in toy.make_ingredients(work / "toy", kinds)]
            _, xv, yv, _, _ = toy.problem(n=2000)
            inner: Any = toy.PerExampleAccuracy(xv, yv)
            settings: dict[str, Any] = {"toy": "tests/search/soup_toy.py", "kinds": kinds}
        else:
            from demo.__main__ import EVAL_SETTINGS
            from soupkit.evaluate import HFClassificationEvaluator

            models = args.demo_cache / "models"
            ingredients = sorted(
                str(p) for p in models.glob("ft*-*") if (p / "model.safetensors").is_file()
            )
            val = args.demo_cache / "data" / "val.csv"
            if len(ingredients) < 2 or not val.is_file():
                print(
                    f"error: no demo ingredients under {models} (run make demo first)",
                    file=sys.stderr,
                )
                return 2
            inner = HFClassificationEvaluator(next(models.glob("start-*")), val, **EVAL_SETTINGS)  # type: ignore[arg-type]
            settings = dict(EVAL_SETTINGS)
        ev = StoredCorrectness(inner, args.store)
        out: dict[str, Any] = {
            "ingredients": [Path(p).name for p in ingredients],
            "examples": ev.n,
            "eval_settings": settings,
            "batch": args.batch,
            "seeds": args.seeds,
            "runs": {},
        }
        exact = run_once(ingredients, ev, work, "exact")
        full = run_once(ingredients, ev, work, "full", early_stop=False)
        # One check after every example: the exact decisions, with the full-set discordant counts.
        counts = run_once(ingredients, ev, work, "counts", sequential=True, sequential_batch=ev.n)
        out["exact"], out["full"], out["full_counts"] = exact, full, counts
        print(
            f"exact mode: soup {exact['soup']}, candidate examples {exact['examples_candidates']:,} "
            f"(without early rejection {full['examples_candidates']:,})",
            flush=True,
        )
        for delta, margin in configs:
            runs = []
            for seed in range(args.seeds):
                tag = f"d{delta}-m{margin}-s{seed}"
                runs.append(
                    run_once(
                        ingredients,
                        ev,
                        work,
                        tag,
                        sequential=True,
                        delta=delta,
                        margin=margin,
                        order_seed=seed,
                        sequential_batch=args.batch,
                    )
                )
                (work / f"{tag}.jsonl").unlink(missing_ok=True)
            same = sum(r["soup"] == exact["soup"] for r in runs)
            cand = [r["examples_candidates"] for r in runs]
            mean_cand = sum(cand) / len(cand)
            summary = {
                "delta": delta,
                "margin": margin,
                "same_soup": same,
                "orders": len(runs),
                "same_soup_rate": same / len(runs),
                "mean_candidate_examples": mean_cand,
                "fraction_of_exact": mean_cand / exact["examples_candidates"],
                "fraction_of_full": mean_cand / full["examples_candidates"],
                "max_candidate_examples": max(cand),
                "min_candidate_examples": min(cand),
                "mean_all_examples": sum(r["examples_all"] for r in runs) / len(runs),
                "different_soups": sorted(
                    {" + ".join(r["soup"]) for r in runs if r["soup"] != exact["soup"]}
                ),
            }
            out["runs"][f"{delta}/{margin}"] = {"summary": summary, "runs": runs}
            print(json.dumps(summary), flush=True)
    out["soups_evaluated_fully"] = len(ev.table)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        f"# Greedy soup: sequential vs exact decisions ({len(ingredients)} {'toy' if args.toy else 'demo'} ingredients, "
        f"{ev.n:,} validation examples, {args.seeds} evaluation orders)",
        "",
        f"exact mode: soup {' + '.join(exact['soup'])}; candidate examples {exact['examples_candidates']:,} "
        f"with exact early rejection, {full['examples_candidates']:,} without",
        "",
        "| delta | margin | same soup as exact | candidate examples (mean) | of exact mode | of no early "
        "rejection | min / max | all examples incl. ingredients (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for delta, margin in configs:
        s = out["runs"][f"{delta}/{margin}"]["summary"]
        lines.append(
            f"| {delta:g} | {margin:g} | {s['same_soup']}/{s['orders']} ({100 * s['same_soup_rate']:.0f} %) | "
            f"{s['mean_candidate_examples']:,.0f} | {100 * s['fraction_of_exact']:.1f} % | "
            f"{100 * s['fraction_of_full']:.1f} % | {s['min_candidate_examples']:,} / "
            f"{s['max_candidate_examples']:,} | {s['mean_all_examples']:,.0f} |"
        )
    lines += [
        "",
        "Each step of the exact run, on all examples: the candidate is better than the soup on `+B` "
        "examples and worse on `-A`; the exact rule accepts when `B >= A`.",
        "",
    ]
    lines += [
        "| step | candidate | accepted | candidate accuracy | +B / -A |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {s['label']} | {s['accepted']} | {s['candidate_score']:.4f} | +{s['better']} / -{s['worse']} |"
        for k, s in enumerate(counts["steps"], start=1)
    ]
    args.results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
