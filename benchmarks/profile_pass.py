"""Where a merge pass spends its time: per phase, per thread kind, and per function.

Runs the merge pass of one recipe in this process (no input hashing, like ``ab.py``) and prints

- the pass time with user / system CPU of the process,
- wall time per engine phase (``prepass``: the counting passes a method declares, e.g. TIES's;
  ``merge``, ``copy``),
- with ``--cprofile``, the functions of the main thread by own time (torch kernels appear as
  their Python entry points: ``copy_`` is the dtype conversions, ``preadv`` the reads done on
  this thread).

The output folder is deleted first and ``sync`` run, so a run does not pay for the previous
one's writeback. For where the kernel's time goes, wrap it in ``perf``::

    .venv/bin/python benchmarks/profile_pass.py benchmarks/out/full/recipes/linear.yaml
    .venv/bin/python benchmarks/profile_pass.py benchmarks/out/full/recipes/ties.soupkit-mergekit.yaml --cprofile
    perf record -F 999 -g -o /tmp/perf.data .venv/bin/python benchmarks/profile_pass.py RECIPE
    perf report -i /tmp/perf.data --no-children --sort dso,sym --stdio
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--out", default="benchmarks/out/profile", help="output folder (replaced)")
    ap.add_argument("--threads", type=int, help="compute threads (default: the engine's)")
    ap.add_argument(
        "--cprofile", action="store_true", help="also profile the main thread's functions"
    )
    ap.add_argument("--top", type=int, default=20, help="functions to list with --cprofile")
    args = ap.parse_args(argv)

    import soupkit
    from soupkit.engine import execute, run_plan
    from soupkit.io.output import ShardFiles
    from soupkit.io.writer import OutputFolder

    soupkit.tune_allocator()
    shutil.rmtree(args.out, ignore_errors=True)
    subprocess.run(["sync"], check=False)
    phases: collections.Counter[str] = collections.Counter()
    real_unit = execute._Engine._unit

    def timed_unit(self: Any, u: Any) -> None:
        t = time.perf_counter()
        real_unit(self, u)
        phases[u.phase] += time.perf_counter() - t

    execute._Engine._unit = timed_unit  # type: ignore[method-assign]
    p = soupkit.plan(args.recipe)
    prof = cProfile.Profile() if args.cprofile else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if prof is not None:
        prof.enable()
    with OutputFolder(args.out, force=True) as tmp:
        sink = ShardFiles(tmp, p.shards)
        run_plan(p, sink, compute_threads=args.threads)
        sink.close()
    if prof is not None:
        prof.disable()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    gb = p.input_bytes / 1e9
    print(
        f"{Path(args.recipe).name}: pass {seconds:.2f} s ({gb / seconds:.2f} GB/s of {gb:.2f} GB), "
        f"user {after.ru_utime - before.ru_utime:.2f} s, system {after.ru_stime - before.ru_stime:.2f} s"
    )
    print(
        "phases (main thread wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.most_common())
    )
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
