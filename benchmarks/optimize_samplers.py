"""TPE vs CMA-ES vs random for `soupkit optimize` on a small case (the figure in docs/optimize.md).

The case: tests/search/optimize_toy.py, 4 models x 5 per-layer weights (20 parameters), bounded
accuracy on 400 validation examples, re-scored on 400 held-out ones. For each sampler and seed,
the best validation score after 20, 40 and 80 trials, and the held-out score of the final best.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/optimize_samplers.py   (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "search"))

import optimize_toy as toy

from soupkit.search.recipe_search import optimize

SEEDS = (0, 1, 2)
CHECKS = (20, 40, 80)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = toy.ingredients(Path(tmp) / "ing")
        print(
            f"{'sampler':8} {'seed':>4} "
            + " ".join(f"{'best@' + str(c):>8}" for c in CHECKS)
            + f" {'held-out':>8} {'s':>5}"
        )
        for sampler in ("tpe", "cmaes", "random"):
            for seed in SEEDS:
                t0 = time.perf_counter()
                r = optimize(
                    toy.space(paths),
                    toy.Accuracy("val"),
                    Path(tmp) / f"{sampler}-{seed}",
                    trials=max(CHECKS),
                    holdout_evaluator=toy.Accuracy("holdout"),
                    sampler=sampler,
                    seed=seed,
                    top=1,
                    progress=False,
                    plot=False,
                    write_model=False,
                )
                best = [
                    max(
                        (t.score for t in r.trials[:c] if t.state == "complete"),
                        default=float("nan"),
                    )
                    for c in CHECKS
                ]
                print(
                    f"{sampler:8} {seed:>4} "
                    + " ".join(f"{b:>8.4f}" for b in best)
                    + f" {r.best.holdout:>8.4f} {time.perf_counter() - t0:>5.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
