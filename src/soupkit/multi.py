"""One pass over the inputs, several outputs: WiSE-FT alpha grids and other sweeps.

`run_plans` runs several plans that read the same tensors (the same models, base and tensor
names; any method and parameters) in a single pass: each chunk of each input is read once and
handed to every plan, and every plan's output is bit for bit what `soupkit.execute.run_plan`
gives for that plan alone (same chunking rules, same per-tensor and per-block seeds, same
global-trim cuts). `merge_many` writes each plan's output into its own folder, atomically and
with config files, model card and report, like `soupkit.merge`. `wise_ft` is the WiSE-FT front
end: one folder ``alpha-0.50/`` per mixing coefficient.

Memory: the raw input chunks are held once; each plan then gets its own float32 copies (a
method may overwrite its inputs), one plan at a time, so peak memory is about that of the most
demanding plan plus the raw chunk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from soupkit import api
from soupkit.config import MergeConfig
from soupkit.errors import CheckpointFormatError, UsageError
from soupkit.execute import (
    RNG_BLOCK,
    FileSink,
    RunStats,
    Sink,
    _chunks,
    _Loader,
    _nonfinite_error,
    all_finite,
    tensor_seed,
)
from soupkit.global_trim import compute_cuts
from soupkit.io.checkpoint import CARRY_FILES
from soupkit.io.hashing import BackgroundHasher, changed_files_check, file_state
from soupkit.io.header import DTYPES, TensorInfo
from soupkit.io.reader import TensorReader
from soupkit.io.writer import OutputFolder
from soupkit.methods import MagnitudeCut
from soupkit.plan import DEFAULT_CHUNK_ELEMS, MergePlan, TensorJob, make_plan, plan_recipe

__all__ = ["alpha_folder_names", "merge_many", "run_plans", "wise_ft", "wise_ft_recipe"]

PathLike = str | os.PathLike[str]


def _same_info(a: TensorInfo | None, b: TensorInfo | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b and a.data is b.data


def _check_shared_inputs(plans: Sequence[MergePlan]) -> None:
    first = plans[0]
    for k, p in enumerate(plans[1:], start=1):
        problems: list[str] = []
        if len(p.jobs) != len(first.jobs):
            problems.append(f"{len(p.jobs)} output tensors against {len(first.jobs)}")
        elif p.config.dtype != first.config.dtype:
            problems.append(f"`dtype: {p.config.dtype}` against `dtype: {first.config.dtype}`")
        else:
            for ja, jb in zip(first.jobs, p.jobs):
                same = (ja.name == jb.name and _same_info(ja.source, jb.source)
                        and len(ja.inputs) == len(jb.inputs)
                        and all(_same_info(x, y) for x, y in zip(ja.inputs, jb.inputs))
                        and (ja.base is None or jb.base is None or _same_info(ja.base, jb.base)))
                if not same:
                    problems.append(f"tensor {ja.name!r} is read from different inputs")
                    break
        if problems:
            raise UsageError(f"plan {k} cannot share a pass with plan 0: {problems[0]}\n"
                             "hint: plans run together must read the same models, base and tensors")


def run_plans(
    plans: Sequence[MergePlan],
    sinks: Sequence[Sink],
    *,
    progress: Callable[[int], None] | None = None,
    allow_nonfinite: bool = False,
) -> list[RunStats]:
    """Run several plans over the same inputs in one pass, each into its own sink.

    Args:
        plans: plans that read the same tensors (e.g. one recipe with different parameters).
        sinks: one sink per plan.
        progress: called with the number of input bytes read after each chunk.
        allow_nonfinite: write NaN / Inf instead of raising `NonFiniteError`.

    Returns:
        One `RunStats` per plan (``bytes_read`` is the shared pass's, counted once).

    Raises:
        UsageError: the plans do not read the same inputs.
        NonFiniteError: as `soupkit.execute.run_plan`.
    """
    if not plans or len(plans) != len(sinks):
        raise UsageError(f"run_plans needs one sink per plan, got {len(plans)} plans and {len(sinks)} sinks")
    _check_shared_inputs(plans)
    t0 = time.perf_counter()
    read = 0
    written = [0] * len(plans)
    nonfinite: list[dict[str, None]] = [{} for _ in plans]
    with TensorReader() as reader, torch.inference_mode():
        loads = [_Loader(reader, getattr(torch, p.config.dtype) if p.config.dtype else None) for p in plans]
        cuts = [compute_cuts(p, reader) if p.method.global_trim is not None else {} for p in plans]

        def emit(k: int, job: TensorJob, out: torch.Tensor, a: int, b: int) -> None:
            out_dtype = DTYPES[job.out_dtype][0]
            if not all_finite(out):
                if not allow_nonfinite:
                    raise _nonfinite_error(plans[k], job, loads[k], a, b, out)
                nonfinite[k][job.name] = None
            cast_out = out.to(out_dtype)
            if out_dtype.itemsize < 4 and job.name not in nonfinite[k] and not all_finite(cast_out):
                if not allow_nonfinite:
                    raise _nonfinite_error(plans[k], job, loads[k], a, b, out, cast_out)
                nonfinite[k][job.name] = None
            sinks[k].write(job, cast_out, a)

        def f32(k: int, raw: torch.Tensor) -> torch.Tensor:
            cast = loads[k].cast_to
            if cast is not None and raw.dtype != cast:
                raw = raw.to(cast)
            return raw.to(torch.float32, copy=True)  # every plan owns (may overwrite) its inputs

        def call(k: int, job: TensorJob, raws: list[torch.Tensor], raw_base: torch.Tensor | None,
                 shape: tuple[int, ...] | None, rng: torch.Generator | None,
                 trim: tuple[MagnitudeCut | None, ...] | None) -> torch.Tensor:
            xs = [f32(k, r) for r in raws]
            base = f32(k, raw_base) if (raw_base is not None and job.base is not None) else None
            if shape is not None:
                xs = [x.view(shape) for x in xs]
                base = base.view(shape) if base is not None else None
            assert job.params is not None
            return plans[k].method.call(xs, job.params, base=base, rng=rng, trim=trim)

        for j, job0 in enumerate(plans[0].jobs):
            jobs = [p.jobs[j] for p in plans]
            if job0.source is not None:
                for a, b in _chunks(job0.numel, plans[0].chunk_elems):
                    raw = reader.read(job0.source, a, b)
                    for k, job in enumerate(jobs):
                        dt = DTYPES[job.out_dtype][0]
                        sinks[k].write(job, raw if raw.dtype == dt else raw.to(dt), a)
                    read += (b - a) * job0.source.itemsize
                    if progress:
                        progress((b - a) * job0.source.itemsize)
            else:
                base_info = next((jb.base for jb in jobs if jb.base is not None), None)
                whole = any(not p.method.elementwise for p in plans)
                stochastic = any(p.method.stochastic for p in plans)
                step = max(job0.numel, 1) if whole else (RNG_BLOCK if stochastic else plans[0].chunk_elems)
                for a, b in _chunks(job0.numel, step):
                    raws = [reader.read(t, a, b) for t in job0.inputs]
                    raw_base = reader.read(base_info, a, b) if base_info is not None else None
                    for k, (p, job) in enumerate(zip(plans, jobs)):
                        spec = p.method
                        if not spec.elementwise:
                            rng = (torch.Generator().manual_seed(tensor_seed(p.config.seed, job.name))
                                   if spec.stochastic else None)
                            out = call(k, job, raws, raw_base, job.shape, rng, cuts[k].get(job.name))
                            emit(k, job, out.reshape(-1), 0, job.numel)
                        elif spec.stochastic:  # one generator per RNG block, as run_plan does
                            for s, e in _chunks(b - a, RNG_BLOCK):
                                rng = torch.Generator().manual_seed(
                                    tensor_seed(p.config.seed, job.name, (a + s) // RNG_BLOCK))
                                out = call(k, job, [r[s:e] for r in raws],
                                           raw_base[s:e] if raw_base is not None else None, None, rng, None)
                                emit(k, job, out, a + s, a + e)
                        else:
                            out = call(k, job, raws, raw_base, None, None, None)
                            emit(k, job, out, a, b)
                    n = sum((b - a) * t.itemsize for t in job0.inputs) + (
                        (b - a) * base_info.itemsize if base_info is not None else 0)
                    read += n
                    if progress:
                        progress(n)
            for k, job in enumerate(jobs):
                written[k] += job.numel * DTYPES[job.out_dtype][1]
    seconds = time.perf_counter() - t0
    return [RunStats(seconds, read, written[k], len(p.jobs), nonfinite=tuple(nonfinite[k]))
            for k, p in enumerate(plans)]


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
        raise UsageError(f"merge_many needs one output folder per plan, got {len(plans)} plans "
                         f"and {len(outs)} folders")
    dests = [Path(o) for o in outs]
    if len({d.absolute() for d in dests}) != len(dests):
        raise UsageError("merge_many: two plans write to the same output folder\n"
                         "hint: give each plan its own folder")
    for p, d in zip(plans, dests):
        api._check_not_input(p, d)
    _check_shared_inputs(plans)
    inputs = list(dict.fromkeys(f for p in plans for f in api._input_files(p)))
    try:
        before = {f: file_state(f) for f in inputs}
    except OSError as e:
        raise CheckpointFormatError(f"{e.filename}: input disappeared ({e.strerror})") from None
    folders = [OutputFolder(d, force=force) for d in dests]  # refuses existing outputs up front
    hasher = BackgroundHasher(inputs) if hash_inputs and inputs else None
    results: list[api.MergeResult] = []
    try:
        with ExitStack() as stack:
            tmps = [stack.enter_context(f) for f in folders]
            sinks: list[FileSink] = []
            bar = api._progress_bar(plans[0].input_bytes, progress,
                                    f"merge {len(plans)} x {plans[0].method.name}")
            try:
                for p, tmp in zip(plans, tmps):
                    sinks.append(FileSink(p, tmp))
                stats = run_plans(plans, sinks, progress=bar.update, allow_nonfinite=allow_nonfinite)
                for s in sinks:
                    s.close()
            except BaseException:
                for s in sinks:
                    s.abort()
                raise
            finally:
                bar.close()
            input_hashes = hasher.result() if hasher is not None else {}
            changed_files_check(before)
            for k, (p, tmp, sink, st, dest) in enumerate(zip(plans, tmps, sinks, stats, dests)):
                others = _finish_folder(p, tmp, model_card)
                report = {**api._report(p, st, dest, input_hashes=input_hashes,
                                        output_hashes=sink.hashes, other_files=others),
                          **dict(extra_reports[k] if extra_reports else {})}
                api._write_file(tmp / api.REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
                results.append(api.MergeResult(dest, p, st))
    finally:
        if hasher is not None:
            hasher.cancel()
    return results


def _finish_folder(p: MergePlan, tmp: Path, model_card: bool) -> dict[str, str]:
    """Index hash, carried config/tokenizer files and model card, as `soupkit.merge` writes them."""
    others: dict[str, str] = {}
    index = tmp / "model.safetensors.index.json"
    if index.is_file():
        others[index.name] = hashlib.sha256(index.read_bytes()).hexdigest()
    if p.carry_from is not None:
        for name in CARRY_FILES:
            src = p.carry_from / name
            if src.is_file() and not src.is_symlink():
                try:
                    data = src.read_bytes()
                except OSError as e:
                    raise CheckpointFormatError(f"{src}: cannot read ({e.strerror})") from None
                others[name] = api._write_file(tmp / name, data)
    if model_card:
        others["README.md"] = api._write_file(tmp / "README.md", api._model_card(p).encode("utf-8"))
    return others


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
    max_shard_size: int | str = "5GB",
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
    cfgs = [wise_ft_recipe(zero_shot, fine_tuned, a, dtype=dtype, out_dtype=out_dtype) for a in alphas]
    first = plan_recipe(cfgs[0], max_shard_size=max_shard_size, chunk_elems=chunk_elems,
                        allow_pickle=allow_pickle)
    plans = [first] + [make_plan(c, list(first.models), first.base, max_shard_size=max_shard_size,
                                 chunk_elems=chunk_elems) for c in cfgs[1:]]
    root = Path(out_dir)
    return merge_many(plans, [root / n for n in names], force=force, progress=progress,
                      model_card=model_card, allow_nonfinite=allow_nonfinite, hash_inputs=hash_inputs,
                      extra_reports=[{"wise_ft": {"alpha": float(a), "alphas": [float(x) for x in alphas]}}
                                     for a in alphas])
