"""Recipes: the YAML a user writes, validated by pydantic, all problems reported together.

The schema is mergekit's where the meaning is the same, so a mergekit recipe for a method
soupkit supports runs unchanged::

    merge_method: linear
    base_model: ./base            # optional for linear; required by task-vector methods
    models:
      - model: ./ft-a
        parameters: {weight: 0.7}
      - model: ./ft-b
        parameters: {weight: 0.3}
    parameters: {normalize: true} # global parameters (and defaults for per-model ones)
    dtype: float32                # inputs are cast to this before merging (optional)
    out_dtype: bfloat16           # output dtype (default: dtype, else the inputs' dtype)
    seed: 0                       # soupkit: seeds stochastic methods per tensor
    strip_prefix: [module.]       # soupkit: removed from every tensor name that has it
    compute: float32              # soupkit: `exact` computes as mergekit 0.1.5 does, bit for bit

Instead of ``models:``, a recipe may give mergekit's ``slices:`` (layer ranges stacked into a
new model, see `soupkit.planning.slices`)::

    merge_method: passthrough
    slices:
      - sources: [{model: ./a, layer_range: [0, 16]}]
      - sources: [{model: ./b, layer_range: [8, 24]}]

Relative model paths are resolved against the current directory, as mergekit does; a path
that exists only relative to the recipe file's folder is taken from there.
A parameter value is a scalar, a list of numbers (a gradient interpolated across layers), or
a list of ``{filter: SUBSTRING | match: GLOB, value: ...}`` entries where the first entry that
matches a tensor name wins and an entry without ``filter``/``match`` is the fallback.
"""

from __future__ import annotations

import difflib
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from soupkit.errors import ConfigError, shown

__all__ = [
    "Compute",
    "Conditional",
    "DTypeName",
    "MergeConfig",
    "ModelEntry",
    "ParamValue",
    "Slice",
    "SliceSource",
    "load_recipe",
]

DTypeName = Literal["float32", "float16", "bfloat16", "float64"]
# float32: accumulate in float32 (the default, more precise than a bf16 / fp16 recipe dtype);
# exact: compute in the recipe's dtype with mergekit 0.1.5's arithmetic (docs/mergekit.md)
Compute = Literal["float32", "exact"]
Scalar = StrictBool | StrictInt | StrictFloat | StrictStr

# mergekit keys soupkit knows about but does not support yet: refused by name, never ignored.
_MERGEKIT_UNSUPPORTED = {
    "modules": "per-module recipes",
    "tokenizer": "the tokenizer block (vocabulary surgery)",
    "architecture": "architecture overrides",
}


class Conditional(BaseModel):
    """One entry of a conditional parameter list: the value for tensors that match."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: StrictStr | None = None
    match: StrictStr | None = None
    value: Scalar | list[StrictInt | StrictFloat]


ParamValue = Scalar | list[StrictInt | StrictFloat] | list[Conditional]


def _check_values(params: dict[str, ParamValue]) -> dict[str, ParamValue]:
    """Parameter values that mean something: no NaN or infinity, no empty list (which would
    otherwise leave the parameter silently unset)."""
    for key, value in params.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise ValueError(
                f"{key}: an empty list sets nothing; give a number, a gradient of "
                "at least one number, or a list of {filter/match, value} entries"
            )
        for item in items:
            inner = item.value if isinstance(item, Conditional) else item
            for x in inner if isinstance(inner, list) else [inner]:
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(
                        f"{key}: {x} is not a usable value; parameters must be finite numbers"
                    )
            if isinstance(item, Conditional) and isinstance(item.value, list) and not item.value:
                raise ValueError(f"{key}: an entry's value is an empty list, which sets nothing")
    return params


class ModelEntry(BaseModel):
    """One input model and its per-model parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: StrictStr
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    _values = field_validator("parameters")(_check_values)


class SliceSource(BaseModel):
    """One source of a slice: layers ``[start, end)`` of a model (mergekit's ``layer_range``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: StrictStr
    layer_range: tuple[StrictInt, StrictInt]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    _values = field_validator("parameters")(_check_values)


class Slice(BaseModel):
    """One output slice: its sources are merged layer by layer (one source: copied)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SliceSource] = Field(min_length=1)
    base_model: StrictStr | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    _values = field_validator("parameters")(_check_values)


