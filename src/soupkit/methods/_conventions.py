"""Parameter models shared by the task-vector methods, and the convention presets.

The same method name means different arithmetic in the paper, in mergekit and in PEFT (see
STYLE.md, anti-pattern 5). soupkit's defaults follow the paper; every place where the anchors
differ is a named switch, and ``convention: paper | mergekit | peft`` sets all switches of a
method at once to reproduce that anchor. A switch given explicitly wins over the preset.

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
    "ConsensusParams",
    "Convention",
    "Density",
    "PresetParams",
    "TaskVectorParams",
    "Weight",
]

Convention = Literal["paper", "mergekit", "peft"]
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
    switch the recipe did not set is taken from the chosen preset.
    """

    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    bool_rescale: ClassVar[Mapping[bool, str]] = {}
    convention: Convention = "paper"

    @model_validator(mode="before")
    @classmethod
    def _apply_convention(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        conv = data.get("convention", "paper")
        if isinstance(conv, str) and conv in ("paper", "mergekit", "peft"):
            if conv not in cls.presets:
                known = ", ".join(sorted(cls.presets))
                raise ValueError(f"convention {conv!r} is not defined for this method "
                                 f"(it has no counterpart there); use one of: {known}")
            _normalize_alias(cls, data)
            for key, value in cls.presets[conv].items():
                data.setdefault(key, value)
        if isinstance(data.get("rescale"), bool) and cls.bool_rescale:
            data["rescale"] = cls.bool_rescale[data["rescale"]]
        return data


def _normalize_alias(cls: type[PresetParams], data: dict[str, Any]) -> None:
    """mergekit's ``normalize`` on a consensus method selects the aggregation."""
    if not issubclass(cls, ConsensusParams) or data.get("normalize") is None:
        return
    implied = "weighted_mean" if data["normalize"] else "sum"
    given = data.get("aggregation")
    if given is not None and given != implied:
        raise ValueError(f"normalize: {str(data['normalize']).lower()} means aggregation "
                         f"{implied!r} (mergekit's meaning) but aggregation is {given!r}; "
                         "set only one of them")
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

    sign_source: SignSource = "unweighted"
    sign_tie: SignTie = "zero"
    aggregation: Aggregation = "mean"
    normalize: bool | None = None
