"""Plan a merge from headers and the recipe alone: every problem up front, then a complete plan.

`make_plan` checks compatibility of every input (missing or extra tensors, shapes, dtypes,
parameter names and values, filters that match nothing) and reports *all* problems together in
one `PlanError` or `ConfigError`, before any tensor data is read. A successful plan knows each
output tensor's inputs, method parameters, dtype and byte offset, so the writer can put the
complete header on disk first.
"""

from __future__ import annotations

import difflib
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from soupkit import methods
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.format import human_bytes
from soupkit.errors import (
    CheckpointFormatError,
    ConfigError,
    PlanError,
    shown,
)
from soupkit.io.checkpoint import CARRY_FILES, Checkpoint, carried_files, open_checkpoint
from soupkit.io.header import DTYPES, TensorInfo
from soupkit.io.names import KeyMap, prefix_fix
from soupkit.io.writer import STAGING_BYTES, OutputTensor, ShardLayout, layout_shards, parse_size
from soupkit.methods import MethodSpec, Params
from soupkit.methods._conventions import describe_convention
from soupkit.planning.prepass import prepass_notes, prepass_problems
from soupkit.planning.sizes import (
    BATCH_ENTRIES,
    COMPUTE_ELEMS,
    OUTPUT_BUFFERS,
    RNG_BLOCK,
    compute_threads,
    stream_threads,
)
from soupkit.recipe.params import LayerIndex, condition_matches, first_match, resolve_chain
from soupkit.recipe.schema import Conditional, MergeConfig, ModelEntry, ParamValue

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "MergePlan",
    "TensorJob",
    "carry_source",
    "check_method",
    "make_plan",
    "plan_checked",
    "Opener",
]


class Opener(Protocol):
    """Opens one model path of a recipe (headers only), e.g.
    `soupkit.planning.from_recipe.open_path` or `soupkit.adapters.model_adapter.open_model`."""

    def __call__(
        self, cfg: MergeConfig, path: str, *, allow_pickle: bool = False
    ) -> Checkpoint: ...


DEFAULT_CHUNK_ELEMS = 1 << 21  # 2M elements: a few MiB per input, enough to amortise overhead
_DTYPE_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_DTYPE_NAME = {code: name for name, code in _DTYPE_CODE.items()}
MAX_PROBLEMS_SHOWN = 50


def out_dtype_code(cfg: MergeConfig, spec: MethodSpec, stored: str) -> str:
    """The safetensors dtype a float tensor is written in: ``out_dtype``, else ``dtype``, else
    the input's (``stored``). In exact mode without ``out_dtype`` it is what mergekit 0.1.5
    writes: a method whose arithmetic promotes 16-bit inputs (``spec.exact_out_dtype``) gives
    that dtype."""
    if cfg.out_dtype:
        return _DTYPE_CODE[cfg.out_dtype]
    code = _DTYPE_CODE[cfg.dtype] if cfg.dtype else stored
    if cfg.compute == "exact" and spec.exact_out_dtype is not None and code in ("BF16", "F16"):
        return _DTYPE_CODE[spec.exact_out_dtype]
    return code


