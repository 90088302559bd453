"""The Python API: merge recipes into folders, or state dicts into state dicts.

Everything the CLI does goes through these functions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit._util import interrupts as _interrupts
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.progress import progress_bar
from soupkit._version import __version__
from soupkit.adapters.model_adapter import open_model
from soupkit.engine import MemorySink, RunStats, plan_stamps, run_plan
from soupkit.errors import CheckpointFormatError, ConfigError, UsageError, shown
from soupkit.io.card import card_front_matter, render_card
from soupkit.io.checkpoint import Checkpoint, in_memory_checkpoint
from soupkit.io.digest import InputHashes, changed_files_check, file_state
from soupkit.io.header import FileStamp
from soupkit.io.names import KeyMap, as_state_dict
from soupkit.io.output import OutputWriter, ShardFiles, report_header, run_fingerprint
from soupkit.planning.from_recipe import plan_recipe
from soupkit.planning.plan import DEFAULT_CHUNK_ELEMS, MergePlan, make_plan
from soupkit.recipe.schema import Compute, MergeConfig, ModelEntry, load_recipe

__all__ = [
    "MergeResult",
    "find_checkpoints",
    "merge",
    "merge_state_dicts",
    "plan",
    "soup_checkpoints",
    "uniform_soup",
]

Recipe = MergeConfig | Mapping[str, Any] | str | os.PathLike[str]


@dataclass(frozen=True)
class MergeResult:
    """What `merge` produced.

    Attributes:
        out: the output folder.
        plan: the plan that ran.
        stats: bytes read and written, and the time taken.
    """

    out: Path
    plan: MergePlan
    stats: RunStats


def plan(
    recipe: Recipe,
    *,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    allow_pickle: bool = False,
    key_map: KeyMap | None = None,
    compute: Compute | None = None,
) -> MergePlan:
    """Validate a recipe and plan its merge from headers only (a dry run).

    Args:
        recipe: a `MergeConfig`, a mapping, a YAML path or YAML text.
        max_shard_size: largest output shard (``"5GB"``, ``"500MiB"`` or bytes).
        chunk_elems: elements per chunk for elementwise methods (bounds memory).
        allow_pickle: accept PyTorch pickle checkpoints (``.bin``, ``.pt``, ``.ckpt``), loaded
            only through ``torch.load(weights_only=True)``; refused otherwise.
        key_map: rename every input's tensors first (`soupkit.io.names.KeyMap`, e.g.
            ``KeyMap.build(strip_prefix="model.")`` for Lightning checkpoints).
        compute: overrides the recipe's ``compute``: ``"float32"`` (accumulate in float32) or
            ``"exact"`` (mergekit 0.1.5's arithmetic in the recipe's dtype, bit for bit).

    Raises:
        ConfigError: the recipe is invalid (all problems listed).
        PlanError: the checkpoints cannot be merged (all problems listed).
    """
    cfg = load_recipe(recipe)
    if compute is not None and compute != cfg.compute:
        if compute not in ("float32", "exact"):
            raise ConfigError([f"compute: expected 'float32' or 'exact', got {compute!r}"])
        cfg = cfg.model_copy(update={"compute": compute})
    return plan_recipe(
        cfg,
        max_shard_size=max_shard_size,
        chunk_elems=chunk_elems,
        allow_pickle=allow_pickle,
        key_map=key_map,
        opener=open_model,
    )


def _at_commit(c: Checkpoint) -> str:
    return f" (Hub commit `{c.hub.commit}`)" if c.hub is not None else ""


def _model_card(p: MergePlan) -> str:
    cfg = p.config
    # every input is a base of a merge (the Hub's model tree), the base model first
    front = card_front_matter(
        [c.label for c in ([p.base] if p.base is not None else []) + list(p.models)],
        tags=[cfg.merge_method],
    )
    lines = [
        f"# {cfg.name or 'Merged model'}",
        "",
        f"This model was made with [soupkit](https://pypi.org/project/soupkit/) {__version__} "
        f"using the `{p.method.name}` method ({p.method.paper}).",
        "",
        "## Inputs",
        "",
        *([f"- base: `{p.base.label}`{_at_commit(p.base)}"] if p.base is not None else []),
        *[f"- `{m.label}`{_at_commit(m)}" for m in p.models],
        "",
        "## Recipe",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
    ]
    return render_card(front, lines)


def _report(
    p: MergePlan,
    stats: RunStats,
    out: Path,
    *,
    input_hashes: Mapping[Path, str] | None = None,
    output_hashes: Mapping[str, str] | None = None,
    other_files: Mapping[str, str] | None = None,
    resumed_shards: int = 0,
    hashes_from_cache: Collection[Path] = (),
) -> dict[str, Any]:
    ih = input_hashes or {}
    oh = output_hashes or {}

    def files(c: Checkpoint) -> list[dict[str, Any]]:
        # "sha256_from_cache": the digest was remembered from an earlier run (file unchanged by stat)
        return [
            {
                "path": str(f),
                "bytes": f.stat().st_size,
                **({"sha256": ih[f]} if f in ih else {}),
                **({"sha256_from_cache": True} if f in hashes_from_cache else {}),
            }
            for f in c.files
        ]

    def entry(c: Checkpoint) -> dict[str, Any]:
        # a model named by Hub id: the commit it resolved to and the Hub's ETag of every file used
        return {
            "label": c.label,
            "files": files(c),
            **({"hub": c.hub.to_json()} if c.hub is not None else {}),
        }

    return {
        **report_header(),
        "recipe": p.config.model_dump(mode="json", exclude_none=True),
        "method": {"name": p.method.name, "paper": p.method.paper},
        "inputs": {
            "base": entry(p.base) if p.base is not None else None,
            "models": [entry(m) for m in p.models],
        },
        "inputs_hashed": bool(ih),
        "outputs": [
            {
                "file": s.filename,
                "bytes": s.size,
                "tensors": len(s.tensors),
                **({"sha256": oh[s.filename]} if s.filename in oh else {}),
            }
            for s in p.shards
        ],
        "other_files": [{"file": n, "sha256": h} for n, h in (other_files or {}).items()],
        "notes": list(p.notes),
        "nonfinite_tensors": list(stats.nonfinite),
        "stats": {
            "seconds": round(stats.seconds, 3),
            "bytes_read": stats.bytes_read,
            "bytes_written": stats.bytes_written,
            "tensors": stats.tensors,
            "resumed_shards": resumed_shards,
        },
    }


def merge(
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    model_card: bool = True,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    resume: bool = False,
    hash_inputs: bool = True,
    key_map: KeyMap | None = None,
    compute: Compute | None = None,
) -> MergeResult:
    """Merge the checkpoints a recipe names into a Hugging Face style folder ``out``.

    Tensors stream one at a time (elementwise methods in chunks); the output appears atomically
    when complete, with config/tokenizer files carried from the base (or first) model, a
    ``README.md`` model card and ``soupkit-report.json`` (recipe, versions, and the sha256 of
    every input and output file).

    Args:
        recipe: a `MergeConfig`, a mapping, a YAML path or YAML text.
        out: the output folder (must not exist or be empty unless ``force``).
        force: replace a non-empty ``out``.
        progress: show a progress bar (default: when stderr is a terminal).
        max_shard_size: largest output shard (default 5GB, like Hugging Face).
        chunk_elems: elements per chunk for elementwise methods.
        model_card: write ``README.md`` with the recipe.
        allow_pickle: accept PyTorch pickle checkpoints, loaded only through
            ``torch.load(weights_only=True)`` (see SECURITY.md).
        allow_nonfinite: write NaN / Inf outputs instead of stopping with `NonFiniteError`
            (the report lists the affected tensors).
        resume: keep the unfinished output of an interrupted or failed run, and continue it:
            shards finished before (verified by sha256) are not computed again. The result is
            byte-identical to an uninterrupted run.
        hash_inputs: record the sha256 of every input file in the report (computed in a
            background thread while the merge runs).
        key_map: rename every input's tensors first (see `plan`).
        compute: overrides the recipe's ``compute`` (see `plan`).

    Returns:
        A `MergeResult`.
    """
    p = plan(
        recipe,
        max_shard_size=max_shard_size,
        chunk_elems=chunk_elems,
        allow_pickle=allow_pickle,
        key_map=key_map,
        compute=compute,
    )
    return run_merge_plan(
        p,
        out,
        force=force,
        progress=progress,
        model_card=model_card,
        allow_nonfinite=allow_nonfinite,
        resume=resume,
        hash_inputs=hash_inputs,
    )


def _inputs(p: MergePlan) -> list[Checkpoint]:
    return [*p.models, *([p.base] if p.base is not None else [])]


def input_states(plans: Sequence[MergePlan]) -> dict[Path, FileStamp]:
    """Each input file of the plans (in order, once) with its identity as the plans saw it
    (when its header was read; now, for a file a plan has no stamp of), after checking that
    none changed since.

    Raises:
        CheckpointFormatError: an input was rewritten, replaced or removed after planning.
    """
    stamps = plan_stamps(plans)
    inputs = dict.fromkeys(f for p in plans for c in _inputs(p) for f in c.files)
    try:
        now = {f: file_state(f) for f in inputs}
    except OSError as e:
        raise CheckpointFormatError(
            f"{shown(e.filename)}: input disappeared ({e.strerror})"
        ) from None
    before = {f: stamps.get(f, st) for f, st in now.items()}
    changed_files_check(before, "after it was planned")
    return before


def _fingerprint(p: MergePlan, dest: Path, states: Mapping[Path, FileStamp]) -> str:
    """What makes two runs produce the same output: recipe, version, layout and the inputs."""
    identity = {
        "recipe": p.config.model_dump(mode="json"),
        "inputs": [[str(f.absolute()), *st] for f, st in states.items()],
        "carry_from": str(p.carry_from) if p.carry_from else None,
    }
    return run_fingerprint(dest, identity, p.shards)


def open_output(
    p: MergePlan,
    dest: Path,
    *,
    force: bool,
    fingerprint: str | None = None,
    extra_names: Collection[str] = (),
) -> OutputWriter:
    """The output folder of plan ``p``: never one of its inputs or where it carries files from."""
    return OutputWriter(
        dest,
        force=force,
        inputs=_inputs(p),
        carry_from=p.carry_from,
        fingerprint=fingerprint,
        extra_names=extra_names,
    )


def finish_output(
    p: MergePlan,
    out: OutputWriter,
    stats: RunStats,
    shard_hashes: Mapping[str, str],
    hashes: tuple[Mapping[Path, str], Collection[Path]],
    *,
    model_card: bool,
    extra_files: Mapping[str, bytes] | None = None,
    extra_report: Mapping[str, Any] | None = None,
    resumed_shards: int = 0,
) -> None:
    """Write the files beside the weights of plan ``p``: the carried config and tokenizer
    files (config.json updated for a sliced model and the dtype written), the model card, the
    ``extra_files`` and, last, the report (``hashes``: the inputs' digests and those that
    came from the cache, see `InputHashes.result`)."""
    out.record_index()
    # exactly what `plan` listed (links and sizes checked there)
    out.carry(p.carry_files, config_updates=p.config_updates, written_dtype=p.written_dtype)
    if model_card:
        out.write_card(_model_card(p))
    for fname, data in (extra_files or {}).items():
        out.write(fname, data)
    report = _report(
        p,
        stats,
        out.dest,
        input_hashes=hashes[0],
        output_hashes=shard_hashes,
        hashes_from_cache=hashes[1],
        other_files=out.others,
        resumed_shards=resumed_shards,
    )
    out.write_report({**report, **dict(extra_report or {})})


@_interrupts.held
def run_merge_plan(
    p: MergePlan,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool | None = None,
    model_card: bool = True,
    extra_report: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
    allow_nonfinite: bool = False,
    resume: bool = False,
    hash_inputs: bool = True,
) -> MergeResult:
    """Run an existing plan into folder ``out`` (see `merge`).

    ``extra_report`` entries are added to ``soupkit-report.json`` and ``extra_files`` (file name
    -> bytes) are written beside it, inside the output before it appears, so a search's history
    and plots are part of the atomic output (used by `soupkit.search`). For the other options
    see `merge`.
    """
    dest = Path(out)
    before = input_states([p])
    output = open_output(
        p,
        dest,
        force=force,
        fingerprint=_fingerprint(p, dest, before) if resume else None,
        extra_names=list(extra_files or {}),
    )
    with InputHashes(before, enabled=hash_inputs) as hashes, output:
        done, journal = output.resume(p.shards)
        bar = progress_bar(p.input_bytes, progress, f"merge {p.method.name}", unit="B")
        sink = ShardFiles(output.tmp, p.shards, done=done, journal=journal)
        try:
            stats = run_plan(
                p, sink, progress=bar.update, allow_nonfinite=allow_nonfinite, skip=sink.skip
            )
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            bar.close()
        finish_output(
            p,
            output,
            stats,
            sink.hashes,
            hashes.result(),
            model_card=model_card,
            extra_files=extra_files,
            extra_report=extra_report,
            resumed_shards=len(done),
        )
    return MergeResult(dest, p, stats)


def uniform_soup(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    out_dtype: str | None = None,
    **kwargs: Any,
) -> MergeResult:
    """Average checkpoints (uniformly, or with ``weights`` normalised to sum 1) into ``out``.

    Args:
        paths: the checkpoints (files or folders).
        out: the output folder.
        weights: optional weights, one per path.
        out_dtype: output dtype name (default: the inputs' dtype).
        **kwargs: passed to `merge` (``force``, ``progress``, ``max_shard_size``, ...).
    """
    return merge(linear_recipe(paths, weights=weights, out_dtype=out_dtype), out, **kwargs)


def linear_recipe(
    paths: Sequence[str | os.PathLike[str]],
    *,
    weights: Sequence[float] | None = None,
    out_dtype: str | None = None,
) -> MergeConfig:
    """The `linear` recipe over ``paths`` (optionally weighted)."""
    if not paths:
        raise UsageError("no checkpoints given\nhint: give at least one checkpoint path")
    if weights is not None and len(weights) != len(paths):
        raise UsageError(
            f"{len(weights)} weights for {len(paths)} checkpoints\n"
            "hint: give one weight per checkpoint"
        )
    models = [
        ModelEntry(model=str(pth), parameters={} if weights is None else {"weight": float(w)})
        for pth, w in zip(paths, weights if weights is not None else [1.0] * len(paths))
    ]
    data: dict[str, Any] = {"merge_method": "linear", "models": models}
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    return MergeConfig.model_validate(data)


def merge_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor] | torch.nn.Module],
    method: str = "linear",
    *,
    base: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    out_dtype: str | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    allow_nonfinite: bool = False,
    compute: Compute = "float32",
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method; returns a new state dict.

    The same planner and engine as file merges run here, so the result equals the file merge
    of the same tensors bit for bit. Inputs are never modified.

    Args:
        states: the models' state dicts, or the ``nn.Module`` s themselves (their
            ``state_dict()``), or Lightning-style ``{"state_dict": ...}`` mappings.
        method: a registered method name (see ``soupkit methods``).
        base: the base model's state dict or module (task-vector methods need one).
        parameters: global parameters (and per-model defaults), as in a recipe.
        model_parameters: per-model parameters, one mapping per state dict.
        seed: seed for stochastic methods.
        dtype: cast inputs to this dtype first.
        out_dtype: output dtype (default: the inputs' dtype).
        chunk_elems: elements per chunk for elementwise methods.
        allow_nonfinite: return NaN / Inf results instead of raising `NonFiniteError`.
        compute: ``"float32"`` or ``"exact"`` (mergekit's arithmetic in ``dtype``, see `plan`).
    """
    if not states:
        raise UsageError("no state dicts given")
    if model_parameters is not None and len(model_parameters) != len(states):
        raise UsageError(f"{len(model_parameters)} model_parameters for {len(states)} state dicts")
    mp = list(model_parameters) if model_parameters is not None else [{}] * len(states)
    data: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": f"<state_dict {i}>", "parameters": dict(p)} for i, p in enumerate(mp)],
        "parameters": dict(parameters or {}),
        "seed": seed,
        "compute": compute,
    }
    if base is not None:
        data["base_model"] = "<base state_dict>"
    if dtype is not None:
        data["dtype"] = dtype
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    cfg = load_recipe(data)
    ckpts = [
        in_memory_checkpoint(as_state_dict(s, f"state_dict {i}"), f"state_dict {i}")
        for i, s in enumerate(states)
    ]
    base_ck = (
        in_memory_checkpoint(as_state_dict(base, "base state_dict"), "base state_dict")
        if base is not None
        else None
    )
    p = make_plan(cfg, ckpts, base_ck, chunk_elems=chunk_elems)
    sink = MemorySink(p)
    run_plan(p, sink, allow_nonfinite=allow_nonfinite)
    return sink.tensors


