"""Running plans: `run_plans` (one pass for several plans that read the same tensors, e.g. a
sweep) and `run_plan` (one plan), each plan into its own `Sink`.

The pieces of the engine: `soupkit.engine.core` (the pass: modes, pieces, the method call),
`soupkit.engine.pipeline` (reader and writer threads, buffers), `soupkit.engine.compute`
(compute threads, workspaces, seeds), `soupkit.engine.prepass` (the pre-passes methods declare),
`soupkit.engine.nonfinite` (NaN / Inf checks and their explanation), `soupkit.engine.sinks`.

Memory is bounded by the plan: elementwise methods run on chunks of ``plan.chunk_elems``
elements (the inputs of one chunk plus one output chunk, and the next chunk read ahead);
methods that declare a pre-pass (TIES) get their statistic first and then run on chunks too;
other methods get whole tensors (the inputs of one tensor plus one output). Randomness comes
only from the tensor's counter-based generator (`soupkit.methods.CounterRNG`, keyed by (recipe
seed, tensor name); in exact mode a `torch.Generator` seeded from them), so output bytes never
depend on chunking, order or threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from soupkit._util import interrupts as _interrupts
from soupkit.engine.compute import tensor_seed
from soupkit.engine.core import _Engine
from soupkit.engine.nonfinite import all_finite
from soupkit.engine.pipeline import torch_threads as _torch_threads
from soupkit.engine.prepass import global_stats
from soupkit.engine.sinks import MemorySink, Sink
from soupkit.errors import UsageError
from soupkit.io.header import FileStamp
from soupkit.io.reader import TensorReader
from soupkit.planning.plan import MergePlan
from soupkit.planning.shared import check_shared_inputs
from soupkit.planning.sizes import COMPUTE_ELEMS, RNG_BLOCK
from soupkit.planning.sizes import compute_threads as _sizes_compute_threads
from soupkit.planning.sizes import stream_threads as _sizes_stream_threads

__all__ = [
    "COMPUTE_ELEMS",
    "MemorySink",
    "RNG_BLOCK",
    "RunStats",
    "Sink",
    "all_finite",
    "check_shared_inputs",
    "plan_stamps",
    "run_plan",
    "run_plans",
    "tensor_seed",
]


@dataclass(frozen=True)
class RunStats:
    """What a run did.

    Attributes:
        seconds: wall time of the tensor loop.
        bytes_read: tensor bytes read.
        bytes_written: tensor bytes produced (including those of resumed shards).
        tensors: output tensors.
        nonfinite: tensors written with NaN / Inf (only with ``allow_nonfinite``).
        skipped: tensors not computed because a resumed run had already finished their shard.
    """

    seconds: float
    bytes_read: int
    bytes_written: int
    tensors: int
    nonfinite: tuple[str, ...] = ()
    skipped: int = 0


def plan_stamps(plans: Sequence[MergePlan]) -> dict[Path, FileStamp]:
    """Every input file's identity when the plans read its header (`Checkpoint.stamps`)."""
    return {
        f: st
        for p in plans
        for c in (*p.models, *([p.base] if p.base is not None else []))
        for f, st in c.stamps.items()
    }


