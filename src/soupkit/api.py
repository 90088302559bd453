"""The Python API: merge recipes into folders, or state dicts into state dicts.

Everything the CLI does goes through these functions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from soupkit._version import __version__
from soupkit.config import MergeConfig, ModelEntry, load_recipe
from soupkit.errors import CheckpointFormatError, ConfigError, UsageError
from soupkit.execute import FileSink, MemorySink, RunStats, run_plan
from soupkit.io.checkpoint import CARRY_FILES, Checkpoint, in_memory_checkpoint
from soupkit.io.writer import OutputFolder
from soupkit.plan import DEFAULT_CHUNK_ELEMS, MergePlan, make_plan, plan_recipe

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
REPORT_NAME = "soupkit-report.json"


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
    max_shard_size: int | str = "5GB",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> MergePlan:
    """Validate a recipe and plan its merge from headers only (a dry run).

    Args:
        recipe: a `MergeConfig`, a mapping, a YAML path or YAML text.
        max_shard_size: largest output shard (``"5GB"``, ``"500MiB"`` or bytes).
        chunk_elems: elements per chunk for elementwise methods (bounds memory).

    Raises:
        ConfigError: the recipe is invalid (all problems listed).
        PlanError: the checkpoints cannot be merged (all problems listed).
    """
    return plan_recipe(load_recipe(recipe), max_shard_size=max_shard_size, chunk_elems=chunk_elems)


def _progress_bar(total: int, enabled: bool | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=disable, dynamic_ncols=True, leave=False)


def _model_card(p: MergePlan) -> str:
    cfg = p.config
    base = cfg.base_model or cfg.models[0].model
    front = {
        "base_model": [base],
        "library_name": "transformers",
        "tags": ["merge", "soupkit", cfg.merge_method],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [
        f"# {cfg.name or 'Merged model'}",
        "",
        f"This model was made with [soupkit](https://pypi.org/project/soupkit/) {__version__} "
        f"using the `{p.method.name}` method ({p.method.paper}).",
        "",
        "## Inputs",
        "",
        *([f"- base: `{p.base.label}`"] if p.base is not None else []),
        *[f"- `{m.label}`" for m in p.models],
        "",
        "## Recipe",
        "",
        "```yaml",
        cfg.to_yaml().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _report(p: MergePlan, stats: RunStats, out: Path) -> dict[str, Any]:
    def files(c: Checkpoint) -> list[dict[str, Any]]:
        return [{"path": str(f), "bytes": f.stat().st_size} for f in c.files]

    return {
        "soupkit_version": __version__,
        "torch_version": torch.__version__,
        "created_unix": int(time.time()),
        "recipe": p.config.model_dump(mode="json", exclude_none=True),
        "method": {"name": p.method.name, "paper": p.method.paper},
        "inputs": {
            "base": ({"label": p.base.label, "files": files(p.base)} if p.base is not None else None),
            "models": [{"label": m.label, "files": files(m)} for m in p.models],
        },
        "outputs": [{"file": s.filename, "bytes": s.size, "tensors": len(s.tensors)} for s in p.shards],
        "notes": list(p.notes),
        "stats": {"seconds": round(stats.seconds, 3), "bytes_read": stats.bytes_read,
                  "bytes_written": stats.bytes_written, "tensors": stats.tensors},
    }


def merge(
    recipe: Recipe,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool | None = None,
    max_shard_size: int | str = "5GB",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    model_card: bool = True,
) -> MergeResult:
    """Merge the checkpoints a recipe names into a Hugging Face style folder ``out``.

    Tensors stream one at a time (elementwise methods in chunks); the output appears atomically
    when complete, with config/tokenizer files carried from the base (or first) model, a
    ``README.md`` model card and ``soupkit-report.json``.

    Args:
        recipe: a `MergeConfig`, a mapping, a YAML path or YAML text.
        out: the output folder (must not exist or be empty unless ``force``).
        force: replace a non-empty ``out``.
        progress: show a progress bar (default: when stderr is a terminal).
        max_shard_size: largest output shard (default 5GB, like Hugging Face).
        chunk_elems: elements per chunk for elementwise methods.
        model_card: write ``README.md`` with the recipe.

    Returns:
        A `MergeResult`.
    """
    p = plan(recipe, max_shard_size=max_shard_size, chunk_elems=chunk_elems)
    return run_merge_plan(p, out, force=force, progress=progress, model_card=model_card)


def _check_not_input(p: MergePlan, out: Path) -> None:
    dest = out.resolve()
    for c in (*p.models, *([p.base] if p.base else [])):
        for f in c.files:
            fr = f.resolve()
            if fr == dest or dest in fr.parents:
                raise UsageError(f"{out}: the output folder holds input {f} ({c.label})\n"
                                 "hint: inputs are never modified; choose another output folder")


def run_merge_plan(
    p: MergePlan,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: bool | None = None,
    model_card: bool = True,
    extra_report: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, bytes] | None = None,
) -> MergeResult:
    """Run an existing plan into folder ``out`` (see `merge`).

    ``extra_report`` entries are added to ``soupkit-report.json`` and ``extra_files`` (file name
    -> bytes) are written beside it, inside the output before it appears, so a search's history
    and plots are part of the atomic output (used by `soupkit.search`).
    """
    dest = Path(out)
    _check_not_input(p, dest)
    with OutputFolder(dest, force=force) as tmp:
        bar = _progress_bar(p.input_bytes, progress, f"merge {p.method.name}")
        sink = FileSink(p, tmp)
        try:
            stats = run_plan(p, sink, progress=bar.update)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            bar.close()
        if p.carry_from is not None:
            for name in CARRY_FILES:
                src = p.carry_from / name
                if src.is_file() and not src.is_symlink():
                    shutil.copyfile(src, tmp / name)
        if model_card:
            (tmp / "README.md").write_text(_model_card(p), encoding="utf-8")
        for fname, data in (extra_files or {}).items():
            if Path(fname).name != fname or fname in (REPORT_NAME, "README.md"):
                raise UsageError(f"extra output file {fname!r}: expected a plain file name other than "
                                 f"{REPORT_NAME} and README.md")
            (tmp / fname).write_bytes(data)
        report = {**_report(p, stats, dest), **dict(extra_report or {})}
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
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
        raise UsageError(f"{len(weights)} weights for {len(paths)} checkpoints\n"
                         "hint: give one weight per checkpoint")
    models = [
        ModelEntry(model=str(pth), parameters={} if weights is None else {"weight": float(w)})
        for pth, w in zip(paths, weights if weights is not None else [1.0] * len(paths))
    ]
    data: dict[str, Any] = {"merge_method": "linear", "models": models}
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    return MergeConfig.model_validate(data)


def merge_state_dicts(
    states: Sequence[Mapping[str, torch.Tensor]],
    method: str = "linear",
    *,
    base: Mapping[str, torch.Tensor] | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    out_dtype: str | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts with any registered method; returns a new state dict.

    The same planner and engine as file merges run here, so the result equals the file merge
    of the same tensors bit for bit. Inputs are never modified.

    Args:
        states: the models' state dicts.
        method: a registered method name (see ``soupkit methods``).
        base: the base model's state dict (task-vector methods need one).
        parameters: global parameters (and per-model defaults), as in a recipe.
        model_parameters: per-model parameters, one mapping per state dict.
        seed: seed for stochastic methods.
        dtype: cast inputs to this dtype first.
        out_dtype: output dtype (default: the inputs' dtype).
        chunk_elems: elements per chunk for elementwise methods.
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
    }
    if base is not None:
        data["base_model"] = "<base state_dict>"
    if dtype is not None:
        data["dtype"] = dtype
    if out_dtype is not None:
        data["out_dtype"] = out_dtype
    cfg = load_recipe(data)
    ckpts = [in_memory_checkpoint(s, f"state_dict {i}") for i, s in enumerate(states)]
    base_ck = in_memory_checkpoint(base, "base state_dict") if base is not None else None
    p = make_plan(cfg, ckpts, base_ck, chunk_elems=chunk_elems)
    sink = MemorySink(p)
    run_plan(p, sink)
    return sink.tensors


_STEP = re.compile(r"(\d+)(?!.*\d)")


def find_checkpoints(run_dir: str | os.PathLike[str], *, pattern: str = "checkpoint-*",
                     last: int | None = None) -> list[Path]:
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
            raise CheckpointFormatError(f"{p}: matches {pattern!r} but its name has no step number "
                                        "to sort by\nhint: use --pattern to select only numbered checkpoints")
        found.append((int(m.group(1)), p.name, p))
    if not found:
        raise UsageError(f"{root}: no entries match {pattern!r}\nhint: use --pattern, e.g. 'step_*.safetensors'")
    found.sort()
    paths = [p for _, _, p in found]
    if last is not None:
        if last < 1:
            raise UsageError(f"--last must be at least 1, got {last}")
        if last > len(paths):
            raise UsageError(f"--last {last} but {root} has only {len(paths)} checkpoint(s) matching {pattern!r}")
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
        raise ConfigError([f"{len(weights)} weights for {len(paths)} checkpoints "
                           f"({', '.join(p.name for p in paths)})"])
    return uniform_soup(paths, out, weights=weights, **kwargs)