_STEP = re.compile(r"(\d+)(?!.*\d)")


def find_checkpoints(
    run_dir: str | os.PathLike[str], *, pattern: str = "checkpoint-*", last: int | None = None
) -> list[Path]:
    """The checkpoints of one training run, sorted by step (the last number in the name).

    Args:
        run_dir: the training run's output folder.
        pattern: glob for checkpoint entries (folders or files), default ``checkpoint-*``.
        last: keep only the last N (by step).

    Raises:
        UsageError: no checkpoint matches, or ``last`` is out of range.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder\nhint: give the training run's output folder")
    found = []
    for p in root.glob(pattern):
        if p.name.startswith(".soupkit-"):
            continue
        m = _STEP.search(p.name)
        if m is None:
            raise CheckpointFormatError(
                f"{p}: matches {pattern!r} but its name has no step number "
                "to sort by\nhint: use --pattern to select only numbered checkpoints"
            )
        found.append((int(m.group(1)), p.name, p))
    if not found:
        raise UsageError(
            f"{root}: no entries match {pattern!r}\nhint: use --pattern, e.g. 'step_*.safetensors'"
        )
    found.sort()
    paths = [p for _, _, p in found]
    if last is not None:
        if last < 1:
            raise UsageError(f"--last must be at least 1, got {last}")
        if last > len(paths):
            raise UsageError(
                f"--last {last} but {root} has only {len(paths)} checkpoint(s) matching {pattern!r}"
            )
        paths = paths[-last:]
    return paths


def soup_checkpoints(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    last: int | None = None,
    pattern: str = "checkpoint-*",
    weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> MergeResult:
    """Average the last N checkpoints of one training run (a checkpoint soup) into ``out``.

    Args:
        run_dir: the training run's folder (e.g. holding ``checkpoint-500``, ``checkpoint-1000``).
        out: the output folder.
        last: how many of the latest checkpoints to average (default: all).
        pattern: glob selecting checkpoints inside ``run_dir``.
        weights: optional weights, oldest first, one per averaged checkpoint.
        **kwargs: passed to `merge`.
    """
    paths = find_checkpoints(run_dir, pattern=pattern, last=last)
    if weights is not None and len(weights) != len(paths):
        raise ConfigError(
            [
                f"{len(weights)} weights for {len(paths)} checkpoints "
                f"({', '.join(p.name for p in paths)})"
            ]
        )
    return uniform_soup(paths, out, weights=weights, **kwargs)
