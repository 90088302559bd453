"""A/B runs of one recipe under engine settings: compute threads and allocator tuning.

Each run is its own process (the allocator setting is process-wide and cannot be undone), the
configurations alternate, the output is deleted and ``sync`` flushed between runs, and the
medians are printed with the CPU split (user / system seconds of the merge process):

    .venv/bin/python benchmarks/ab.py benchmarks/out/full/recipes/linear.yaml \\
        --configs 1,1+tune,2,2+tune --runs 3

A configuration is ``THREADS`` or ``THREADS+tune``: THREADS compute threads for every kind of
piece (`soupkit.engine.execute.run_plans(compute_threads=...)`), ``+tune`` with
`soupkit.tune_allocator()` as the ``soupkit`` command applies it. Inputs are not hashed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _child(recipe: str, out: str, threads: int, tune: bool) -> None:
    import soupkit
    from soupkit.engine import run_plan
    from soupkit.io.output import ShardFiles
    from soupkit.io.writer import OutputFolder

    if tune:
        soupkit.tune_allocator()
    p = soupkit.plan(recipe)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with OutputFolder(out, force=True) as tmp:
        sink = ShardFiles(tmp, p.shards)
        run_plan(p, sink, compute_threads=threads)
        sink.close()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "user": after.ru_utime - before.ru_utime,
                "sys": after.ru_stime - before.ru_stime,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--configs", default="1,2", help="comma-separated THREADS[+tune] (default 1,2)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/ab", help="output folder (replaced every run)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    configs = [(int(c.split("+")[0]), c.endswith("+tune")) for c in args.configs.split(",")]
    if args.child:
        threads, tune = configs[0]
        _child(args.recipe, args.out, threads, tune)
        return 0
    results: dict[str, list[dict[str, float]]] = {c: [] for c in args.configs.split(",")}
    for r in range(args.runs):
        for name, (_threads, _tune) in zip(results, configs):
            shutil.rmtree(args.out, ignore_errors=True)
            os.sync()
            cmd = [
                sys.executable,
                __file__,
                args.recipe,
                "--child",
                "--configs",
                name,
                "--out",
                args.out,
            ]
            line = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            results[name].append(json.loads(line))
            m = results[name][-1]
            print(
                f"run {r + 1}/{args.runs} {name:>8}: pass {m['seconds']:.2f} s, user {m['user']:.1f} s, "
                f"sys {m['sys']:.1f} s",
                flush=True,
            )
    print(f"\nmedians over {args.runs} runs ({Path(args.recipe).name}):")
    for name, ms in results.items():
        med = {k: statistics.median(m[k] for m in ms) for k in ("seconds", "user", "sys")}
        print(
            f"  {name:>8}: pass {med['seconds']:.2f} s, user {med['user']:.1f} s, sys {med['sys']:.1f} s"
        )
    shutil.rmtree(args.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
