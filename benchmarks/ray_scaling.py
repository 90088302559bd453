#!/usr/bin/env python
"""Wall time of a sweep and a greedy soup against the number of Ray workers on this machine.

Each evaluation sleeps a fixed time (``--sleep``, default 0.5 s) before scoring a tiny linear
classifier, to stand in for a GPU-bound evaluation of a large model: the work is in the
evaluator, not in this machine's CPUs, so the numbers show how soupkit schedules evaluations,
not how fast two shared cores are. Every run is checked to give exactly the local result
(same chosen ingredients and scores, same written bytes).

Runs, all on one local Ray instance started with ``ray.init(num_cpus=2)``:

* ``sweep``: ``--points`` alpha values of WiSE-FT; the points are independent, so they spread
  over the workers;
* ``greedy``: ``--ingredients`` checkpoints; the ingredients' scores are independent; the
  accept / reject loop is sequential, and speculation (``speculate`` > 0) evaluates the next
  steps' candidates under both hypotheses on the free worker;
* ``local``: the same search in this process (``backend=None``), the reference.

Workers are capped with ``RayBackend(num_cpus=1, max_workers=N)``: N actors, each a process
that keeps its evaluator. Each backend is warmed up first (its actors started, the evaluator
built in each), as in a long-lived pool; that start-up is timed apart and printed above the table.

Usage::

    .venv/bin/python benchmarks/ray_scaling.py                       # ~1 min
    .venv/bin/python benchmarks/ray_scaling.py --sleep 1 --ingredients 12 --points 11
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

KINDS = [
    "good",
    "perm",
    "good",
    "noisy",
    "good",
    "good",
    "perm",
    "good",
    "noisy",
    "good",
    "good",
    "perm",
]

EVAL = """
import time
import torch

_x, _y = torch.load({data!r}, weights_only=True)
SLEEP = {sleep!r}

def evaluate(state):
    time.sleep(SLEEP)  # stands in for a GPU-bound evaluation
    logits = _x @ state["fc.weight"].float().T + state["fc.bias"].float()
    return int((logits.argmax(1) == _y).sum()) / len(_y)
