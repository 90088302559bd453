"""Measure what the safety checks cost on a ~200 MB merge (a manual script, not a test).

    .venv/bin/python tests/hostile/measure_overhead.py [--size-mb 200] [--reps 3] [--dir /tmp/x]

Three bf16 models of SIZE MB each are averaged into a bf16 output of SIZE MB (linear, default
chunking), in-process, page cache warm. Each configuration runs REPS times, interleaved, and
the median wall time and the median CPU time of the process (all threads; steadier than wall
time on a shared machine) are reported against the baseline with every check turned off:

- ``nonfinite``: the float32 and after-cast NaN/Inf checks (`soupkit.engine.execute.all_finite`);
- ``hash out``: the sha256 of each output shard, computed while it is written;
- ``hash in``: the sha256 of each input, in a background thread (``hash_inputs=True``);
- ``all``: the default (all three).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import soupkit
import soupkit.engine.core as ex
import soupkit.io.writer as wr


def make_models(root: Path, size_mb: int) -> list[Path]:
    rows = size_mb * 2**20 // 2 // 4096  # bf16: 2 bytes per element, 4096 columns
    out = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        tensors = {
            f"layer{j}.weight": torch.randn(rows // 8, 4096, generator=g).to(torch.bfloat16)
            for j in range(8)
        }
        p = root / f"m{i}.safetensors"
        save_file(tensors, str(p))
        out.append(p)
    return out


@contextmanager
def checks(nonfinite: bool, hash_out: bool) -> Iterator[None]:
    saved = (ex.all_finite, wr.ShardWriter.__init__, wr.sha256_file)
    if not nonfinite:
        ex.all_finite = lambda x: True  # type: ignore[assignment]
    if not hash_out:
        init = wr.ShardWriter.__init__

        def no_hash_init(self: Any, *a: Any, **k: Any) -> None:
            init(self, *a, **k)
            self._hash = None

        wr.ShardWriter.__init__ = no_hash_init  # type: ignore[method-assign]
        wr.sha256_file = lambda p: "0" * 64  # type: ignore[assignment]
    try:
        yield
    finally:
        ex.all_finite, wr.ShardWriter.__init__, wr.sha256_file = saved  # type: ignore[method-assign]


CONFIGS = {
    "baseline (all off)": (False, False, False),
    "nonfinite": (True, False, False),
    "hash out": (False, True, False),
    "hash in": (False, False, True),
    "all (default)": (True, True, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        root = Path(d)
        models = make_models(root, args.size_mb)
        recipe = {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}
        soupkit.merge(recipe, root / "warm", progress=False)  # warm the page cache
        times: dict[str, list[float]] = {k: [] for k in CONFIGS}
        cpu: dict[str, list[float]] = {k: [] for k in CONFIGS}
        n = 0
        for _ in range(args.reps):
            for name, (nonfinite, hash_out, hash_in) in CONFIGS.items():
                n += 1
                with checks(nonfinite, hash_out):
                    t0, c0 = time.perf_counter(), time.process_time()
                    soupkit.merge(recipe, root / f"out{n}", progress=False, hash_inputs=hash_in)
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        base = statistics.median(times["baseline (all off)"])
        base_cpu = statistics.median(cpu["baseline (all off)"])
        read = sum(m.stat().st_size for m in models)
        print(
            f"3 x {args.size_mb} MB bf16 -> {args.size_mb} MB bf16, {torch.get_num_threads()} torch threads, "
            f"median of {args.reps}"
        )
        for name, ts in times.items():
            med, c = statistics.median(ts), statistics.median(cpu[name])
            print(
                f"  {name:<20} wall {med:6.2f} s ({100 * (med / base - 1):+6.1f}%, {read / med / 1e9:5.2f} GB/s read)"
                f"   cpu {c:6.2f} s ({100 * (c / base_cpu - 1):+6.1f}%)"
            )


if __name__ == "__main__":
    main()