def run_plans(
    plans: Sequence[MergePlan],
    sinks: Sequence[Sink],
    *,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    skip: Sequence[Collection[str]] | None = None,
    threads: int | None = None,
    compute_threads: int | None = None,
) -> list[RunStats]:
    """Run several plans over the same inputs in one pass, each into its own sink.

    Each chunk of each input is read once and handed to every plan; every plan's output is bit
    for bit what it gives alone (same chunking rules, per-tensor and per-block seeds, cuts).

    Args:
        plans: plans that read the same tensors (e.g. one recipe with different parameters).
        sinks: one sink per plan.
        progress: called with the number of input bytes consumed after each chunk.
        allow_nonfinite: write NaN / Inf outputs instead of raising (they are listed in
            `RunStats.nonfinite`).
        skip: per plan, names of tensors not to compute (their shard is already finished:
            resume).
        threads: torch intra-op threads during the run (default 1: reading, writing and the
            compute threads already run in their own threads); restored afterwards.
        compute_threads: threads that share the pieces of each unit (default: the CPUs this
            process may use, at most 4, for stochastic methods' RNG blocks; one fewer for cheap
            elementwise pieces and pre-pass counting, see `soupkit.planning.sizes`); the output
            bytes do not depend on it.

    Returns:
        One `RunStats` per plan (``bytes_read`` is the shared pass's, counted once).

    Raises:
        UsageError: the plans do not read the same inputs.
        NonFiniteError: a merged chunk holds NaN / Inf (before or after the cast to the output
            dtype), naming the tensor and the input model that holds them.
    """
    if not plans or len(plans) != len(sinks):
        raise UsageError(
            f"run_plans needs one sink per plan, got {len(plans)} plans and {len(sinks)} sinks"
        )
    if skip is not None and len(skip) != len(plans):
        raise UsageError(
            f"run_plans needs one skip set per plan, got {len(skip)} for {len(plans)} plans"
        )
    if threads is not None and threads < 1:
        raise UsageError(f"threads must be at least 1, got {threads}")
    if compute_threads is not None and compute_threads < 1:
        raise UsageError(f"compute_threads must be at least 1, got {compute_threads}")
    check_shared_inputs(plans)
    t0 = time.perf_counter()
    skips = [frozenset(s) for s in skip] if skip is not None else [frozenset()] * len(plans)
    stamps = plan_stamps(plans)  # a file rewritten since planning is refused when it is opened
    with (
        _interrupts.deferred(),
        _torch_threads(threads),
        TensorReader(stamps) as reader,
        TensorReader(stamps) as diag,
        torch.inference_mode(),
    ):
        engine = _Engine(
            plans,
            sinks,
            reader,
            diag,
            progress=progress,
            allow_nonfinite=allow_nonfinite,
            skips=skips,
            # a method's global pre-pass (TIES's `trim_scope: global`) runs before the pass
            global_stats=[
                global_stats(p, reader, compute_threads or _sizes_compute_threads()) for p in plans
            ],
            compute_elems=COMPUTE_ELEMS,
            rng_block=RNG_BLOCK,
            workers=compute_threads or _sizes_compute_threads(),
            stream_workers=compute_threads or _sizes_stream_threads(),
        )
        engine.run()
    seconds = time.perf_counter() - t0
    return [
        RunStats(
            seconds,
            engine.read,
            engine.written[k],
            len(p.jobs),
            nonfinite=tuple(engine.nonfinite[k]),
            skipped=engine.skipped[k],
        )
        for k, p in enumerate(plans)
    ]


def run_plan(
    plan: MergePlan,
    sink: Sink,
    *,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
    skip: Collection[str] = (),
    threads: int | None = None,
    compute_threads: int | None = None,
) -> RunStats:
    """Run every job of ``plan`` into ``sink`` (`run_plans` with one plan).

    Args:
        plan: the plan (see `soupkit.planning.plan.make_plan`).
        sink: where outputs go.
        progress: called with the number of input bytes consumed after each chunk.
        allow_nonfinite: write NaN / Inf outputs instead of raising (they are listed in
            `RunStats.nonfinite`).
        skip: names of tensors not to compute (their shard is already finished: resume).
        threads: torch intra-op threads during the run (default 1), restored afterwards.
        compute_threads: threads sharing the elementwise pieces (see `run_plans`).

    Returns:
        `RunStats` of the run.

    Raises:
        NonFiniteError: a merged chunk holds NaN / Inf (before or after the cast to the output
            dtype), naming the tensor and the input model that holds them.
    """
    return run_plans(
        [plan],
        [sink],
        progress=progress,
        allow_nonfinite=allow_nonfinite,
        skip=[skip],
        threads=threads,
        compute_threads=compute_threads,
    )[0]
