"""Throughput of the fused elementwise kernels against the torch reference, in memory.

    python benchmarks/kernels.py [--elems 16777216] [--inputs 5] [--repeat 7] [--threads 1 2]
                                 [--inductor]

The inputs are ``--inputs`` random bfloat16 tensors of ``--elems`` elements each, already in
memory (no file, no page cache); the output is bfloat16. Each variant computes the weighted
mean in pieces of the engine's size (262,144 elements, its ``COMPUTE_ELEMS``), the pieces shared by
``--threads`` threads in turn, as the engine's compute threads share a unit:

- ``torch``: soupkit's reference path for one piece: each input copied into a reused float32
  buffer (``copy_``), ``methods.linear`` (``mul_``, ``addcmul_``, ``div_``), the result copied
  into the bfloat16 output (``copy_``), then the engine's NaN / Inf check (``all_finite``: a
  float32 sum);
- ``kernel-<isa>``: ``soupkit.kernels.linear`` on the same piece, with the instruction set
  forced to each level this CPU runs (``SOUPKIT_KERNELS_ISA``);
- ``torch.compile`` (with ``--inductor``): the same operations as ``torch``, compiled by
  TorchInductor into one C++ loop (needs a C++ compiler; compiling takes tens of seconds and
  is not timed). It is the alternative to a hand-written kernel that needs no build step.

It checks that every variant but ``torch.compile`` wrote the torch path's bytes (for that one
it reports how many elements differ), and prints the median time of ``--repeat``
runs and the throughput in GB/s of input read (the merge pass's figure in benchmarks/README.md)
as a Markdown table. torch runs with one intra-op thread, as in the engine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import soupkit.kernels as kernels  # noqa: E402
from soupkit.methods.linear import LinearParams, linear  # noqa: E402

COMPUTE_ELEMS = 1 << 18  # the engine's piece (COMPUTE_ELEMS in the engine's sizes module)

Piece = Callable[[int, int, int], None]


def torch_piece(
    inputs: list[torch.Tensor], out: torch.Tensor, p: LinearParams, threads: int
) -> Piece:
    works = [[torch.empty(COMPUTE_ELEMS) for _ in inputs] for _ in range(threads)]

    def piece(s: int, e: int, t: int) -> None:
        xs = [w[: e - s] for w in works[t]]
        for x, raw in zip(xs, inputs):
            x.copy_(raw[s:e])
        res = linear(xs, p)
        dest = out[s:e]
        dest.copy_(res)
        # the engine's all_finite(): a float32 sum first, the exact test only if it is not finite
        if not bool(torch.isfinite(dest.sum(dtype=torch.float32))):
            raise RuntimeError("non-finite")

    return piece


def kernel_piece(inputs: list[torch.Tensor], out: torch.Tensor, w: list[float]) -> Piece:
    def piece(s: int, e: int, t: int) -> None:
        if kernels.linear(out[s:e], [x[s:e] for x in inputs], w):
            raise RuntimeError("non-finite")

    return piece


def inductor_piece(inputs: list[torch.Tensor], out: torch.Tensor, w: list[float]) -> Piece:
    wt = torch.tensor(w, dtype=torch.float32)
    total = wt.sum()

    def f(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        acc = xs[0].float() * wt[0]
        for x, wi in zip(xs[1:], wt[1:]):
            acc = torch.addcmul(acc, x.float(), wi)
        res = (acc / total).to(torch.bfloat16)
        return res, torch.isfinite(res).all()

    compiled = torch.compile(f, dynamic=False)

    def piece(s: int, e: int, t: int) -> None:
        res, ok = compiled(*[x[s:e] for x in inputs])
        out[s:e].copy_(res)
        if not bool(ok):
            raise RuntimeError("non-finite")

    return piece


def run(piece: Piece, n: int, threads: int, pool: concurrent.futures.ThreadPoolExecutor) -> float:
    """Seconds for the whole tensor, pieces taken in turn by `threads` threads."""
    ranges = [(s, min(n, s + COMPUTE_ELEMS)) for s in range(0, n, COMPUTE_ELEMS)]
    t0 = time.perf_counter()
    if threads == 1:
        for s, e in ranges:
            piece(s, e, 0)
    else:
        it = iter(ranges)

        def share(t: int) -> None:
            with torch.inference_mode():
                for s, e in it:  # next() on a shared iterator: each range goes to one thread
                    piece(s, e, t)

        list(pool.map(share, range(threads)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--elems", type=int, default=1 << 24, help="elements per input (default 16 Mi)")
    ap.add_argument("--inputs", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--inductor", action="store_true", help="also time torch.compile (slow start)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not kernels.available():
        sys.exit("soupkit.kernels is not available: run `make kernels` (or unset SOUPKIT_KERNELS)")
    g = torch.Generator().manual_seed(0)
    n = args.elems
    inputs = [torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(args.inputs)]
    w = [1.0 / (i + 1) for i in range(args.inputs)]
    p = LinearParams(weight=tuple(w), normalize=True)
    gb_in = n * 2 * args.inputs / 1e9
    isas = ["portable", "avx2", "avx512"]
    isas = isas[: isas.index(kernels.best_isa() or "portable") + 1]
    print(
        f"{args.inputs} bfloat16 inputs x {n:,} elements ({gb_in:.2f} GB in), bfloat16 out, "
        f"pieces of {COMPUTE_ELEMS:,}, median of {args.repeat}; CPU: {kernels.best_isa()}, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})\n"
    )
    print("| variant | threads | median s | GB/s in | vs torch |")
    print("|---|---|---|---|---|")
    with concurrent.futures.ThreadPoolExecutor(max(args.threads)) as pool:
        for threads in args.threads:
            outs: dict[str, torch.Tensor] = {}
            times: dict[str, float] = {}
            variants: list[tuple[str, str | None]] = [("torch", None)] + [
                (f"kernel-{i}", i) for i in reversed(isas)
            ]
            if args.inductor:
                variants.append(("torch.compile", None))
            for name, isa in variants:
                out = torch.empty(n, dtype=torch.bfloat16)
                if name == "torch.compile":
                    piece = inductor_piece(inputs, out, w)
                elif isa is None:
                    piece = torch_piece(inputs, out, p, threads)
                else:
                    os.environ[kernels.ISA_ENV] = isa
                    piece = kernel_piece(inputs, out, w)
                run(piece, n, threads, pool)  # warm-up (page faults of the output, buffers)
                times[name] = statistics.median(
                    run(piece, n, threads, pool) for _ in range(args.repeat)
                )
                outs[name] = out
                os.environ.pop(kernels.ISA_ENV, None)
            for name, t in times.items():
                differ = int(
                    (outs[name].view(torch.int16) != outs["torch"].view(torch.int16)).sum()
                )
                if differ and name != "torch.compile":
                    sys.exit(f"{name} wrote different bytes than torch")
                note = f" ({differ:,} elements differ from torch)" if differ else ""
                print(
                    f"| {name}{note} | {threads} | {t:.3f} | {gb_in / t:.2f} | "
                    f"{times['torch'] / t:.1f}x |"
                )
    print("\nthe kernels wrote the torch path's bytes")


if __name__ == "__main__":
    main()
