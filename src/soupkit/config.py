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
    compute: float32              # soupkit: `exact` computes as mergekit 0.1.5 does, bit for bit

Instead of ``models:``, a recipe may give mergekit's ``slices:`` (layer ranges stacked into a
new model, see `soupkit.compat.mergekit`)::

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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

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

from soupkit.errors import ConfigError

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
Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]

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
    value: Union[Scalar, list[Union[StrictInt, StrictFloat]]]


ParamValue = Union[Scalar, list[Union[StrictInt, StrictFloat]], list[Conditional]]


class ModelEntry(BaseModel):
    """One input model and its per-model parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: StrictStr
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SliceSource(BaseModel):
    """One source of a slice: layers ``[start, end)`` of a model (mergekit's ``layer_range``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: StrictStr
    layer_range: tuple[StrictInt, StrictInt]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class Slice(BaseModel):
    """One output slice: its sources are merged layer by layer (one source: copied)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SliceSource] = Field(min_length=1)
    base_model: StrictStr | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


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
    # The folder of the recipe file, when loaded from one (see `resolve_model_path`).
    _recipe_dir: Path | None = PrivateAttr(default=None)

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
            raise ValueError("give exactly one of `models:` (a list of models to merge) and "
                             "`slices:` (layer ranges, see docs/mergekit.md)")
        if self.tokenizer_source == "union":
            raise ValueError("tokenizer_source: 'union' (merging vocabularies) is not supported by "
                             "soupkit: it needs the tokenizers' vocabularies merged and every model's "
                             "embedding and head rows re-indexed and filled before the merge; use "
                             "'base' or a model path when the vocabularies agree (see docs/mergekit.md)")
        return self

    def recipe_notes(self) -> list[str]:
        """What soupkit does differently from mergekit for this recipe's top-level keys."""
        if self.chat_template is None:
            return []
        return [f"chat_template: {self.chat_template!r} is not applied: soupkit carries the tokenizer "
                "files (and the chat template in them) unchanged; set the template in "
                "tokenizer_config.json / chat_template.jinja of the tokenizer source if needed"]

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
    loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith(("list", "str", "int", "float", "bool", "function")))))
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
            return (f"{_loc(parent)}.residual_weight: mergekit key 'residual_weight' is not "
                    "supported by soupkit; see docs/mergekit.md")
        if not parent and key in _MERGEKIT_UNSUPPORTED and _MERGEKIT_UNSUPPORTED[key]:
            return (f"mergekit key {key!r} ({_MERGEKIT_UNSUPPORTED[key]}) is not supported by "
                    "soupkit yet; see docs/mergekit.md")
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; allowed: {', '.join(fields)}" if fields else "")
        return f"{_loc(parent) + '.' if parent else ''}{key}: unknown key{hint}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{_loc(loc)}: {msg}"


def load_recipe(source: MergeConfig | Mapping[str, Any] | str | os.PathLike[str]) -> MergeConfig:
    """Load and validate a recipe.

    Args:
        source: a `MergeConfig`, a mapping, a path to a YAML file, or YAML text.

    Returns:
        The validated `MergeConfig`.

    Raises:
        ConfigError: with every problem found (unknown keys with did-you-mean, wrong types).
    """
    if isinstance(source, MergeConfig):
        return source
    label: str | None = None
    data: Any
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        text: str
        if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source
                                               and source.endswith((".yaml", ".yml", ".json"))):
            label = str(source)
            path = Path(source)
            try:
                if path.stat().st_size > 10_000_000:
                    raise ConfigError([f"recipe is {path.stat().st_size} bytes; recipes over 10 MB are refused"], label)
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ConfigError([f"the recipe file {str(path)!r} does not exist (looked in "
                                   f"{os.getcwd()}); hint: check the path, or pass an absolute one"],
                                  label) from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError([f"cannot read the recipe ({e})"], label) from None
        else:
            text = str(source)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {e}"], label) from None
        except RecursionError:
            raise ConfigError(["YAML nested too deeply"], label) from None
    if not isinstance(data, dict):
        raise ConfigError([f"a recipe is a mapping of keys to values, got {type(data).__name__}"], label)
    try:
        cfg = MergeConfig.model_validate(data)
        if label is not None:
            cfg._recipe_dir = Path(label).resolve().parent
        return cfg
    except ValidationError as e:
        msgs = [m for m in (_friendly(err) for err in e.errors()) if m]
        raise ConfigError(list(dict.fromkeys(msgs)), label) from None
    except RecursionError:
        raise ConfigError(["recipe nested too deeply"], label) from None
