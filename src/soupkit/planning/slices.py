"""mergekit ``slices``: stack layer ranges of models into a new model, renumbering the layers.

A mergekit recipe may list *slices* instead of models::

    merge_method: passthrough          # copy: one source per slice
    slices:
      - sources: [{model: ./a, layer_range: [0, 16]}]
      - sources: [{model: ./b, layer_range: [8, 24]}]

    merge_method: linear               # or merge each slice across several sources
    slices:
      - sources:
          - {model: ./a, layer_range: [0, 32], parameters: {weight: 0.6}}
          - {model: ./b, layer_range: [0, 32], parameters: {weight: 0.4}}

The output's layer ``k`` (counting through the slices in order) is made from layer
``start + j`` of every source of the slice it falls in, where ``j`` is its offset inside the
slice: ``model.layers.{k}.<rest>`` <- ``model.layers.{start + j}.<rest>``. This is plan-level
renaming: the planner reads headers only and the engine streams as for any merge.

Tensors outside the numbered layers follow mergekit: the embeddings ("pre" weights) come from
the *first* slice's sources and the final norm and head ("post" weights) from the *last*
slice's sources, merged with the recipe's method like any tensor. The output ``config.json``
(carried from the base model, else the first model with one) gets the new layer count in
``num_hidden_layers`` (or ``n_layer`` / ``num_layers``), and a ``layer_types`` list is
rebuilt to match.

Parameters resolve as in mergekit: a source's own ``parameters``, then the slice's, then the
recipe's; gradients run across each slice (``t = j / (n - 1)``, ``t = 1`` for a one-layer
slice), and pre / post weights use ``t = 0``. ``filter`` matches the *output* tensor name.

``merge_method: passthrough`` (mergekit's copy method, per-model ``scale`` multiplies the
tensor) takes one source per slice; with ``models:`` it takes one model and copies it whole.
Other methods take several sources per slice; a method that uses a base needs the base (the
slice's ``base_model`` or the recipe's) among the slice's sources, as mergekit does, and then
uses that source as the base only (as `soupkit.planning.plan` does for ``models:``). A method whose base
is optional (``nuslerp``, ``multislerp``) does so only when the slice or recipe names a base.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from soupkit import methods
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit.errors import (
    ConfigError,
    PlanError,
    SoupError,
    UnknownMethodError,
)
from soupkit.io.checkpoint import Checkpoint, carried_files
from soupkit.io.header import TensorInfo
from soupkit.io.names import KeyMap, rename_checkpoint
from soupkit.io.writer import OutputTensor, layout_shards, parse_size
from soupkit.methods import MethodSpec, Params
from soupkit.methods.passthrough import PASSTHROUGH, PassthroughParams, passthrough
from soupkit.planning.plan import (
    DEFAULT_CHUNK_ELEMS,
    MergePlan,
    Opener,
    TensorJob,
    carry_source,
    check_tokenizer_source,
    count_filter_matches,
    exact_problems,
    ignored_by_mergekit,
    ignored_parameter_notes,
    out_dtype_code,
    parameter_problems,
    validated_params,
)
from soupkit.planning.prepass import prepass_notes, prepass_problems
from soupkit.recipe.params import resolve_chain
from soupkit.recipe.schema import Conditional, MergeConfig, ParamValue, Slice, SliceSource

__all__ = [
    "LAYER_COUNT_KEYS",
    "PASSTHROUGH",
    "LayerStack",
    "PassthroughParams",
    "passthrough",
    "plan_slices",
]

# Where a numbered stack of layers sits in a tensor name: the first such segment wins.
_LAYER = re.compile(
    r"^(?P<prefix>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<idx>\d+)\.(?P<rest>.+)$"
)
# Names of the "pre" weights (before the layers); other tensors outside layers are "post".
_PRE = ("embed", "wte", "wpe", "tok_", "word_embeddings", "position_embeddings", "token_type")
_DTYPE_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
MAX_CONFIG_BYTES = 10_000_000


@dataclass(frozen=True)
class LayerStack:
    """The numbered layers of a checkpoint.

    Attributes:
        prefix: what precedes the layer number (``model.layers``), or ``""`` when there are none.
        layers: layer number -> the rest of each tensor name in it (``self_attn.q_proj.weight``).
        outside: the tensors outside the layers, in storage order.
    """

    prefix: str
    layers: dict[int, tuple[str, ...]]
    outside: tuple[str, ...]

    @property
    def n_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0

    def name(self, idx: int, rest: str) -> str:
        return f"{self.prefix}.{idx}.{rest}"

    @classmethod
    def of(cls, ck: Checkpoint) -> LayerStack:
        """Find the layer stack of ``ck``.

        Raises:
            PlanError: the tensors number layers under more than one prefix (an encoder and a
                decoder, a vision tower), which a slice cannot address unambiguously.
        """
        prefixes: dict[str, int] = {}
        layers: dict[int, list[str]] = {}
        outside: list[str] = []
        for name in ck.tensors:
            m = _LAYER.match(name)
            if m is None:
                outside.append(name)
                continue
            prefixes[m.group("prefix")] = prefixes.get(m.group("prefix"), 0) + 1
            layers.setdefault(int(m.group("idx")), []).append(m.group("rest"))
        if len(prefixes) > 1:
            shown = ", ".join(f"{p!r} ({n} tensors)" for p, n in prefixes.items())
            raise PlanError(
                [
                    f"{ck.label}: numbered layers under {len(prefixes)} prefixes ({shown}); "
                    "slices need a model with one stack of layers\n"
                    "    hint: mergekit needs its `modules:` syntax for such models, which "
                    "soupkit does not support; see docs/mergekit.md"
                ]
            )
        prefix = next(iter(prefixes), "")
        return cls(prefix, {i: tuple(r) for i, r in sorted(layers.items())}, tuple(outside))


@dataclass
class _Source:
    ck: Checkpoint
    stack: LayerStack
    start: int
    end: int
    params: Mapping[str, ParamValue]
    is_base: bool


def _same(a: Checkpoint, b: Checkpoint) -> bool:
    if a is b:
        return True
    if a.path is None or b.path is None:
        return False
    try:
        return a.path.resolve() == b.path.resolve()
    except OSError:
        return False


def _method(cfg: MergeConfig) -> MethodSpec:
    try:
        return methods.get(cfg.merge_method)
    except UnknownMethodError as e:
        raise ConfigError([f"merge_method: {e}"]) from None


def _param_problems(spec: MethodSpec, cfg: MergeConfig) -> list[str]:
    per_model, glob = set(spec.per_model_names), set(spec.global_names)
    every = sorted(per_model | glob)
    problems: list[str] = []

    def check(params: Mapping[str, ParamValue], where: str, per_source: bool) -> None:
        for key, value in params.items():
            if ignored_by_mergekit(key, value, spec):
                continue
            if per_source and key in glob:
                problems.append(
                    f"{where}: {key!r} is a global parameter of {spec.name!r}; set it "
                    "under the slice's or the top-level `parameters:`"
                )
            elif key not in per_model and key not in glob:
                problems.append(
                    f"{where}: unknown parameter {key!r} for method {spec.name!r}; "
                    f"it takes: {', '.join(every) or 'no parameters'}"
                )

    check(cfg.parameters, "parameters", False)
    for i, m in enumerate(cfg.models):
        check(m.parameters, f"models[{i}].parameters", True)
    for i, sl in enumerate(cfg.slices or []):
        check(sl.parameters, f"slices[{i}].parameters", False)
        for j, src in enumerate(sl.sources):
            check(src.parameters, f"slices[{i}].sources[{j}].parameters", True)
    return problems


def _conditions(cfg: MergeConfig) -> dict[str, tuple[ParamValue, int, Conditional]]:
    found: dict[str, tuple[ParamValue, int, Conditional]] = {}
    levels: list[tuple[str, Mapping[str, ParamValue]]] = [("parameters", cfg.parameters)]
    levels += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(cfg.models)]
    for i, sl in enumerate(cfg.slices or []):
        levels.append((f"slices[{i}].parameters", sl.parameters))
        levels += [
            (f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(sl.sources)
        ]
    for where, params in levels:
        for key, value in params.items():
            if not isinstance(value, list):
                continue
            for idx, c in enumerate(value):
                if isinstance(c, Conditional) and (c.filter is not None or c.match is not None):
                    label = (
                        f"{where}.{key}"
                        + (f" filter={c.filter!r}" if c.filter is not None else "")
                        + (f" match={c.match!r}" if c.match is not None else "")
                    )
                    if label in found:
                        label += f" (entry {idx + 1})"
                    found[label] = (value, idx, c)
    return found


def _open_all(
    cfg: MergeConfig,
    allow_pickle: bool,
    key_map: KeyMap | None,
    opener: Opener,
) -> tuple[dict[str, Checkpoint], list[str]]:
    paths: dict[str, str] = {}
    if cfg.base_model:
        paths[cfg.base_model] = "base_model"
    for i, m in enumerate(cfg.models):
        paths.setdefault(m.model, f"models[{i}]")
    for i, sl in enumerate(cfg.slices or []):
        if sl.base_model:
            paths.setdefault(sl.base_model, f"slices[{i}].base_model")
        for j, s in enumerate(sl.sources):
            paths.setdefault(s.model, f"slices[{i}].sources[{j}]")
    opened: dict[str, Checkpoint] = {}
    problems: list[str] = []
    for path, where in paths.items():
        try:
            ck = opener(cfg, path, allow_pickle=allow_pickle)
            opened[path] = rename_checkpoint(ck, key_map)
        except SoupError as e:
            problems.append(f"{where}: {e}")
    return opened, problems


def _whole_model_slices(cfg: MergeConfig, opened: Mapping[str, Checkpoint]) -> list[Slice]:
    """``models:`` with passthrough: one slice covering every layer of each model."""
    out = []
    for m in cfg.models:
        n = LayerStack.of(opened[m.model]).n_layers
        out.append(
            Slice(sources=[SliceSource(model=m.model, layer_range=(0, n), parameters=m.parameters)])
        )
    return out


def _read_config(folder: Any) -> dict[str, Any] | None:
    if folder is None:
        return None
    path = folder / "config.json"
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _config_updates(
    config: Mapping[str, Any] | None, layer_sources: Sequence[int]
) -> dict[str, Any]:
    """New values for ``config.json``: the layer count and a matching ``layer_types``."""
    if config is None:
        return {}
    updates: dict[str, Any] = {}
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            updates[key] = len(layer_sources)
            break
    types = config.get("layer_types")
    if isinstance(types, list) and layer_sources and max(layer_sources) < len(types):
        updates["layer_types"] = [types[i] for i in layer_sources]
    return updates


def plan_slices(
    cfg: MergeConfig,
    *,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    allow_pickle: bool = False,
    key_map: KeyMap | None = None,
    opener: Opener,
) -> MergePlan:
    """Plan a recipe with ``slices`` (or a ``passthrough`` of models) from headers only.

    Args:
        cfg: the recipe.
        max_shard_size: largest output shard.
        chunk_elems: elements per chunk for elementwise methods.
        allow_pickle: accept PyTorch pickle checkpoints (``torch.load(weights_only=True)``).
        key_map: tensor renaming applied to every input before planning.
        opener: opens each model path (see `soupkit.planning.plan.Opener`).

    Returns:
        A `MergePlan` whose ``config_updates`` hold the new layer count for ``config.json``.

    Raises:
        ConfigError: unknown method or parameters, bad layer ranges, a slice whose sources
            differ in length, a missing base; every problem at once.
        PlanError: checkpoints that cannot be opened or sliced (missing layers, shapes).
    """
    spec = _method(cfg)
    problems = _param_problems(spec, cfg)
    if problems:
        raise ConfigError(problems)
    try:
        shard_limit = parse_size(max_shard_size)
    except ValueError as e:
        raise ConfigError([f"max_shard_size: {e}"]) from None
    if chunk_elems < 1:
        raise ConfigError([f"chunk_elems must be >= 1, got {chunk_elems}"])
    opened, open_problems = _open_all(cfg, allow_pickle, key_map, opener)
    if open_problems:
        raise PlanError(open_problems)
    whole = not cfg.slices  # `models:` with passthrough: each model copied whole
    slices = list(cfg.slices) if cfg.slices else _whole_model_slices(cfg, opened)
    stacks = {path: LayerStack.of(ck) for path, ck in opened.items()}
    base_ck = opened[cfg.base_model] if cfg.base_model else None

    # 1. structure: layer ranges, slice lengths, sources per slice, bases
    # (nuslerp, multislerp: a base is optional, and used when the slice has one, as in mergekit)
    takes_base = spec.needs_base or spec.optional_base
    cfg_problems: list[str] = []
    resolved: list[tuple[list[_Source], Checkpoint | None]] = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        lengths = set()
        sources: list[_Source] = []
        slice_base = opened[sl.base_model] if sl.base_model else base_ck
        for j, entry in enumerate(sl.sources):
            ck, stack = opened[entry.model], stacks[entry.model]
            a, b = entry.layer_range
            if not 0 <= a < b and not (
                whole and a == b == 0
            ):  # a model without layers: copied whole
                cfg_problems.append(
                    f"{where}.sources[{j}].layer_range: [{a}, {b}] is empty or negative; "
                    "expected [start, end) with 0 <= start < end"
                )
            elif b > stack.n_layers and stack.n_layers == 0:
                cfg_problems.append(
                    f"{where}.sources[{j}]: {entry.model} has no numbered layers (names "
                    "like 'model.layers.0.*' or 'transformer.h.0.*'), so there is nothing to slice"
                )
            elif b > stack.n_layers:
                cfg_problems.append(
                    f"{where}.sources[{j}].layer_range: [{a}, {b}] but {entry.model} has "
                    f"{stack.n_layers} layer(s) (0..{stack.n_layers - 1}); the end is exclusive"
                )
            lengths.add(b - a)
            sources.append(
                _Source(
                    ck,
                    stack,
                    a,
                    b,
                    entry.parameters,
                    slice_base is not None and _same(ck, slice_base),
                )
            )
        if len(lengths) > 1:
            cfg_problems.append(
                f"{where}: its sources span different numbers of layers "
                f"({', '.join(str(b - a) for a, b in (s.layer_range for s in sl.sources))}); "
                "every source of a slice must give the same number of layers"
            )
        inputs = [s for s in sources if not (takes_base and s.is_base)]
        if spec.needs_base or (takes_base and slice_base is not None):
            if slice_base is None:
                cfg_problems.append(f"merge_method {spec.name!r} needs a `base_model:`")
            elif not any(s.is_base for s in sources):
                cfg_problems.append(
                    f"{where}: the base model {slice_base.label} is not one of its sources; "
                    "as in mergekit, list it under the slice's sources with its layer_range"
                )
        if len(inputs) < spec.min_models:
            cfg_problems.append(
                f"{where}: method {spec.name!r} needs at least {spec.min_models} source(s)"
                f"{' besides the base' if spec.kind == 'task_vector' else ''}, got {len(inputs)}"
            )
        if spec.max_models is not None and len(inputs) > spec.max_models:
            cfg_problems.append(
                f"{where}: method {spec.name!r} takes at most {spec.max_models} source(s) "
                f"per slice, got {len(inputs)}"
            )
        resolved.append((sources, slice_base))
    if cfg_problems:
        raise ConfigError(list(dict.fromkeys(cfg_problems)))

    # 2. the output tensors, each with its inputs and parameter levels
    first_sources = resolved[0][0]
    out_stack = first_sources[0].stack
    if not out_stack.prefix and not whole:
        raise PlanError(
            [
                f"{first_sources[0].ck.label}: no numbered layers found "
                "(names like 'model.layers.0.*' or 'transformer.h.0.*'), so there is "
                "nothing to slice"
            ]
        )
    cast_all = cfg.dtype is not None
    conds = _conditions(cfg)
    filter_counts = {k: 0 for k in conds}
    shadowed = {k: 0 for k in conds}
    param_cache: dict[tuple[Any, ...], Params] = {}
    bad_params: dict[str, tuple[str, int]] = {}
    problems = []
    jobs: list[TensorJob] = []
    layer_sources: list[int] = []

    def add(
        out_name: str,
        group: Sequence[tuple[_Source, str]],
        base_info: TensorInfo | None,
        slice_params: Mapping[str, ParamValue],
        t: float,
    ) -> None:
        infos: list[tuple[_Source, TensorInfo]] = []
        for src, name in group:
            info = src.ck.tensors.get(name)
            if info is None:
                problems.append(
                    f"tensor {name!r} is missing from {src.ck.label} (needed for output {out_name!r})"
                )
                return
            infos.append((src, info))
        first = infos[0][1]
        others = [(s.ck.label, i) for s, i in infos[1:]] + (
            [("the base model", base_info)] if base_info else []
        )
        for label, info in others:
            if info.shape != first.shape:
                problems.append(
                    f"output tensor {out_name!r}: shapes differ: {infos[0][0].ck.label} "
                    f"{info.name!r} {list(first.shape)} vs {label} {info.name!r} {list(info.shape)}"
                )
                return
            if info.is_float != first.is_float:
                problems.append(
                    f"output tensor {out_name!r}: float in some inputs and integer in others"
                )
                return
            if first.is_float and info.dtype != first.dtype and not cast_all:
                problems.append(
                    f"output tensor {out_name!r}: mixed dtypes ({first.dtype}, {info.dtype})\n"
                    "    hint: set `dtype:` in the recipe (e.g. float32) to cast every input first"
                )
                return
        if not first.is_float:
            jobs.append(TensorJob(out_name, first.shape, first.dtype, source=first))
            return
        count_filter_matches(conds, out_name, filter_counts, shadowed)
        merged = [(s, i) for s, i in infos if not (takes_base and s.is_base)]
        values: dict[str, Any] = {}
        for key, default in spec.params.per_model.items():
            values[key] = tuple(
                v
                if (v := resolve_chain(key, (s.params, slice_params, cfg.parameters), out_name, t))
                is not None
                else default
                for s, _ in merged
            )
        for key in spec.global_names:
            v = resolve_chain(key, (slice_params, cfg.parameters), out_name, t)
            if v is not None:
                values[key] = v
        p = validated_params(spec, values, out_name, param_cache, bad_params)
        if p is None:
            return
        jobs.append(
            TensorJob(
                out_name,
                first.shape,
                out_dtype_code(cfg, spec, first.dtype),
                inputs=tuple(i for _, i in merged),
                base=base_info if takes_base else None,
                params=p,
            )
        )

    def outside(
        which: str,
        sources: list[_Source],
        slice_base: Checkpoint | None,
        params: Mapping[str, ParamValue],
    ) -> None:
        ref = sources[0]
        for name in ref.stack.outside:
            is_pre = any(k in name.lower() for k in _PRE)
            if (which == "pre") != is_pre:
                continue
            base_info = None
            if takes_base and slice_base is not None:
                base_info = slice_base.tensors.get(name)
                if base_info is None:
                    problems.append(
                        f"tensor {name!r} is missing from the base model {slice_base.label}"
                    )
                    continue
            add(name, [(s, name) for s in sources], base_info, params, 0.0)

    outside("pre", first_sources, resolved[0][1], slices[0].parameters)
    k = 0
    for (sources, _slice_base), sl in zip(resolved, slices):
        n = sources[0].end - sources[0].start
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            lead = sources[0]
            rests = lead.stack.layers.get(lead.start + j, ())
            for s in sources[1:]:
                if set(s.stack.layers.get(s.start + j, ())) != set(rests):
                    problems.append(
                        f"layer {s.start + j} of {s.ck.label} and layer {lead.start + j} of "
                        f"{lead.ck.label} hold different tensors; they cannot be merged"
                    )
            base_src = next((s for s in sources if s.is_base), None)
            for rest in rests:
                base_info = None
                if takes_base and base_src is not None:
                    base_info = base_src.ck.tensors.get(
                        base_src.stack.name(base_src.start + j, rest)
                    )
                add(
                    out_stack.name(k, rest),
                    [(s, s.stack.name(s.start + j, rest)) for s in sources],
                    base_info,
                    sl.parameters,
                    t,
                )
            layer_sources.append(lead.start + j)
            k += 1
    outside("post", resolved[-1][0], resolved[-1][1], slices[-1].parameters)

    problems += parameter_problems(filter_counts, shadowed, bad_params)
    if cfg.compute == "exact":
        problems += exact_problems(spec, jobs)
    if not bad_params:
        problems += prepass_problems(spec, jobs)
    if problems:
        raise PlanError(list(dict.fromkeys(problems)))

    used: list[Checkpoint] = []
    for sources, _ in resolved:
        for s in sources:
            if not any(s.ck is u for u in used) and not (spec.needs_base and s.is_base):
                used.append(s.ck)
    shards = layout_shards([OutputTensor(j.name, j.out_dtype, j.shape) for j in jobs], shard_limit)
    carry = carry_source(cfg, base_ck, [s.ck for s in first_sources])
    check_tokenizer_source(cfg, carry)
    updates = {} if whole else _config_updates(_read_config(carry), layer_sources)
    notes = (
        [n for ck in opened.values() for n in ck.notes]
        + ignored_parameter_notes(cfg, spec)
        + cfg.recipe_notes()
        + prepass_notes(spec, jobs)
    )
    k = 0
    for i, (sources, _) in enumerate(resolved):
        n = sources[0].end - sources[0].start
        srcs = "; ".join(f"{s.ck.label} layers {s.start}..{s.end - 1}" for s in sources)
        notes.append(f"slice {i}: output layers {k}..{k + n - 1} <- {srcs}")
        k += n
    if updates:
        notes.append(
            "config.json: "
            + ", ".join(
                f"{key} = {v if key != 'layer_types' else '[...]'}" for key, v in updates.items()
            )
        )
    return MergePlan(
        config=cfg,
        method=spec,
        models=tuple(used),
        base=base_ck,
        jobs=tuple(jobs),
        shards=tuple(shards),
        chunk_elems=chunk_elems,
        carry_from=carry,
        filter_counts=filter_counts,
        notes=tuple(notes),
        config_updates=updates,
        carry_files=carried_files(carry) if carry is not None else {},
    )