"""


def make_problem(root: Path, n: int, sleep: float) -> tuple[list[Path], str]:
    """``n`` linear-classifier checkpoints (good ones average to the truth; perm / noisy ones
    hurt) and the spec of a sleeping accuracy evaluator."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 12, generator=g)
    x = torch.randn(1000, 12, generator=g)
    y = (x @ w.T).argmax(1)
    kinds = (KINDS * (n // len(KINDS) + 1))[:n]
    err = 1.2 * torch.randn(n, 3, 12, generator=g)
    goods = [i for i, k in enumerate(kinds) if k == "good"]
    err[goods] -= err[goods].mean(0)
    paths = []
    for i, kind in enumerate(kinds):
        weight = {
            "good": w + err[i],
            "perm": w[[1, 2, 0]] + 0.25 * err[i],
            "noisy": w + 5 * err[i],
        }[kind]
        folder = root / f"ft{i:02d}-{kind}"
        folder.mkdir(parents=True)
        save_file(
            {"fc.weight": weight, "fc.bias": 0.05 * torch.randn(3, generator=g)},
            str(folder / "model.safetensors"),
        )
        paths.append(folder)
    torch.save((x, y), root / "val.pt")
    (root / "sleepy_eval.py").write_text(
        textwrap.dedent(EVAL.format(data=str(root / "val.pt"), sleep=sleep))
    )
    return paths, f"{root / 'sleepy_eval.py'}:evaluate"


def weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sleep", type=float, default=0.5, help="seconds each evaluation sleeps (default 0.5)"
    )
    ap.add_argument(
        "--ingredients", type=int, default=8, help="checkpoints of the greedy soup (default 8)"
    )
    ap.add_argument("--points", type=int, default=8, help="grid points of the sweep (default 8)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    import ray

    from soupkit import RayBackend, RemoteEvaluator
    from soupkit.evaluate import load_evaluator
    from soupkit.search import greedy_soup, sweep

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="soupkit-ray-scaling-"))
    paths, spec = make_problem(root, args.ingredients, args.sleep)
    values = [round(i / (args.points - 1), 6) for i in range(args.points)]
    local_ev = load_evaluator(spec)
    remote_ev = RemoteEvaluator.from_spec(spec)
    rows: list[dict[str, Any]] = []
    startup: dict[int, float] = {}

    def run(search: str, be: RayBackend | None, speculate: int | None = None) -> None:
        out = root / f"{search}-{be.max_workers if be else 0}-{speculate}"
        ev = remote_ev if be is not None else local_ev
        t0 = time.perf_counter()
        if search == "sweep":
            r: Any = sweep(
                [paths[0], paths[2]], ev, values, out, evaluator_id="sleepy", backend=be, plot=False
            )
        else:
            r = greedy_soup(
                paths, ev, out, evaluator_id="sleepy", backend=be, speculate=speculate, plot=False
            )
        wall = time.perf_counter() - t0
        spec_d = (r.distributed or {}).get("speculation") or {}
        rows.append(
            {
                "search": search,
                "backend": "ray" if be else "local (no Ray)",
                "workers": be.max_workers if be else 1,
                "speculate": spec_d.get("depth", "") if search == "greedy" and be else "",
                "wall_s": round(wall, 2),
                "evaluations": r.evaluations,
                "launched": spec_d.get("launched", ""),
                "used": spec_d.get("used", ""),
                "wasted": spec_d.get("wasted", ""),
                "cancelled": spec_d.get("cancelled", ""),
                "result": (r.ingredients, r.score)
                if search == "greedy"
                else (r.best.value, r.best.score),
                "bytes": weights(out),
            }
        )

    run("sweep", None)
    run("greedy", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            with RayBackend(num_cpus=1, max_workers=workers) as be:
                # Start the actors (a process each, importing torch) and build the evaluator in
                # each, as a long-lived pool would have: timed apart from the searches.
                t0 = time.perf_counter()
                sweep(
                    [paths[0], paths[2]],
                    remote_ev,
                    [i / (2 * workers) for i in range(2 * workers)],
                    evaluator_id="warm-up",
                    backend=be,
                    plot=False,
                )
                startup[workers] = time.perf_counter() - t0
                run("sweep", be)
                for speculate in [0] if workers == 1 else [0, 1, 2]:
                    run("greedy", be, speculate)
    finally:
        ray.shutdown()
    rows.sort(key=lambda r: r["search"] == "greedy")

    print(
        f"evaluation = {args.sleep:g} s sleep + accuracy on 1000 examples; sweep: {args.points} points; "
        f"greedy: {args.ingredients} ingredients; machine: {os.cpu_count()} cores (shared); Ray actor "
        f"pool start-up (not in the table): "
        + ", ".join(f"{w} worker(s) {t:.1f} s" for w, t in startup.items())
    )
    print()
    print(
        "| search | backend | workers | speculate | wall (s) | evaluations | speculative launched / used / "
        "wasted / cancelled | speed-up vs local | same result and bytes as local |"
    )
    print("|---|---|---:|---:|---:|---:|---|---:|---|")
    differ = 0
    for row in rows:
        ref = next(
            r for r in rows if r["search"] == row["search"] and r["backend"].startswith("local")
        )
        same = row["result"] == ref["result"] and row["bytes"] == ref["bytes"]
        differ += not same
        spec_cells = (
            f"{row['launched']} / {row['used']} / {row['wasted']} / {row['cancelled']}"
            if row["launched"] != "" and row["speculate"]
            else ""
        )
        print(
            f"| {row['search']} | {row['backend']} | {row['workers']} | {row['speculate']} | {row['wall_s']:.2f} | "
            f"{row['evaluations']} | {spec_cells} | {ref['wall_s'] / row['wall_s']:.2f}x | {'yes' if same else 'NO'} |"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                [{k: v for k, v in r.items() if k != "bytes"} for r in rows], indent=2, default=str
            )
        )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
