"""The engine: runs plans. Read -> float32 method -> cast -> write, streamed with bounded
memory, in a thread pipeline; runs the pre-passes methods declare; diagnoses non-finite values.

`run_plan` / `run_plans` (with a sink: `soupkit.io.output.ShardFiles` or `MemorySink`) are the entry points;
`tensor_seed` is the seeding rule of stochastic methods. See `soupkit.engine.execute` for how
the modules fit together.

Layer: imports `soupkit.planning` and below.
"""

from soupkit.engine.compute import tensor_seed
from soupkit.engine.execute import RunStats, plan_stamps, run_plan, run_plans
from soupkit.engine.nonfinite import all_finite
from soupkit.engine.sinks import MemorySink, Sink
from soupkit.planning.sizes import COMPUTE_ELEMS, RNG_BLOCK

__all__ = [
    "COMPUTE_ELEMS",
    "RNG_BLOCK",
    "MemorySink",
    "RunStats",
    "Sink",
    "all_finite",
    "plan_stamps",
    "run_plan",
    "run_plans",
    "tensor_seed",
]