class MergeConfig(BaseModel):
    """A validated recipe (see the module docstring for the format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: StrictStr
    slices: list[Slice] | None = None  # before `models`, so that its validator sees it
    models: list[ModelEntry] = Field(default_factory=list)
    base_model: StrictStr | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    seed: StrictInt = 0
    compute: Compute = "float32"
    tokenizer_source: StrictStr | None = None
    # mergekit's chat template override; accepted, not applied (`recipe_notes` says so)
    chat_template: StrictStr | None = None
    name: StrictStr | None = None
    # soupkit: prefixes removed from every input tensor name that has them (``--strip-prefix``)
    strip_prefix: list[StrictStr] | None = None
    # The folder of the recipe file, when loaded from one (see `resolve_model_path`).
    _recipe_dir: Path | None = PrivateAttr(default=None)

    @field_validator("strip_prefix", mode="before")
    @classmethod
    def _one_prefix_is_a_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("strip_prefix")
    @classmethod
    def _no_empty_prefix(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not p for p in v):
            raise ValueError("a prefix to strip cannot be empty")
        return v

    _values = field_validator("parameters")(_check_values)

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, v: list[ModelEntry], info: ValidationInfo) -> list[ModelEntry]:
        # only an explicit `models: []` gets here (defaults are not validated); fine beside slices
        if not v and not info.data.get("slices"):
            raise ValueError("List should have at least 1 item after validation, not 0")
        return v

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if bool(self.models) == bool(self.slices):
            raise ValueError(
                "give exactly one of `models:` (a list of models to merge) and "
                "`slices:` (layer ranges, see docs/mergekit.md)"
            )
        if self.tokenizer_source == "union":
            raise ValueError(
                "tokenizer_source: 'union' (merging vocabularies) is not supported by "
                "soupkit: it needs the tokenizers' vocabularies merged and every model's "
                "embedding and head rows re-indexed and filled before the merge; use "
                "'base' or a model path when the vocabularies agree (see docs/mergekit.md)"
            )
        return self

    def recipe_notes(self) -> list[str]:
        """What soupkit does differently from mergekit for this recipe's top-level keys."""
        if self.chat_template is None:
            return []
        return [
            f"chat_template: {self.chat_template!r} is not applied: soupkit carries the tokenizer "
            "files (and the chat template in them) unchanged; set the template in "
            "tokenizer_config.json / chat_template.jinja of the tokenizer source if needed"
        ]

    def resolve_model_path(self, path: str) -> str:
        """Where a model path points: relative to the current directory, as mergekit does;
        if nothing is there but the path exists relative to the recipe's folder, that one."""
        if os.path.isabs(path) or os.path.exists(path) or self._recipe_dir is None:
            return path
        beside = self._recipe_dir / path
        return str(beside) if beside.exists() else path

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_none=True)
        if not data.get("models"):
            data.pop("models", None)  # a slices recipe
        return str(yaml.safe_dump(data, sort_keys=False))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _friendly(err: Mapping[str, Any]) -> str | None:
    loc = tuple(err["loc"])
    # pydantic reports every branch of a union; keep the plain location and message.
    # (a tag is "str", "list[...]", "function-after[...]"; a key such as "strip_prefix" is kept)
    loc = tuple(
        p
        for p in loc
        if not (
            isinstance(p, str)
            and (
                "[" in p or p in ("list", "str", "int", "float", "bool") or p.startswith("function")
            )
        )
    )
    if err["type"] == "extra_forbidden":
        # The last element is the user's own key, whatever it looks like ("strength", "int8"):
        # never filter it out as if it were a union-branch tag.
        raw = tuple(err["loc"])
        key = str(raw[-1])
        parent = tuple(p for p in raw[:-1] if p in loc)
        fields: list[str] = []
        if not parent:
            fields = list(MergeConfig.model_fields)
        elif len(parent) == 2 and parent[0] == "models":
            fields = list(ModelEntry.model_fields)
        elif len(parent) == 2 and parent[0] == "slices":
            fields = list(Slice.model_fields)
        elif len(parent) == 4 and parent[0] == "slices" and parent[2] == "sources":
            fields = list(SliceSource.model_fields)
        if parent and parent[0] == "slices" and key == "residual_weight":
            return (
                f"{_loc(parent)}.residual_weight: mergekit key 'residual_weight' is not "
                "supported by soupkit; see docs/mergekit.md"
            )
        if not parent and key in _MERGEKIT_UNSUPPORTED and _MERGEKIT_UNSUPPORTED[key]:
            return (
                f"mergekit key {key!r} ({_MERGEKIT_UNSUPPORTED[key]}) is not supported by "
                "soupkit yet; see docs/mergekit.md"
            )
        close = difflib.get_close_matches(key, fields, n=1)
        hint = (
            f"; did you mean {close[0]!r}?"
            if close
            else (f"; allowed: {', '.join(fields)}" if fields else "")
        )
        return f"{_loc(parent) + '.' if parent else ''}{key}: unknown key{hint}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{_loc(loc)}: {msg}"


# A recipe file larger than this is refused before it is read.
MAX_RECIPE_BYTES = 10_000_000
# A recipe may hold at most this many YAML values (scalars, lists, mappings) once every alias
# (`*a`) and merge key (`<<: *a`) is expanded: counted on the parsed node graph, before anything
# is built, so an alias or merge-key bomb of a few hundred bytes is refused in milliseconds.
MAX_RECIPE_NODES = 1_000_000


