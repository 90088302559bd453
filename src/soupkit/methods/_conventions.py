"""Parameter models shared by the task-vector methods, and the convention presets.

The same method name means different arithmetic in the paper, in mergekit and in PEFT (see
STYLE.md, anti-pattern 5). A recipe is written in mergekit's schema, so a method that mergekit
defines means mergekit's arithmetic by default (``convention: mergekit``), in recipes and in the
Python API alike. Every place where the anchors differ is a named switch, and
``convention: paper | mergekit | peft`` sets all switches of a method at once to reproduce that
anchor. A switch given explicitly wins over the preset.

mergekit's own keys are accepted with mergekit's meaning: ``lambda`` (the scale of the merged
task vector) and ``normalize`` (divide by the summed weights); ``rescale: true/false`` maps
to ``density``/``none``; ``int8_mask`` (a memory option) has no effect on the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from soupkit.methods._ops import Aggregation, SignSource, SignTie
from soupkit.methods._spec import Params

__all__ = [
    "DEFAULT_CONVENTION",
    "ConsensusParams",
    "Convention",
    "Density",
    "PresetParams",
    "TaskVectorParams",
    "Weight",
    "describe_convention",
]

Convention = Literal["paper", "mergekit", "peft"]
DEFAULT_CONVENTION: Convention = "mergekit"
Density = Annotated[float, Field(gt=0, le=1)]
Weight = float


class TaskVectorParams(Params):
    """Parameters every task-vector method takes.

    Attributes:
        weight: per model, the weight w_i of its task vector (default 1.0).
        lambda_: recipe key ``lambda``: scale of the merged task vector (default 1.0).
        int8_mask: mergekit's memory option (store its sign masks as int8). Accepted so that
            mergekit recipes run unchanged; it cannot change a result, and soupkit's masks are
            boolean anyway.
    """

    model_config = ConfigDict(populate_by_name=True)
    per_model: ClassVar[Mapping[str, Any]] = {"weight": 1.0}

    weight: tuple[Weight, ...]
    lambda_: float = Field(1.0, alias="lambda")
    int8_mask: bool = False


class PresetParams(TaskVectorParams):
    """A task-vector method with convention switches and ``convention`` presets.

    Subclasses fill ``presets``: convention name -> switch values. Before validation, every
    switch the recipe did not set is taken from the chosen preset (default: ``mergekit``).
    """

    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    bool_rescale: ClassVar[Mapping[bool, str]] = {}
    convention: Convention = DEFAULT_CONVENTION

    @model_validator(mode="before")
    @classmethod
    def _apply_convention(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        conv = data.get("convention", DEFAULT_CONVENTION)
        if isinstance(conv, str) and conv in ("paper", "mergekit", "peft"):
            if conv not in cls.presets:
                known = ", ".join(sorted(cls.presets))
                raise ValueError(
                    f"convention {conv!r} is not defined for this method "
                    f"(it has no counterpart there); use one of: {known}"
                )
            _normalize_alias(cls, data)
            for key, value in cls.presets[conv].items():
                data.setdefault(key, value)
        if isinstance(data.get("rescale"), bool) and cls.bool_rescale:
            # mergekit's `rescale: true` is its L1 rescale; under another convention, that one's
            data["rescale"] = (
                "l1"
                if data["rescale"] and conv == "mergekit"
                else cls.bool_rescale[data["rescale"]]
            )
        return data


def _normalize_alias(cls: type[PresetParams], data: dict[str, Any]) -> None:
    """mergekit's ``normalize`` on a consensus method selects the aggregation."""
    if not issubclass(cls, ConsensusParams) or data.get("normalize") is None:
        return
    implied = "weighted_mean" if data["normalize"] else "sum"
    given = data.get("aggregation")
    if given is not None and given != implied:
        raise ValueError(
            f"normalize: {str(data['normalize']).lower()} means aggregation "
            f"{implied!r} (mergekit's meaning) but aggregation is {given!r}; "
            "set only one of them"
        )
    data["aggregation"] = implied


class ConsensusParams(PresetParams):
    """Switches of the TIES sign election and disjoint merge.

    Attributes:
        sign_source: what votes for the elected sign: ``unweighted`` trimmed deltas (paper,
            PEFT ``total``), ``weighted`` ones ``w_i * delta_i`` (mergekit), or the ``count``
            of signs (PEFT ``frequency``, mergekit ``count``).
        sign_tie: the elected sign where the vote sums to exactly 0: ``zero`` (paper, sgn(0)=0,
            the merged entry is 0) or ``positive`` (PEFT, mergekit).
        aggregation: how agreeing entries combine: ``mean`` divides by how many agree (paper,
            PEFT), ``weighted_mean`` by their summed weights (mergekit ``normalize: true``),
            ``sum`` not at all (mergekit ``normalize: false``).
        normalize: mergekit's key; ``true`` means ``aggregation: weighted_mean``, ``false``
            means ``aggregation: sum``. Leave unset to use ``aggregation``.
    """

    sign_source: SignSource = "weighted"
    sign_tie: SignTie = "positive"
    aggregation: Aggregation = "weighted_mean"
    normalize: bool | None = None


def describe_convention(params: Any) -> str | None:
    """One line for ``soupkit plan``: the convention a method's parameters use, and what each
    other convention would change (None for a method without conventions)."""
    if not isinstance(params, PresetParams):
        return None
    cls = type(params)
    used = params.convention
    origin = "the default" if "convention" not in params.model_fields_set else "set in the recipe"
    others = []
    for conv, values in cls.presets.items():
        if conv == used:
            continue
        diff = [f"{k}={v}" for k, v in values.items() if getattr(params, k) != v]
        others.append(
            f"`convention: {conv}` would set " + (", ".join(diff) if diff else "nothing different")
        )
    own = [
        f"{k}={getattr(params, k)}"
        for k, v in cls.presets.get(used, {}).items()
        if getattr(params, k) != v
    ]
    explicit = f" overridden by {', '.join(own)}" if own else ""
    return f"{used} ({origin}){explicit}; " + "; ".join(others)