@dataclass(frozen=True)
class TensorJob:
    """One output tensor and how to make it.

    Attributes:
        name: output tensor name.
        shape: its shape.
        out_dtype: safetensors dtype code of the output.
        inputs: the models' tensors, in recipe order (empty for a copy).
        base: the base model's tensor, when the method uses one.
        source: for a copy (non-float tensors): the tensor whose bytes are carried over.
        params: the method's parameters resolved for this tensor (None for a copy).
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    inputs: tuple[TensorInfo, ...] = ()
    base: TensorInfo | None = None
    source: TensorInfo | None = None
    params: Params | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_copy(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class MergePlan:
    """Everything needed to run a merge, decided from headers only."""

    config: MergeConfig
    method: MethodSpec
    models: tuple[Checkpoint, ...]
    base: Checkpoint | None
    jobs: tuple[TensorJob, ...]
    shards: tuple[ShardLayout, ...]
    chunk_elems: int
    carry_from: Path | None
    filter_counts: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # keys to change in the carried config.json (e.g. the layer count of a sliced model)
    config_updates: dict[str, Any] = field(default_factory=dict)
    # the files carried from `carry_from` into the output: name -> file (links followed)
    carry_files: dict[str, Path] = field(default_factory=dict)

    @property
    def written_dtype(self) -> str | None:
        """The torch dtype name (``"bfloat16"``, ...) of every floating-point tensor written, or
        None when they differ or there are none: what ``config.json`` must name."""
        names = {_DTYPE_NAME[j.out_dtype] for j in self.jobs if j.out_dtype in _DTYPE_NAME}
        return names.pop() if len(names) == 1 else None

    @property
    def whole_tensors(self) -> bool:
        """The engine hands the method whole tensors: it needs them, or exact mode (which
        computes each tensor as mergekit does, in one piece)."""
        return self.method.streams_whole_tensors or self.config.compute == "exact"

    @property
    def input_bytes(self) -> int:
        """Bytes of tensor data the merge reads."""
        n = 0
        for j in self.jobs:
            if j.source is not None:
                n += j.source.nbytes
            n += sum(t.nbytes for t in j.inputs) + (j.base.nbytes if j.base is not None else 0)
        return n

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def peak_memory_bytes(self) -> int:
        """Estimated peak bytes of the engine's tensor buffers for this plan (not the interpreter).

        Per tensor: two raw read units in flight (the one computed and the one read ahead), the
        pooled output buffers, the float32 working set of one compute piece per compute thread
        (each input's copy and the method's temporaries, about two per input; a method that
        needs whole tensors declares its own count, `MethodSpec.work_per_input`), plus a pre-pass's
        radix-select batches per thread (TIES); a method that needs whole tensors holds one tensor's
        raw inputs alone, their float32 copies, temporaries and the output. Plus the buffer of
        the shard writer's direct writes.
        """
        spec = self.method
        stochastic = spec.elementwise and spec.stochastic
        # each compute thread has its own working set (and trim batches); as in execute.run_plans
        workers = compute_threads() if stochastic else stream_threads()
        peak = 0
        for j in self.jobs:
            out = DTYPES[j.out_dtype][1]
            if j.source is not None:
                n = min(j.numel, self.chunk_elems)
                peak = max(peak, n * (2 * j.source.itemsize + OUTPUT_BUFFERS * out))
                continue
            k = len(j.inputs) + (1 if j.base is not None else 0)
            raw = sum(t.itemsize for t in j.inputs) + (j.base.itemsize if j.base is not None else 0)
            if self.whole_tensors:
                need = j.numel * (raw + 4 * (spec.work_per_input * k + 1) + out)
            else:
                n = min(
                    j.numel,
                    max(self.chunk_elems, workers * RNG_BLOCK) if stochastic else self.chunk_elems,
                )
                piece = min(n, RNG_BLOCK if stochastic else COMPUTE_ELEMS)
                # + each thread's raw copy of its piece (pieces read by the compute threads)
                need = n * (2 * raw + OUTPUT_BUFFERS * out) + workers * piece * (
                    4 * (2 * k + 1) + raw
                )
                if spec.prepass is not None:  # its accumulators' batches, per thread
                    need += 4 * len(j.inputs) * min(j.numel, BATCH_ENTRIES) * workers
            peak = max(peak, need)
        return peak + min(
            STAGING_BYTES, self.output_bytes
        )  # the shard writer's direct-write buffer

    def describe(self, *, max_rows: int = 40) -> str:
        """A human-readable dry-run report."""
        cfg = self.config
        lines = [
            f"method      {self.method.name}  ({self.method.paper})",
            f"models      {len(self.models)}"
            + "".join(f"\n  - {shown(m.label)}" for m in self.models),
        ]
        if self.base is not None:
            lines.append(f"base        {shown(self.base.label)}")
        n_copy = sum(1 for j in self.jobs if j.is_copy)
        params = sum(j.numel for j in self.jobs)
        out_dtypes = Counter(j.out_dtype for j in self.jobs)
        lines += [
            f"tensors     {len(self.jobs)} ({len(self.jobs) - n_copy} merged, {n_copy} copied: non-float)",
            f"parameters  {params:,}",
            "out dtype   " + ", ".join(f"{d} x{c}" for d, c in out_dtypes.most_common()),
            f"reads       {human_bytes(self.input_bytes)}",
            f"writes      {human_bytes(self.output_bytes)} in {len(self.shards)} shard(s)",
            f"peak memory ~{human_bytes(self.peak_memory_bytes)} of tensor buffers "
            f"({_pieces(self)})",
            "compute     "
            + (
                "exact: in the recipe's dtype "
                f"({cfg.dtype or 'of the inputs'}), mergekit 0.1.5's arithmetic (its bits for "
                "deterministic methods)"
                if cfg.compute == "exact"
                else "float32 accumulation (`compute: exact` for "
                "mergekit's bits in the recipe's dtype)"
            ),
            f"seed        {cfg.seed}"
            + ("" if self.method.stochastic else " (method is deterministic)"),
        ]
        conventions = dict.fromkeys(
            c for j in self.jobs if (c := describe_convention(j.params)) is not None
        )
        lines += [f"convention  {c}" for c in conventions]
        if self.carry_from is not None:
            lines.append(
                f"carries     {', '.join(self.carry_files) or 'nothing'} from {self.carry_from}"
            )
        for key, count in self.filter_counts.items():
            lines.append(f"filter      {key}: matched {count} tensor(s)")
        lines += [f"note        {n}" for n in self.notes]
        lines.append("")
        lines.append(f"{'tensor':<48} {'shape':<18} {'out':<5} params")
        for j in self.jobs[:max_rows]:
            shown_params = "copy (non-float)" if j.is_copy else _short_params(j.params)
            lines.append(
                f"{shown(j.name, limit=48):<48} {str(list(j.shape))[:18]:<18} {j.out_dtype:<5} "
                f"{shown_params}"
            )
        if len(self.jobs) > max_rows:
            lines.append(f"... {len(self.jobs) - max_rows} more tensors")
        return "\n".join(lines)


def _pieces(p: MergePlan) -> str:
    if p.config.compute == "exact":
        return "whole tensors: exact mode"
    if p.method.streams_whole_tensors:
        return "whole tensors: this method needs them"
    return f"chunks of {p.chunk_elems:,} elements"


def _short_params(p: Params | None) -> str:
    if p is None:
        return ""
    parts = []
    for k, v in p.model_dump(by_alias=True).items():
        if isinstance(v, (list, tuple)):
            v = "[" + ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) + "]"
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def validated_params(
    spec: MethodSpec,
    values: Mapping[str, Any],
    name: str,
    cache: dict[tuple[Any, ...], Params],
    bad: dict[str, tuple[str, int]],
) -> Params | None:
    """The method's `Params` for one tensor's resolved ``values``, or None if they are invalid.

    Identical value sets share one instance (``cache``); each distinct validation message is
    recorded once in ``bad`` with the first tensor it hit and how many tensors it hit.
    """
    key = tuple(sorted(values.items()))
    p = cache.get(key)
    if p is not None:
        return p
    try:
        p = spec.params.model_validate(values)
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = f"parameter {loc or '?'}: {err['msg']} (got {err.get('input')!r})"
            first, count = bad.get(msg, (name, 0))
            bad[msg] = (first, count + 1)
        return None
    cache[key] = p
    return p


def count_filter_matches(
    conds: Mapping[str, Any], name: str, counts: dict[str, int], shadowed: dict[str, int]
) -> None:
    """Count, for every filter entry (``key -> (value list, entry index, condition)``) that
    matches tensor ``name``, whether it decides the tensor or an earlier entry does."""
    for key, (value, idx, c) in conds.items():
        if condition_matches(c, name):
            if first_match(value, name) == idx:
                counts[key] += 1
            else:
                shadowed[key] += 1


def parameter_problems(
    filter_counts: Mapping[str, int],
    shadowed: Mapping[str, int],
    bad: Mapping[str, tuple[str, int]],
) -> list[str]:
    """The problems planning found in per-tensor parameters: filter entries that decide no
    tensor (matching none, or only tensors an earlier entry takes), and each distinct
    validation message of `validated_params` with the first tensor it hit."""
    problems: list[str] = []
    for key, count in filter_counts.items():
        if count == 0 and shadowed[key]:
            problems.append(
                f"{key} matched no tensor it decides: the {shadowed[key]} merged tensor(s) it "
                "matches all take an earlier entry of the same list\n"
                "    hint: the first matching entry wins; put more specific entries first"
            )
        elif count == 0:
            problems.append(
                f"{key} matched no tensor\n    hint: check the spelling against "
                "`soupkit inspect` (only merged, floating-point tensors count)"
            )
    for msg, (first, count) in bad.items():
        more = f" and {count - 1} other tensor(s)" if count > 1 else ""
        problems.append(f"{msg} for tensor {shown(first, quote=True)}{more}")
    return problems


# Parameters some mergekit 0.1.5 method takes. mergekit accepts any of them on any method and
# ignores those the method does not use (its planner looks up only the names a method declares),
# e.g. `weight` on model_stock: soupkit accepts them too, with a note saying they are ignored.
MERGEKIT_PARAMETERS = frozenset(
    {
        "weight",
        "density",
        "gamma",
        "epsilon",
        "lambda",
        "normalize",
        "rescale",
        "int8_mask",
        "t",
        "filter_wise",
        "select_topk",
        "nuslerp_flatten",
        "nuslerp_row_wise",
        "eps",
        "max_iter",
        "tol",
        "scale",
        "similarity_threshold",
    }
)
# ... except where the name does change mergekit's result and soupkit's method has no such switch
_MERGEKIT_NOT_IGNORED = {
    ("rescale", "ties"),
    ("rescale", "breadcrumbs"),
    ("rescale", "breadcrumbs_ties"),
}


def ignored_by_mergekit(key: str, value: Any, spec: MethodSpec) -> bool:
    """``key`` is a mergekit parameter that mergekit ignores for this method (see above)."""
    if key in spec.per_model_names or key in spec.global_names or key not in MERGEKIT_PARAMETERS:
        return False
    return not ((key, spec.name) in _MERGEKIT_NOT_IGNORED and value is not False)


def _same_as_global(cfg: MergeConfig, spec: MethodSpec, key: str, value: Any) -> bool:
    """A global parameter repeated under a model with the value it has anyway (the top-level
    one, else the method's default): mergekit ignores it there, and so may soupkit."""
    if key in cfg.parameters:
        return bool(cfg.parameters[key] == value)
    field = next((f for n, f in spec.params.model_fields.items() if (f.alias or n) == key), None)
    return field is not None and field.default == value


def ignored_parameter_notes(cfg: MergeConfig, spec: MethodSpec) -> list[str]:
    """One note per mergekit parameter the recipe gives that this method does not use, and per
    global parameter repeated under a model with its global value."""
    levels = [cfg.parameters, *(m.parameters for m in cfg.models)]
    for sl in cfg.slices or []:
        levels += [sl.parameters, *(s.parameters for s in sl.sources)]
    keys = [k for params in levels for k, v in params.items() if ignored_by_mergekit(k, v, spec)]
    notes = [
        f"parameter {k!r} is ignored: {spec.name!r} does not use it (mergekit accepts and ignores it too)"
        for k in dict.fromkeys(keys)
    ]
    repeated = [
        k
        for m in cfg.models
        for k, v in m.parameters.items()
        if k in spec.global_names and _same_as_global(cfg, spec, k, v)
    ]
    notes += [
        f"parameter {k!r} under a model is ignored: it is global (its top-level value applies, "
        "as in mergekit)"
        for k in dict.fromkeys(repeated)
    ]
    return notes


def _check_param_names(cfg: MergeConfig, spec: MethodSpec) -> list[str]:
    problems: list[str] = []
    per_model, glob = set(spec.per_model_names), set(spec.global_names)
    every = sorted(per_model | glob)

    def unknown(key: str, where: str) -> str:
        close = difflib.get_close_matches(key, every, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return (
            f"{where}: unknown parameter {key!r} for method {spec.name!r}; {hint}"
            f"it takes: {', '.join(every) or 'no parameters'}"
        )

    for key, value in cfg.parameters.items():
        if key not in per_model and key not in glob and not ignored_by_mergekit(key, value, spec):
            problems.append(unknown(key, "parameters"))
    for i, m in enumerate(cfg.models):
        for key, value in m.parameters.items():
            if ignored_by_mergekit(key, value, spec):
                continue
            if key in glob:
                if _same_as_global(cfg, spec, key, value):
                    continue
                problems.append(
                    f"models[{i}].parameters: {key!r} is a global parameter of "
                    f"{spec.name!r}; set it under the top-level `parameters:` (mergekit "
                    "would ignore it here: it reads global parameters from the top level only)"
                )
            elif key not in per_model:
                problems.append(unknown(key, f"models[{i}].parameters"))
    return problems


def check_tokenizer_source(cfg: MergeConfig, carry_from: Path | None) -> None:
    """An explicit ``tokenizer_source`` that yields no files is an error, never silently ignored."""
    src = cfg.tokenizer_source
    if src is None or carry_from is not None:
        return
    if src == "base" and not cfg.base_model:
        raise ConfigError(
            [
                "tokenizer_source: 'base' but the recipe has no `base_model:`\n"
                "    hint: set base_model, or give the folder to take the tokenizer from"
            ]
        )
    raise ConfigError(
        [
            f"tokenizer_source: {src!r} has no tokenizer or config files to copy "
            f"(looked for {', '.join(CARRY_FILES[:4])}, ...)\n"
            "    hint: give a model folder that holds its tokenizer files"
        ]
    )


def _same_file(a: Checkpoint, b: Checkpoint) -> bool:
    if a.path is None or b.path is None:
        return a is b
    try:
        return os.path.samefile(a.path, b.path)
    except OSError:
        return False


def make_plan(
    cfg: MergeConfig,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    *,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> MergePlan:
    """Plan a merge of already-opened checkpoints (files or in-memory).

    ``models`` align with ``cfg.models``. See `soupkit.planning.from_recipe.plan_recipe` for
    errors.
    """
    spec = methods.get(cfg.merge_method)
    check_method(cfg, spec, has_base=base is not None)
    return plan_checked(
        cfg, spec, models, base, max_shard_size=max_shard_size, chunk_elems=chunk_elems
    )


def check_method(cfg: MergeConfig, spec: MethodSpec, *, has_base: bool) -> None:
    """Check the recipe against its method, once per plan: every parameter name is one the
    method takes, at the level it takes it; a base model where the method needs one.

    Raises:
        ConfigError: every problem found.
    """
    problems = _check_param_names(cfg, spec)
    if spec.needs_base and not has_base:
        problems.append(f"merge_method {spec.name!r} needs a `base_model:`")
    if problems:
        raise ConfigError(problems)


def plan_checked(
    cfg: MergeConfig,
    spec: MethodSpec,
    models: Sequence[Checkpoint],
    base: Checkpoint | None,
    *,
    max_shard_size: int | str,
    chunk_elems: int,
) -> MergePlan:
    """`make_plan` of a recipe that `check_method` accepted for ``spec``."""
    try:
        shard_limit = parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError([f"max_shard_size: {e}"]) from None
    if chunk_elems < 1:
        raise ConfigError([f"chunk_elems must be >= 1, got {chunk_elems}"])

    notes: list[str] = [
        n for c in (*models, *([base] if base is not None else [])) for n in c.notes
    ]
    notes += ignored_parameter_notes(cfg, spec) + cfg.recipe_notes()
    entries = list(zip(cfg.models, models))
    if spec.base_as_input and base is not None and not any(_same_file(m, base) for m in models):
        # As mergekit does: the base joins the inputs after the models when it is not listed
        entries.append((ModelEntry(model=cfg.base_model or "base"), base))
    uses_base = spec.needs_base or (spec.optional_base and base is not None)
    if uses_base and base is not None:
        # As mergekit does: the base listed among the models is the base, not one more model
        # (a zero task vector; slerp's and wise_ft's t = 0 end; model_stock's anchor); drop it.
        kept = [(e, m) for e, m in entries if not _same_file(m, base)]
        if len(kept) != len(entries):
            notes.append(
                "the base model is also listed under models; its task vector is zero, "
                "so it was left out of the merge"
                if spec.kind == "task_vector"
                else "the base model is also listed under models; it is used as the base only"
            )
        entries = kept
    n = len(entries)
    problems: list[str] = []
    if n < spec.min_models:
        problems.append(
            f"method {spec.name!r} needs at least {spec.min_models} model(s) "
            f"besides the base, got {n}"
        )
    if spec.max_models is not None and n > spec.max_models:
        problems.append(f"method {spec.name!r} takes at most {spec.max_models} model(s), got {n}")
    if problems:
        raise ConfigError(problems)
    ckpts = [m for _, m in entries]
    ref = base if base is not None else ckpts[0]
    # Methods that do not use a base (linear) only take config/tokenizer files from it.
    cast_all = cfg.dtype is not None

    # 0. names that differ only by a wrapper prefix: one problem that names the fix
    prefix_problem = _prefix_problem(
        ref, [*ckpts, *([base] if base is not None and base is not ref else [])]
    )
    if prefix_problem is not None:
        raise PlanError([prefix_problem])

    # 1. every input has every reference tensor, with the same shape and kind of dtype
    for m in ckpts + ([base] if base is not None and base is not ref else []):
        extra = [k for k in m.tensors if k not in ref.tensors]
        if extra:
            listed = ", ".join(shown(x, quote=True) for x in extra[:5]) + (
                f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            )
            problems.append(
                f"{shown(m.label)} has {len(extra)} tensor(s) that {shown(ref.label)} lacks: {listed}\n"
                "    hint: the models do not share an architecture, or a head was added"
            )
    for name, r in ref.tensors.items():
        group = [(m.label, m.tensors.get(name)) for m in ckpts]
        missing = [lab for lab, t in group if t is None]
        if missing:
            problems.append(
                f"tensor {shown(name, quote=True)} is missing from {', '.join(shown(x) for x in missing)} (present in {shown(ref.label)})"
            )
            continue
        shapes = {lab: t.shape for lab, t in group if t is not None}
        if any(s != r.shape for s in shapes.values()):
            rows = "\n".join(
                f"      {lab:<30} {list(s)}" for lab, s in [(ref.label, r.shape), *shapes.items()]
            )
            hint = (
                "vocabularies differ; resize embeddings first"
                if "embed" in name or "lm_head" in name
                else "the models do not share an architecture"
            )
            problems.append(
                f"tensor {shown(name, quote=True)}: shapes differ\n{rows}\n    hint: {hint}"
            )
            continue
        kinds = {lab: t.is_float for lab, t in group if t is not None}
        if any(k != r.is_float for k in kinds.values()):
            problems.append(
                f"tensor {shown(name, quote=True)}: float in some models and integer in others "
                f"({', '.join(f'{lab}: {t.dtype}' for lab, t in group if t is not None)})"
            )
            continue
        dts = {t.dtype for _, t in group if t is not None} | {r.dtype}
        if r.is_float and len(dts) > 1 and not cast_all:
            problems.append(
                f"tensor {shown(name, quote=True)}: mixed dtypes "
                f"({', '.join(f'{lab}: {t.dtype}' for lab, t in [(ref.label, r), *group] if t is not None)})\n"
                "    hint: set `dtype:` in the recipe (e.g. float32) to cast every input first"
            )
    if problems:
        raise PlanError(problems)

    # 2. resolve parameters per tensor, validate them, count filter matches
    layers = LayerIndex.from_names(ref.tensors)
    levels_global: Mapping[str, ParamValue] = cfg.parameters
    # A filter entry counts for the merged tensors it *decides*: the first matching entry of
    # its list. An entry that only ever matches after an earlier entry is never used: an error.
    filter_keys: dict[str, tuple[ParamValue, int, Conditional]] = {}
    for where, params in [("parameters", cfg.parameters)] + [
        (f"models[{i}].parameters", e.parameters) for i, (e, _) in enumerate(entries)
    ]:
        for key, value in params.items():
            for idx, c in enumerate(value if isinstance(value, list) else []):
                if isinstance(c, Conditional) and (c.filter is not None or c.match is not None):
                    label = " ".join(
                        [f"{where}.{key}"]
                        + ([f"filter={c.filter!r}"] if c.filter is not None else [])
                        + ([f"match={c.match!r}"] if c.match is not None else [])
                    )
                    if label in filter_keys:
                        label += f" (entry {idx + 1})"
                    filter_keys[label] = (value, idx, c)
    filter_counts = {k: 0 for k in filter_keys}
    shadowed = {k: 0 for k in filter_keys}
    param_cache: dict[tuple[Any, ...], Params] = {}
    bad_params: dict[str, tuple[str, int]] = {}
    jobs: list[TensorJob] = []
    for name, r in ref.tensors.items():
        if not r.is_float:
            jobs.append(TensorJob(name, r.shape, r.dtype, source=r))
            continue
        count_filter_matches(filter_keys, name, filter_counts, shadowed)
        t = layers.t(name)
        values: dict[str, Any] = {}
        for key, default in spec.params.per_model.items():
            values[key] = tuple(
                v
                if (v := resolve_chain(key, (e.parameters, levels_global), name, t)) is not None
                else default
                for e, _ in entries
            )
        for key in spec.global_names:
            v = resolve_chain(key, (levels_global,), name, t)
            if v is not None:
                values[key] = v
        p = validated_params(spec, values, name, param_cache, bad_params)
        if p is None:
            continue
        jobs.append(
            TensorJob(
                name,
                r.shape,
                out_dtype_code(cfg, spec, r.dtype),
                inputs=tuple(m.tensors[name] for m in ckpts),
                base=base.tensors[name] if (base is not None and uses_base) else None,
                params=p,
            )
        )
    problems += parameter_problems(filter_counts, shadowed, bad_params)
    if cfg.compute == "exact":
        problems += exact_problems(spec, jobs)
    if not bad_params:
        problems += prepass_problems(spec, jobs)
        notes += prepass_notes(spec, jobs)
    if problems:
        raise ConfigError(problems)

    outputs = [OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs]
    shards = layout_shards(outputs, shard_limit)
    carry = carry_source(cfg, base, ckpts)
    return MergePlan(
        config=cfg,
        method=spec,
        models=tuple(ckpts),
        base=base,
        jobs=tuple(jobs),
        shards=tuple(shards),
        chunk_elems=chunk_elems,
        carry_from=carry,
        filter_counts=filter_counts,
        notes=tuple(notes),
        carry_files=carried_files(carry) if carry is not None else {},
    )


def _prefix_problem(ref: Checkpoint, others: Sequence[Checkpoint]) -> str | None:
    """One problem for inputs whose tensor names differ from ``ref``'s only by a prefix that
    ``--strip-prefix`` removes (instead of one problem per tensor), or None."""
    differ = [m for m in others if m.tensors.keys() != ref.tensors.keys()]
    if not differ:
        return None
    fix = prefix_fix([ref.tensors, *(m.tensors for m in differ)])
    if fix is None:
        return None
    km = KeyMap.build(strip_prefix=fix)
    first = next(iter(ref.tensors))
    rows = [
        f"      {m.label:<30} {next((n for n in m.tensors if km(n) == km(first)), '?')!r}"
        for m in [ref, *differ]
    ]
    flags = " ".join(f"--strip-prefix {p}" for p in fix)
    return (
        f"the models' tensor names differ only by a prefix ({', '.join(repr(p) for p in fix)}); "
        f"the same tensor is named:\n" + "\n".join(rows) + "\n"
        f"    hint: add {flags} (recipe key: `strip_prefix: [{', '.join(fix)}]`), which removes "
        "it from every name that has it"
    )


def exact_problems(spec: MethodSpec, jobs: Sequence[TensorJob]) -> list[str]:
    """Why ``compute: exact`` cannot reproduce mergekit for these jobs: each distinct reason
    that the method's ``exact_check`` gives, with the first tensor and how many it hits."""
    if spec.exact_check is None:
        return []
    seen: dict[str, tuple[str, int]] = {}
    for j in jobs:
        if j.params is None:
            continue
        msg = spec.exact_check(j.params)
        if msg is not None:
            first, count = seen.get(msg, (j.name, 0))
            seen[msg] = (first, count + 1)
    return [
        f"compute: exact: {spec.name}: {msg} (tensor {first!r}"
        + (f" and {count - 1} other tensor(s))" if count > 1 else ")")
        for msg, (first, count) in seen.items()
    ]


def carry_source(
    cfg: MergeConfig, base: Checkpoint | None, models: Sequence[Checkpoint]
) -> Path | None:
    src = cfg.tokenizer_source
    candidates: list[Checkpoint | None]
    if src is None or src == "base":
        candidates = [base, *models] if src is None else [base]
    else:
        try:
            ck = open_checkpoint(cfg.resolve_model_path(src))
        except CheckpointFormatError:
            folder = Path(src)
            return folder if folder.is_dir() else None
        candidates = [ck]
    for c in candidates:
        if (
            c is not None and c.folder is not None and carried_files(c.folder)
        ):  # checks sizes and links
            return c.folder
    return None
