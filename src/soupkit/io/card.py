"""Hugging Face model cards: the YAML front matter that ties a merge to its inputs.

The Hub reads ``base_model`` from a card's front matter to draw the model tree; for a merge it
is the list of *every* model that went in (the base first), and ``base_model_relation:
merge`` says how the card's model relates to them (the Hub infers it for several bases; it is
written out here so a single-input card, e.g. a folded LoRA, is not mistaken for a fine-tune).
Only names that are Hub ids (``owner/name``) are listed, as mergekit does: a local path such
as ``./ft-a`` is not a valid ``base_model`` and would make the Hub reject the metadata. A
path into the Hugging Face cache (``.../models--owner--name/snapshots/<sha>``) is recognised
as its Hub id. Writing the card never asks the network whether an id exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from soupkit.io.hub import parse_hub_ref

__all__ = ["card_front_matter", "hub_id", "render_card"]

_CACHE = re.compile(
    r"models--([A-Za-z0-9][A-Za-z0-9_.-]*)--([A-Za-z0-9][A-Za-z0-9_.-]*)(?:/snapshots/[0-9a-f]+)?/?$"
)


def hub_id(name: str) -> str | None:
    """The Hub id a model reference names, or None for a plain local path.

    ``"meta-llama/Llama-3.1-8B"`` (or ``...@main``) -> ``"meta-llama/Llama-3.1-8B"``; ``"~/.cache/huggingface/hub/models--org--m/
    snapshots/abc"`` -> ``"org/m"``; ``"./ft-a"``, ``"/data/ft"``, ``"ft-a"`` -> None.
    """
    text = name.strip()
    m = _CACHE.search(text)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    ref = parse_hub_ref(text)  # "owner/name@revision" names the model owner/name
    return ref[0] if ref is not None else None


def card_front_matter(
    inputs: Iterable[str],
    *,
    tags: Sequence[str] = (),
    library_name: str | None = "transformers",
    relation: str | None = "merge",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The front matter of a card for a model made from ``inputs`` (base first).

    Args:
        inputs: every input model reference, as the user wrote it; duplicates are dropped.
        tags: tags after ``merge`` and ``soupkit`` (e.g. the method name).
        library_name: the ``library_name`` field (None: left out).
        relation: ``base_model_relation`` (``merge``; ``adapter`` for a LoRA; None: left out).
        extra: more fields.
    """
    ids = list(dict.fromkeys(i for i in (hub_id(x) for x in inputs) if i is not None))
    front: dict[str, Any] = {}
    if ids:
        front["base_model"] = ids
        if relation:
            front["base_model_relation"] = relation
    if library_name:
        front["library_name"] = library_name
    front["tags"] = list(dict.fromkeys(["merge", "soupkit", *tags]))
    front.update(extra or {})
    return front


def render_card(front: Mapping[str, Any], body: Sequence[str]) -> str:
    """A README.md: ``---`` YAML front matter ``---`` then the body lines."""
    return "\n".join(
        ["---", yaml.safe_dump(dict(front), sort_keys=False).rstrip(), "---", "", *body, ""]
    )
