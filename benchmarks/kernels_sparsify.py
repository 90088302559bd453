"""GB/s of the native TIES / DARE-TIES / DELLA / Breadcrumbs kernels against the torch reference.

One realistic tensor: an MLP projection of a 7B Llama (5504 x 2048), bfloat16, a base and 4
fine-tunes (base + 0.01 * N(0, 1)), the default ``convention: mergekit`` (DARE / DELLA: L1
rescale). GB/s counts the bytes read (5 inputs x 2 bytes per element); each figure is the
median of ``--repeats`` runs, all in memory (no I/O).

- ``kernel``: `soupkit.kernels.sparsify` (1 thread: one call on the whole tensor, which for TIES
  and Breadcrumbs includes the C radix select of the cuts, and for DARE one call per engine
  block of 2^20 elements, each drawing from ``rng.at(start)``: mergekit's L1 rescale is per
  block; 2 threads, the GIL released: DARE's blocks shared by two Python threads; TIES counts
  its histograms per half, adds them, and the second half starts from the tie quota the first
  leaves; DELLA and Breadcrumbs run whole tensors only, so only 1 thread is measured).
- ``torch``: the reference as the engine runs it today, with torch's intra-op threads set to 1 or
  2: TIES' cuts from the same radix select counted by ``torch.bincount`` over the engine's
  pieces of 2^18 elements, and the method on those pieces with the tie quota spent in order
  (`soupkit.kernels.sparsify` with ``SOUPKIT_KERNELS=0``, which is the engine's arithmetic);
  DARE on the engine's blocks of 2^20 elements; DELLA and Breadcrumbs on the whole float32
  tensor (``MethodSpec.call``).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kernels_sparsify.py`` (after
``make kernels``). The outputs of both paths are compared byte for byte before timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from soupkit.kernels import sparsify as K
from soupkit.methods import CounterRNG, MagnitudeCut
from soupkit.methods import get as get_method
from soupkit.methods._topk import select_bucket

# the engine's piece of cheap elementwise work and its block of stochastic methods
# (soupkit._sizes; not imported: the engine's modules are moving, issue 16)
COMPUTE_ELEMS = 1 << 18
RNG_BLOCK = 1 << 20
SHAPE = (5504, 2048)
MODELS = 4

PARAMS: dict[str, dict[str, Any]] = {
    "ties": {"density": [0.5] * MODELS},
    "dare_ties": {"density": [0.3] * MODELS},
    "della": {"density": [0.5] * MODELS, "epsilon": [0.1] * MODELS},
    "breadcrumbs": {"density": [0.5] * MODELS, "gamma": [0.01] * MODELS},
}


def _inputs() -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(SHAPE, generator=g) * 0.02).to(torch.bfloat16)
    xs = [
        (base.float() + 0.01 * torch.randn(SHAPE, generator=g)).to(torch.bfloat16)
        for _ in range(MODELS)
    ]
    return xs, base


def _median(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


# ---------------------------------------------------------------------------- torch reference


def radix_cuts(
    flat: list[torch.Tensor],
    b: torch.Tensor,
    density: tuple[float, ...],
    parts: list[tuple[int, int]],
    pool: concurrent.futures.Executor | None = None,
) -> list[MagnitudeCut | None]:
    """Each model's top-k cut by the two-pass radix select, its histograms counted per part
    (in a pool: one part per thread) and added; finite deltas (no NaN to count apart)."""
    n = b.numel()
    run = pool.map if pool is not None else map

    def hist(i: int, bucket: int, se: tuple[int, int]) -> torch.Tensor:
        h = torch.zeros(1 << 15 if bucket < 0 else 1 << 16, dtype=torch.int64)
        K.magnitude_hist(flat[i][se[0] : se[1]], b[se[0] : se[1]], h, bucket)
        return h

    cuts: list[MagnitudeCut | None] = []
    for i, d in enumerate(density):
        k = int(d * n)
        hi = sum(run(functools.partial(hist, i, -1), parts))
        bucket, above_hi = select_bucket(hi, k)
        lo = sum(run(functools.partial(hist, i, bucket), parts))
        low, above_lo = select_bucket(lo, k - above_hi)
        t = float(torch.tensor([(bucket << 16) | low], dtype=torch.int32).view(torch.float32))
        need = k - above_hi - above_lo
        cuts.append(MagnitudeCut(t, None if need == int(lo[low]) else need))
    return cuts


def torch_ties(xs: list[torch.Tensor], base: torch.Tensor, p: Any) -> torch.Tensor:
    """TIES as the engine streams it, on torch: radix-select cuts over pieces, then the method
    per piece with the tie quotas spent in order."""
    n = base.numel()
    flat = [x.reshape(-1) for x in xs]
    b = base.reshape(-1)
    pieces = _chunks(n, COMPUTE_ELEMS)
    with _torch_path():
        cuts = radix_cuts(flat, b, p.density, pieces)
        quota = [c.ties if (c is not None and c.ties is not None) else 0 for c in cuts]
        out = torch.empty(n, dtype=torch.float32)
        for s, e in pieces:
            K.ties_piece([x[s:e] for x in flat], b[s:e], p, cuts, quota, out=out[s:e])
    return out


@contextlib.contextmanager
def _torch_path() -> Iterator[None]:
    old = os.environ.get("SOUPKIT_KERNELS")
    os.environ["SOUPKIT_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SOUPKIT_KERNELS"]
        else:
            os.environ["SOUPKIT_KERNELS"] = old


def torch_dare(xs: list[torch.Tensor], base: torch.Tensor, p: Any, rng: CounterRNG) -> torch.Tensor:
    n = base.numel()
    flat = [x.reshape(-1) for x in xs]
    b = base.reshape(-1)
    spec = get_method("dare_ties")
    out = torch.empty(n, dtype=torch.float32)
    for s, e in _chunks(n, RNG_BLOCK):
        xs_f32 = [x[s:e].float() for x in flat]
        out[s:e] = spec.call(xs_f32, p, base=b[s:e].float(), rng=rng.at(s))
    return out


def torch_whole(
    name: str, xs: list[torch.Tensor], base: torch.Tensor, p: Any, rng: CounterRNG
) -> torch.Tensor:
    spec = get_method(name)
    return spec.call([x.float() for x in xs], p, base=base.float(), rng=rng).reshape(-1)


# ---------------------------------------------------------------------------- kernels, 2 threads


def kernel_ties_2(
    xs: list[torch.Tensor], base: torch.Tensor, p: Any, pool: concurrent.futures.Executor
) -> torch.Tensor:
    n = base.numel()
    flat = [x.reshape(-1) for x in xs]
    b = base.reshape(-1)
    half = n // 2
    cuts = radix_cuts(flat, b, p.density, [(0, half), (half, n)], pool)
    q0 = [c.ties if (c is not None and c.ties is not None) else 0 for c in cuts]
    q1 = list(q0)
    for i, c in enumerate(cuts):  # the second half starts where the first leaves the quota
        if c is not None and c.ties is not None:
            q1[i] -= min(q1[i], K.count_equal(flat[i][:half], b[:half], c.threshold))
    out = torch.empty(n, dtype=torch.float32)
    list(
        pool.map(
            lambda sq: K.ties_piece(
                [x[sq[0] : sq[1]] for x in flat],
                b[sq[0] : sq[1]],
                p,
                cuts,
                sq[2],
                out=out[sq[0] : sq[1]],
            ),  # fmt: skip
            [(0, half, q0), (half, n, q1)],
        )
    )
    return out


def kernel_dare(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    p: Any,
    rng: CounterRNG,
    pool: concurrent.futures.Executor | None,
) -> torch.Tensor:
    """DARE on the engine's blocks of 2^20 elements (its L1 rescale is per block), shared by
    the threads of ``pool`` (None: this thread)."""
    n = base.numel()
    flat = [x.reshape(-1) for x in xs]
    b = base.reshape(-1)
    out = torch.empty(n, dtype=torch.float32)

    def block(se: tuple[int, int]) -> torch.Tensor:
        s, e = se
        xs_p = [x[s:e] for x in flat]
        return K.merge("dare_ties", xs_p, b[s:e], p, rng=rng.at(s), out=out[s:e])

    list((pool.map if pool is not None else map)(block, _chunks(n, RNG_BLOCK)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", choices=sorted(PARAMS), default=list(PARAMS))
    ap.add_argument("--threads", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    ap.add_argument(
        "--paper-rescale",
        action="store_true",
        help="DARE: rescale: density, DELLA: rescale: probability (default: mergekit's L1)",
    )
    args = ap.parse_args()
    if args.paper_rescale:
        PARAMS["dare_ties"]["rescale"] = "density"
        PARAMS["della"]["rescale"] = "probability"
    if not K.native():
        raise SystemExit("the native kernels are not built: run `make kernels` first")
    xs, base = _inputs()
    n = base.numel()
    gb = (MODELS + 1) * n * 2 / 1e9
    rng = CounterRNG(1234)
    print(
        f"{SHAPE[0]}x{SHAPE[1]} bf16, base + {MODELS} fine-tunes: {gb * 1e3:.0f} MB read per merge"
    )
    print("| method | path | threads | s (median) | GB/s |")
    print("|---|---|---|---|---|")
    pool = concurrent.futures.ThreadPoolExecutor(2)
    for name in args.methods:
        raw = PARAMS[name]
        p = get_method(name).params.model_validate({"weight": [1.0] * MODELS, **raw})
        runs: dict[tuple[str, int], Callable[[], torch.Tensor]] = {}
        if name == "dare_ties":
            runs[("kernel", 1)] = functools.partial(kernel_dare, xs, base, p, rng, None)
        else:
            runs[("kernel", 1)] = functools.partial(K.merge, name, xs, base, p, rng=rng)
        ref: Callable[[], torch.Tensor]
        if name == "ties":
            runs[("kernel", 2)] = functools.partial(kernel_ties_2, xs, base, p, pool)
            ref = functools.partial(torch_ties, xs, base, p)
        elif name == "dare_ties":
            runs[("kernel", 2)] = functools.partial(kernel_dare, xs, base, p, rng, pool)
            ref = functools.partial(torch_dare, xs, base, p, rng)
        else:
            ref = functools.partial(torch_whole, name, xs, base, p, rng)
        want = ref()
        for (path, threads), fn in runs.items():
            got = fn()
            if not torch.equal(got.view(torch.int32), want.view(torch.int32)):
                raise SystemExit(f"{name} {path} {threads}: not the reference's bytes")
        for threads in args.threads:
            torch.set_num_threads(threads)
            s = _median(ref, args.repeats)
            print(f"| {name} | torch | {threads} | {s:.3f} | {gb / s:.2f} |")
        torch.set_num_threads(1)
        for (path, threads), fn in runs.items():
            if threads not in args.threads:
                continue
            s = _median(fn, args.repeats)
            print(f"| {name} | {path} | {threads} | {s:.3f} | {gb / s:.2f} |")
    pool.shutdown()


if __name__ == "__main__":
    main()
