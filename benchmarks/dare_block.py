"""Where one DARE-TIES block's CPU time goes: the kernel with ``rescale: l1`` and ``density``,
the Philox draws in C and in torch, and the torch reference (no extension).

One engine block (2^20 elements), a bfloat16 base and 4 fine-tunes (base + 0.01 * N(0, 1)),
density 0.3, ``convention: mergekit``; CPU time of this process (``time.process_time``: steadier
than wall time on a shared machine), median of ``--repeats`` runs, one thread.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/dare_block.py`` (after
``make kernels``); ``PYTHONPATH=/other/tree/src`` measures another source tree the same way.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from soupkit.kernels import sparsify as K
from soupkit.methods import CounterRNG
from soupkit.methods import get as get_method
from soupkit.methods._philox import uniform24

N = 1 << 20
MODELS = 4


def _cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not K.native():
        raise SystemExit("the native kernels are not built (make kernels)")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=g).to(torch.bfloat16)
    xs = [
        (base.float() + 0.01 * torch.randn(N, generator=g)).to(torch.bfloat16)
        for _ in range(MODELS)
    ]
    l1 = get_method("dare_ties").params.model_validate(
        {"density": [0.3] * MODELS, "weight": [1.0] * MODELS}
    )
    density = l1.model_copy(update={"rescale": "density"})
    rng = CounterRNG(123)
    words = torch.empty(N, dtype=torch.int32)
    rows = {
        "kernel, rescale: l1": lambda: K.merge("dare_ties", xs, base, l1, rng=rng),
        "kernel, rescale: density": lambda: K.merge("dare_ties", xs, base, density, rng=rng),
        "C draws (one model)": lambda: K._ext.philox_draws(  # type: ignore[union-attr]
            rng.key, 0, N, 0, words.data_ptr(), K._isa()
        ),
        "torch draws (one model)": lambda: uniform24(rng, 0, N),
        "torch reference, rescale: l1": lambda: K._reference("dare_ties", xs, base, l1, rng),
        "torch reference, rescale: density": lambda: K._reference(
            "dare_ties", xs, base, density, rng
        ),
    }
    print("| 2^20-element DARE-TIES block | CPU ms (median) |")
    print("|---|---|")
    for name, fn in rows.items():
        reps = args.repeats if name.startswith(("kernel", "C")) else max(3, args.repeats // 3)
        print(f"| {name} | {_cpu_ms(fn, reps):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
