"""The Python API: merge recipes into folders, or state dicts into state dicts.

Everything the CLI does goes through these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from soupkit._util import interrupts as _interrupts
from soupkit._version import __version__
from soupkit.engine import FileSink, MemorySink, RunStats, plan_stamps, run_plan
from soupkit.errors import CheckpointFormatError, ConfigError, UsageError, shown
from soupkit.io.checkpoint import MAX_CARRY_BYTES, Checkpoint, in_memory_checkpoint
from soupkit.io.digest import BackgroundHasher, HashCache, changed_files_check, file_state
from soupkit.io.header import FileStamp
from soupkit.io.names import KeyMap, as_state_dict
from soupkit.io.writer import Journal, OutputFolder, copy_file, io_failure
from soupkit.planning.plan import DEFAULT_CHUNK_ELEMS, MergePlan, make_plan, plan_recipe
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
    )


def _progress_bar(total: int, enabled: bool | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=disable,
        dynamic_ncols=True,
        leave=False,
    )


def _at_commit(c: Checkpoint) -> str:
    return f" (Hub commit `{c.hub.commit}`)" if c.hub is not None else ""


def _model_card(p: MergePlan) -> str:
    from soupkit.io.card import card_front_matter, render_card

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
        "soupkit_version": __version__,
        "torch_version": torch.__version__,
        "created_unix": int(time.time()),
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
    max_shard_size: int | str = "5GB",
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


def _check_not_input(p: MergePlan, out: Path) -> None:
    """Refuse an output that is, holds, or sits inside one of the inputs (symlinks resolved).

    With ``force`` an existing output is replaced, so an output folder that contains an input
    would destroy it; an output inside a model folder would change what that folder holds.
    """
    try:
        dest = out.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise UsageError(f"{out}: not a usable output path ({e})") from None
    hint = "hint: inputs are never modified; choose an output folder outside every input"
    for c in (*p.models, *([p.base] if p.base else [])):
        for f in c.files:
            fr = f.resolve()
            if fr == dest:
                raise UsageError(f"{out}: the output is input {f} ({c.label})\n{hint}")
            if dest in fr.parents:
                raise UsageError(
                    f"{out}: the output folder holds input {f} ({c.label}); writing "
                    f"(or --force replacing) it would destroy that input\n{hint}"
                )
        if c.path is not None and c.path.is_dir():
            cr = c.path.resolve()
            if dest == cr or cr in dest.parents:
                raise UsageError(
                    f"{out}: the output would be inside the input model folder {c.path} "
                    f"({c.label})\n{hint}"
                )
    if p.carry_from is not None:
        cr = p.carry_from.resolve()
        if dest == cr or dest in cr.parents:
            raise UsageError(
                f"{out}: the output would replace or hold {p.carry_from}, where the "
                f"config and tokenizer files come from\n{hint}"
            )


def _input_files(p: MergePlan) -> list[Path]:
    return list(
        dict.fromkeys(f for c in (*p.models, *([p.base] if p.base else [])) for f in c.files)
    )


def input_states(plans: Sequence[MergePlan], inputs: Sequence[Path]) -> dict[Path, FileStamp]:
    """Each input file's identity as the plans saw it (when its header was read; now, for a
    file a plan has no stamp of), after checking that none changed since.

    Raises:
        CheckpointFormatError: an input was rewritten, replaced or removed after planning.
    """
    stamps = plan_stamps(plans)
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
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "soupkit": __version__,
                "torch": torch.__version__,
                "dest": str(dest.absolute()),
                "recipe": p.config.model_dump(mode="json"),
                "inputs": [[str(f.absolute()), *st] for f, st in states.items()],
                "carry_from": str(p.carry_from) if p.carry_from else None,
            },
            sort_keys=True,
        ).encode("utf-8")
    )
    for s in p.shards:
        h.update(s.filename.encode("utf-8"))
        h.update(s.header)
    return h.hexdigest()


def _write_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` (errors as `MergeIOError`) and return its sha256."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise io_failure(f"{path}: cannot write", e) from None
    return hashlib.sha256(data).hexdigest()


def finish_folder(p: MergePlan, tmp: Path, model_card: bool) -> dict[str, str]:
    """Write the files beside the weights into the partial output folder ``tmp``: the carried
    config and tokenizer files (config.json updated for a sliced model), the model card; and
    return every such file's sha256, the shard index's included."""
    others: dict[str, str] = {}
    index = tmp / "model.safetensors.index.json"
    if index.is_file():
        others[index.name] = hashlib.sha256(index.read_bytes()).hexdigest()
    for (
        name,
        src,
    ) in p.carry_files.items():  # exactly what `plan` listed (links and sizes checked there)
        if name == "config.json":  # the dtype written; a sliced model's layer count
            try:
                data = src.read_bytes()  # at most MAX_CARRY_BYTES, checked at plan time
            except OSError as e:
                raise CheckpointFormatError(f"{shown(src)}: cannot read ({e.strerror})") from None
            others[name] = _write_file(tmp / name, _updated_config(p, src, data))
        else:
            others[name] = copy_file(src, tmp / name, MAX_CARRY_BYTES)
    if model_card:
        others["README.md"] = _write_file(tmp / "README.md", _model_card(p).encode("utf-8"))
    return others


def _updated_config(p: MergePlan, src: Path, data: bytes) -> bytes:
    """The carried ``config.json`` with the plan's updates (e.g. a sliced model's layer count)
    and ``torch_dtype`` (and ``dtype``, if the file has that newer key) naming the dtype the
    tensors are written in, so ``transformers`` with ``dtype="auto"`` loads what was written."""
    from soupkit.planning.slices import update_config

    updates = dict(p.config_updates)
    written = p.written_dtype
    if written is not None:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # carried as it is
            obj = None
        if isinstance(obj, dict):
            for key in ("torch_dtype", "dtype"):
                if (key == "torch_dtype" or key in obj) and obj.get(key) != written:
                    updates[key] = written
    return update_config(src, data, updates) if updates else data


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
    _check_not_input(p, dest)
    for fname in extra_files or {}:
        if Path(fname).name != fname or fname in (REPORT_NAME, "README.md"):
            raise UsageError(
                f"extra output file {fname!r}: expected a plain file name other than "
                f"{REPORT_NAME} and README.md"
            )
    inputs = _input_files(p)
    before = input_states([p], inputs)
    fingerprint = _fingerprint(p, dest, before) if resume else None
    folder = OutputFolder(dest, force=force, resume_key=fingerprint[:16] if fingerprint else None)
    hasher = BackgroundHasher(inputs, HashCache.default()) if hash_inputs and inputs else None
    try:
        with folder as tmp:
            done: dict[str, str] = {}
            journal = None
            if fingerprint is not None:
                journal = Journal(tmp, fingerprint)
                done = journal.verified(p.shards) if folder.resumed else {}
                journal.start(done, p.shards)
            bar = _progress_bar(p.input_bytes, progress, f"merge {p.method.name}")
            sink = FileSink(p, tmp, done=done, journal=journal)
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
            others = finish_folder(p, tmp, model_card)
            for fname, data in (extra_files or {}).items():
                others[fname] = _write_file(tmp / fname, data)
            input_hashes = hasher.result() if hasher is not None else {}
            changed_files_check(before)
            report = {
                **_report(
                    p,
                    stats,
                    dest,
                    input_hashes=input_hashes,
                    output_hashes=sink.hashes,
                    hashes_from_cache=hasher.from_cache if hasher is not None else (),
                    other_files=others,
                    resumed_shards=len(done),
                ),
                **dict(extra_report or {}),
            }
            _write_file(tmp / REPORT_NAME, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    finally:
        if hasher is not None:
            hasher.cancel()
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