class _RecipeLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (no object tags); `_safe_load` bounds the expansion of its aliases."""


def _expanded_nodes(root: yaml.Node, limit: int) -> int:
    """How many nodes ``root`` stands for once aliases and merge keys are expanded.

    Linear in the number of distinct nodes: each node's expanded size is computed once.

    Raises:
        ValueError: the graph is recursive (an alias inside its own anchor), or the count
            passes ``limit`` (counting stops there).
    """
    size: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            if isinstance(node, yaml.SequenceNode):
                n = 1 + sum(size[id(c)] for c in node.value)
            elif isinstance(node, yaml.MappingNode):
                n = 1 + sum(size[id(k)] + size[id(v)] for k, v in node.value)
            else:
                n = 1
            if n > limit:
                raise ValueError(
                    f"more than {limit:,} values once its aliases and merge keys are expanded"
                )
            size[key] = n
            continue
        if key in size:
            continue
        if key in active:
            raise ValueError(
                "an alias refers to the mapping or list that contains it (a recursive structure)"
            )
        active.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((c, False) for c in node.value if id(c) not in size)
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack.extend((c, False) for c in (k, v) if id(c) not in size)
    return size[id(root)]


def _safe_load(text: str, label: str | None) -> Any:
    """``yaml.safe_load`` with the expansion of aliases and merge keys bounded."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            _expanded_nodes(node, MAX_RECIPE_NODES)
        except ValueError as e:
            raise ConfigError(
                [
                    f"recipe refused: {e}; a recipe may hold at most "
                    f"{MAX_RECIPE_NODES:,} values (hint: a few hundred bytes of nested "
                    "aliases can stand for billions of values; write the recipe out)"
                ],
                label,
            ) from None
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_recipe_file(path: Path, label: str) -> str:
    """The text of a recipe file: a regular file of at most `MAX_RECIPE_BYTES`, read once.

    A FIFO, a device (``/dev/zero``), a socket or a folder is refused from ``fstat`` alone,
    without reading a byte (so a FIFO cannot hang and a device cannot fill memory).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(
            [
                f"the recipe file {shown(path, quote=True)} does not exist (looked in "
                f"{shown(os.getcwd())}); hint: check the path, or pass an absolute one"
            ],
            label,
        ) from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ConfigError(
            [f"cannot open the recipe ({getattr(e, 'strerror', None) or e})"], label
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (
            "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise ConfigError(
            [f"the recipe is {kind}, expected a regular YAML file; it was not read"], label
        )
    with open(fd, "rb") as f:
        if st.st_size > MAX_RECIPE_BYTES:
            raise ConfigError(
                [
                    f"recipe is {st.st_size} bytes; recipes over {MAX_RECIPE_BYTES:,} "
                    "bytes are refused"
                ],
                label,
            )
        os.set_blocking(fd, True)
        try:
            raw = f.read(st.st_size + 1)  # bounded even if the file grows meanwhile
        except OSError as e:
            raise ConfigError([f"cannot read the recipe ({e.strerror})"], label) from None
    if len(raw) > st.st_size:
        raise ConfigError(
            ["the recipe file grew while it was read; hint: read it when it is complete"], label
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [f"cannot read the recipe (not UTF-8 text: byte {e.start})"], label
        ) from None


def load_recipe(source: MergeConfig | Mapping[str, Any] | str | os.PathLike[str]) -> MergeConfig:
    """Load and validate a recipe.

    Args:
        source: a `MergeConfig`, a mapping, a path to a YAML file (an `os.PathLike`, or a str of
            one line ending in ``.yaml``, ``.yml`` or ``.json``), or YAML text (any other str).
            The CLI always passes a path. A recipe file must be a regular file of at most
            `MAX_RECIPE_BYTES`; its YAML may expand to at most `MAX_RECIPE_NODES` values.

    Returns:
        The validated `MergeConfig`.

    Raises:
        ConfigError: with every problem found (unknown keys with did-you-mean, wrong types).
    """
    if isinstance(source, MergeConfig):
        return source
    label: str | None = None
    recipe_file: Path | None = None
    data: Any
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        text: str
        one_line = isinstance(source, str) and "\n" not in source
        if isinstance(source, os.PathLike) or (
            one_line and str(source).endswith((".yaml", ".yml", ".json"))
        ):
            label, recipe_file = shown(source), Path(source)
            text = _read_recipe_file(recipe_file, label)
        else:
            text = str(source)
        try:
            data = _safe_load(text, label)
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], label) from None
        except RecursionError:
            raise ConfigError(["YAML nested too deeply"], label) from None
        if one_line and not isinstance(data, dict):
            raise ConfigError(
                [
                    f"{shown(source, quote=True)} is neither a recipe file (a path must "
                    "end in .yaml, .yml or .json; or pass a pathlib.Path) nor the YAML "
                    "text of a recipe (a mapping)"
                ]
            )
    if not isinstance(data, dict):
        raise ConfigError(
            [f"a recipe is a mapping of keys to values, got {type(data).__name__}"], label
        )
    try:
        cfg = MergeConfig.model_validate(data)
        if recipe_file is not None:
            cfg._recipe_dir = recipe_file.resolve().parent
        return cfg
    except ValidationError as e:
        msgs = [m for m in (_friendly(err) for err in e.errors()) if m]
        raise ConfigError(list(dict.fromkeys(msgs)), label) from None
    except RecursionError:
        raise ConfigError(["recipe nested too deeply"], label) from None
