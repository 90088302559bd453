"""One pass over the inputs, several outputs: WiSE-FT alpha grids and other sweeps.

`run_plans` (the engine of `soupkit.engine.execute`, re-exported here) runs several plans that read
the same tensors (the same models, base and tensor names; any method and parameters) in a
single pass: each chunk of each input is read once and handed to every plan, and every plan's
output is bit for bit what `soupkit.engine.execute.run_plan` gives for that plan alone (same chunking
rules, same per-tensor and per-block seeds, same magnitude cuts). `merge_many` writes each plan's output into its own folder, atomically and
with config files, model card and report, like `soupkit.merge`. `wise_ft` is the WiSE-FT front
end: one folder ``alpha-0.50/`` per mixing coefficient.

Memory: the raw input chunks are held once; each plan then gets its own float32 copies (a
method may overwrite its inputs), one plan at a time, so peak memory is about that of the most
demanding plan plus the raw chunk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from soupkit._util import interrupts as _interrupts
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.progress import progress_bar
from soupkit.adapters.model_adapter import open_model
from soupkit.api import merging as api
from soupkit.engine import run_plans
from soupkit.errors import UsageError
from soupkit.io.digest import InputHashes
from soupkit.io.output import ShardFiles
from soupkit.planning.from_recipe import plan_recipe
from soupkit.planning.plan import DEFAULT_CHUNK_ELEMS, MergePlan, make_plan
from soupkit.planning.shared import check_shared_inputs
from soupkit.recipe.schema import MergeConfig

__all__ = ["alpha_folder_names", "merge_many", "run_plans", "wise_ft", "wise_ft_recipe"]

PathLike = str | os.PathLike[str]


@_interrupts.held
def merge_many(
    plans: Sequence[MergePlan],
    outs: Sequence[PathLike],
    *,
    force: bool = False,
    progress: bool | None = None,
    model_card: bool = True,
    allow_nonfinite: bool = False,
    hash_inputs: bool = True,
    extra_reports: Sequence[Mapping[str, Any]] | None = None,
) -> list[api.MergeResult]:
    """Run several plans over the same inputs in one pass, each into its own output folder.

    Each folder is complete and atomic as with `soupkit.merge`: shards, index, carried
    config/tokenizer files, ``README.md`` and ``soupkit-report.json``. All folders appear when
    the pass has finished; on any failure none does.

    Args:
        plans: plans that read the same tensors (see `run_plans`).
        outs: one output folder per plan (distinct).
        force: replace non-empty output folders.
        progress: show a progress bar (default: when stderr is a terminal).
        model_card: write ``README.md`` into each folder.
        allow_nonfinite: write NaN / Inf instead of raising `NonFiniteError`.
        hash_inputs: record the sha256 of every input file (hashed once for all outputs).
        extra_reports: per output, entries added to its report.

    Returns:
        One `MergeResult` per plan.
    """
    if len(plans) != len(outs) or not plans:
        raise UsageError(
            f"merge_many needs one output folder per plan, got {len(plans)} plans "
            f"and {len(outs)} folders"
        )
    if extra_reports is not None and len(extra_reports) != len(plans):
        raise UsageError(
            f"merge_many: {len(extra_reports)} extra_reports for {len(plans)} plans\n"
            "hint: give one report mapping per plan"
        )
    extras = list(extra_reports) if extra_reports is not None else [{}] * len(plans)
    dests = [Path(o) for o in outs]
    if len({d.absolute() for d in dests}) != len(dests):
        raise UsageError(
            "merge_many: two plans write to the same output folder\n"
            "hint: give each plan its own folder"
        )
    check_shared_inputs(plans)
    before = api.input_states(plans)
    # refuses existing outputs, and outputs that are inputs, before anything is written
    outputs = [api.open_output(p, d, force=force) for p, d in zip(plans, dests)]
    results: list[api.MergeResult] = []
    with InputHashes(before, enabled=hash_inputs) as hashes, ExitStack() as stack:
        for o in outputs:
            stack.enter_context(o)
        sinks: list[ShardFiles] = []
        bar = progress_bar(
            plans[0].input_bytes,
            progress,
            f"merge {len(plans)} x {plans[0].method.name}",
            unit="B",
        )
        try:
            for p, o in zip(plans, outputs):
                sinks.append(ShardFiles(o.tmp, p.shards))
            stats = run_plans(plans, sinks, progress=bar.update, allow_nonfinite=allow_nonfinite)
            for s in sinks:
                s.close()
        except BaseException:
            for s in sinks:
                s.abort()
            raise
        finally:
            bar.close()
        digests = hashes.result()
        for p, o, sink, st, extra in zip(plans, outputs, sinks, stats, extras):
            api.finish_output(
                p, o, st, sink.hashes, digests, model_card=model_card, extra_report=extra
            )
            results.append(api.MergeResult(o.dest, p, st))
    return results


def alpha_folder_names(alphas: Sequence[float]) -> list[str]:
    """Folder names ``alpha-0.50`` for each alpha: 2 decimals, more if two would collide.

    Raises:
        UsageError: an alpha repeats or is not finite.
    """
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise UsageError(f"alpha must be a finite number, got {bad[0]!r}")
    if len(set(alphas)) != len(alphas):
        dup = next(a for a in alphas if list(alphas).count(a) > 1)
        raise UsageError(f"alpha {dup:g} is given twice\nhint: give each alpha once")
    for digits in range(2, 18):
        names = [f"alpha-{a:.{digits}f}" for a in alphas]
        if len(set(names)) == len(names):
            return names
    return [f"alpha-{a!r}" for a in alphas]


def wise_ft_recipe(
    zero_shot: PathLike,
    fine_tuned: PathLike,
    alpha: float,
    *,
    dtype: str | None = None,
    out_dtype: str | None = None,
) -> MergeConfig:
    """The `wise_ft` recipe for one alpha (``base_model`` = the zero-shot model)."""
    data: dict[str, Any] = {
        "merge_method": "wise_ft",
        "base_model": str(zero_shot),
        "models": [{"model": str(fine_tuned)}],
        "parameters": {"alpha": float(alpha)},
    }
    if dtype is not None:
        data["dtype"] = dtype
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    return MergeConfig.model_validate(data)


def wise_ft(
    zero_shot: PathLike,
    fine_tuned: PathLike,
    out_dir: PathLike,
    *,
    alphas: Sequence[float] = (0.5,),
    dtype: str | None = None,
    out_dtype: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    model_card: bool = True,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    hash_inputs: bool = True,
) -> list[api.MergeResult]:
    """WiSE-FT for one or several alphas, reading both models once: ``out_dir/alpha-0.50/``, ...

    Each output is ``(1 - alpha) * zero_shot + alpha * fine_tuned`` (method ``wise_ft``) and is
    byte-identical to ``soupkit.merge`` of `wise_ft_recipe` for that alpha.

    Args:
        zero_shot: the zero-shot (pretrained) model, file or folder.
        fine_tuned: its fine-tune.
        out_dir: folder that receives one subfolder per alpha (see `alpha_folder_names`).
        alphas: the mixing coefficients (0 = zero-shot, 1 = fine-tuned).
        dtype: cast inputs to this dtype first (recipe ``dtype``).
        out_dtype: output dtype (default: the inputs').
        force: replace existing non-empty alpha folders.
        progress: show a progress bar (default: when stderr is a terminal).
        max_shard_size: largest output shard.
        chunk_elems: elements per chunk.
        model_card: write ``README.md`` into each folder.
        allow_pickle: accept PyTorch pickle checkpoints (``torch.load(weights_only=True)``).
        allow_nonfinite: write NaN / Inf instead of raising `NonFiniteError`.
        hash_inputs: record the inputs' sha256 in each report.

    Returns:
        One `MergeResult` per alpha, in the order given.
    """
    if not alphas:
        raise UsageError("no alpha given\nhint: e.g. alphas=[0.25, 0.5, 0.75]")
    names = alpha_folder_names([float(a) for a in alphas])
    cfgs = [
        wise_ft_recipe(zero_shot, fine_tuned, a, dtype=dtype, out_dtype=out_dtype) for a in alphas
    ]
    first = plan_recipe(
        cfgs[0],
        max_shard_size=max_shard_size,
        chunk_elems=chunk_elems,
        allow_pickle=allow_pickle,
        opener=open_model,
    )
    plans = [first] + [
        make_plan(
            c,
            list(first.models),
            first.base,
            max_shard_size=max_shard_size,
            chunk_elems=chunk_elems,
        )
        for c in cfgs[1:]
    ]
    root = Path(out_dir)
    return merge_many(
        plans,
        [root / n for n in names],
        force=force,
        progress=progress,
        model_card=model_card,
        allow_nonfinite=allow_nonfinite,
        hash_inputs=hash_inputs,
        extra_reports=[
            {"wise_ft": {"alpha": float(a), "alphas": [float(x) for x in alphas]}} for a in alphas
        ],
    )
