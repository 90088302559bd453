"""Greedy soup's running sum (`RunningSum`) on the native kernels against torch, on real shapes.

    python benchmarks/running_sum.py [--data benchmarks/data/full] [--repeat 3] [--threads 1 2]

The running sum starts from ``ft1`` of ``--data`` (``generate.py``'s Llama-shaped bf16 models,
1.68 GB each) and times, summed over every tensor, the three operations greedy soup repeats per
candidate: ``add`` (``ft2`` into the float32 sum), ``mean + extra`` (the candidate soup ``(sum +
ft3) / 3`` in bfloat16) and ``mean`` (``sum / 2``). Reading a tensor from the file is not timed
(it happens before each timed operation; the page cache should be warm). Each variant runs
``--repeat`` times; the median is printed as a Markdown table with the GB/s of input read
(float32 sum plus bf16 ingredient), and every variant's bytes are checked against torch's.
``torch`` runs with torch's intra-op threads set to the thread count; ``kernels`` with the same
count of threads on the same setting (`soupkit.kernels.RunningSumOps` follows
``torch.get_num_threads()``).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from soupkit import kernels  # noqa: E402
from soupkit.io.checkpoint import open_checkpoint  # noqa: E402
from soupkit.io.reader import TensorReader  # noqa: E402
from soupkit.methods.linear import RunningSum  # noqa: E402

OPS = ("add", "mean + extra", "mean")


def run(data: Path, use_kernels: bool) -> tuple[dict[str, float], dict[str, float], str]:
    """One pass: seconds and input bytes per operation, and a digest of every result."""
    cks = [open_checkpoint(data / f"ft{i}") for i in (1, 2, 3)]
    ops = kernels.running_sum_ops() if use_kernels else None
    if use_kernels and ops is None:
        raise SystemExit("the kernels are not available (build them: make kernels)")
    secs = dict.fromkeys(OPS, 0.0)
    nbytes = dict.fromkeys(OPS, 0.0)
    digest = hashlib.sha256()
    with TensorReader() as reader:

        def read(k: int, name: str) -> torch.Tensor:
            info = cks[k].tensors[name]
            return reader.read(info).reshape(info.shape).clone()

        names = list(cks[0].tensors)
        total = RunningSum({n: read(0, n) for n in names}, ops=ops)
        for name in names:
            x = read(1, name)
            t0 = time.perf_counter()
            total.add(name, x)
            secs["add"] += time.perf_counter() - t0
            nbytes["add"] += x.numel() * (4 + x.element_size())
        total.added()
        for name in names:
            x = read(2, name)
            t0 = time.perf_counter()
            c = total.mean(name, x)
            secs["mean + extra"] += time.perf_counter() - t0
            nbytes["mean + extra"] += x.numel() * (4 + x.element_size())
            t0 = time.perf_counter()
            m = total.mean(name)
            secs["mean"] += time.perf_counter() - t0
            nbytes["mean"] += x.numel() * 4
            digest.update(c.view(torch.int16).numpy().tobytes())
            digest.update(m.view(torch.int16).numpy().tobytes())
            del c, m, x
    if ops is not None:
        assert ops.calls > 0
    return secs, nbytes, digest.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("benchmarks/data/full"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"kernels ISA: {kernels.isa()}, data: {args.data}, median of {args.repeat}\n")
    print("| threads | variant | " + " | ".join(OPS) + " | same bytes |")
    print("|---|---|" + "---|" * len(OPS) + "---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        ref = None
        for variant in ("torch", "kernels"):
            times: dict[str, list[float]] = {op: [] for op in OPS}
            for _ in range(args.repeat):
                secs, nbytes, digest = run(args.data, variant == "kernels")
                for op in OPS:
                    times[op].append(secs[op])
            ref = ref or digest
            cells = []
            for op in OPS:
                s = statistics.median(times[op])
                cells.append(f"{s:.2f} s ({nbytes[op] / s / 1e9:.1f} GB/s)")
            print(f"| {threads} | {variant} | " + " | ".join(cells) + f" | {digest == ref} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
