"""A/B of greedy soup between two source trees: same history, same bytes, time and peak memory.

Greedy soup (exact and ``--sequential`` decisions) runs on synthetic bf16 ingredients with a
per-example accuracy evaluator, once per source tree and mode, each run in its own process
(glibc's mmap threshold pinned, so that the peak RSS is the live memory, not the allocator's
fragmentation). The script then checks that both trees wrote the same ``model.safetensors`` and
the same ``soupkit-report.json`` but for timings, and prints wall time and peak RSS:

    .venv/bin/python benchmarks/greedy_ab.py --a /path/to/main/src --b src --runs 2

Inputs: 8 ingredients of 8 tensors [1024, 2048] (32 MiB each in bf16, a 64 MiB float32 sum),
noise levels chosen so that the soup accepts some and rejects others; written once to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

N, SHAPE, TENSORS = 8, (1024, 2048), 8
NOISE = [0.3, 0.5, 0.4, 2.0, 0.6, 3.0, 0.45, 0.7]


def _ingredients(root: Path) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"w{j}": torch.randn(SHAPE, generator=g) for j in range(TENSORS)}
    paths = [root / f"ft{i}" for i in range(N)]
    if not all((p / "model.safetensors").is_file() for p in paths):
        for p, s in zip(paths, NOISE):
            p.mkdir(parents=True, exist_ok=True)
            state = {
                k: (v + s * torch.randn(SHAPE, generator=g)).to(torch.bfloat16)
                for k, v in base.items()
            }
            save_file(state, str(p / "model.safetensors"))
    return paths


class Accuracy:
    """Accuracy of the first four rows of ``w0`` as a linear classifier (0/1 per example)."""

    cache_key = "greedy-ab-accuracy"

    def __init__(self) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        w0 = torch.randn(SHAPE, generator=g)[:4]
        self.x = torch.randn(2000, SHAPE[1], generator=torch.Generator().manual_seed(1))
        self.y = (self.x @ w0.T).argmax(1)

    def n_examples(self) -> int:
        return len(self.y)

    def per_example(self, state, indices):  # type: ignore[no-untyped-def]
        import torch

        w = state["w0"][:4].float()
        return ((self.x[indices] @ w.T).argmax(1) == self.y[indices]).to(torch.float64)

    def __call__(self, state) -> float:  # type: ignore[no-untyped-def]
        return float(self.per_example(state, list(range(len(self.y)))).mean())


def _child(work: str, mode: str, out: str) -> None:
    import torch

    from soupkit.search import greedy_soup

    torch.set_num_threads(1)
    paths = _ingredients(Path(work) / "ingredients")
    kw = (
        {"sequential": True, "sequential_batch": 100, "delta": 0.05} if mode == "sequential" else {}
    )
    t0 = time.perf_counter()
    r = greedy_soup(
        paths, Accuracy(), out, cache=None, progress=False, plot=False, force=True, **kw
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"seconds": seconds, "max_rss_mb": peak / 1024, "steps": [s.accepted for s in r.steps]}
        )
    )


def _report(folder: Path) -> object:
    def strip(v: object) -> object:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("seconds", "created_unix")}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(json.loads((folder / "soupkit-report.json").read_text()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, help="source tree A (the folder holding soupkit/)")
    ap.add_argument("--b", required=True, help="source tree B")
    ap.add_argument("--work", default="benchmarks/out/greedy-ab", help="inputs and outputs")
    ap.add_argument("--runs", type=int, default=2, help="runs per tree and mode (best is kept)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return 0
    work = Path(args.work).resolve()
    ok = True
    for mode in ("exact", "sequential"):
        best: dict[str, dict[str, float]] = {}
        for k in range(args.runs):
            for name, src in (("A", args.a), ("B", args.b)):
                out = work / f"{mode}-{name}"
                cache = work / f"cache-{name}-{k}"  # the merges' digest cache, fresh per run
                shutil.rmtree(cache, ignore_errors=True)
                env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), OMP_NUM_THREADS="1")
                env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "SOUPKIT_CACHE_DIR": str(cache)}
                cmd = [
                    sys.executable,
                    __file__,
                    "--a",
                    "-",
                    "--b",
                    "-",
                    "--child",
                    str(work),
                    mode,
                    str(out),
                ]
                got = json.loads(
                    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                )
                if name not in best or got["seconds"] < best[name]["seconds"]:
                    best[name] = got
        same_bytes = (work / f"{mode}-A" / "model.safetensors").read_bytes() == (
            work / f"{mode}-B" / "model.safetensors"
        ).read_bytes()
        same_report = _report(work / f"{mode}-A") == _report(work / f"{mode}-B")
        ok = ok and same_bytes and same_report
        print(
            f"{mode:10s} A {best['A']['seconds']:6.2f} s {best['A']['max_rss_mb']:6.0f} MB | "
            f"B {best['B']['seconds']:6.2f} s {best['B']['max_rss_mb']:6.0f} MB | "
            f"same model bytes: {same_bytes}, same report but timings: {same_report}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
