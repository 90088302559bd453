"""The one rule for symbolic links inside a model folder.

A model folder may hold links (the Hugging Face cache is made of them), but a link must not
let a hostile folder or index read files elsewhere on the machine. `resolve_model_file` is the
rule, applied to every file soupkit reads from a model folder by name (index shards, carried
config and tokenizer files):

1. The path, with every link along it resolved, must name a file inside the model folder
   (itself resolved), or
2. the model folder is a snapshot of a Hugging Face cache (it is, or lies under,
   ``<cache>/models--<owner>--<name>/snapshots/<revision>/``) and the resolved path is inside
   that same repository's ``<cache>/models--<owner>--<name>/blobs/``: the layout
   ``huggingface_hub`` writes, whose snapshot files are links to ``../../blobs/<etag>``.

Anything else (a link to another folder, to another repository's blobs, a link loop, a dangling
link) is refused with the reason. SECURITY.md states the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path

from soupkit.errors import CheckpointFormatError

__all__ = ["cache_blobs_folder", "resolve_model_file"]


def cache_blobs_folder(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face cache repository that ``folder`` (resolved) is
    a snapshot of, or lies inside a snapshot of; None when it is not in such a snapshot."""
    for a in (folder, *folder.parents):
        snapshots = a.parent
        if a != snapshots and snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
            return snapshots.parent / "blobs"
    return None


def _within(child: Path, root: Path) -> bool:
    try:
        child.relative_to(root)
    except ValueError:
        return False
    return True


def resolve_model_file(folder: str | os.PathLike[str], child: str | os.PathLike[str]) -> Path:
    """Resolve ``child``, a file named inside model folder ``folder``, by the link rule.

    Args:
        folder: the model folder.
        child: a path inside it (e.g. ``folder / "model-00001-of-00002.safetensors"``).

    Returns:
        The resolved path (every link followed); it may not exist (callers check).

    Raises:
        CheckpointFormatError: the path leaves the folder (see the module docstring for the
            rule), or cannot be resolved (a link loop, a NUL byte, a name too long); the
            message says why.
    """
    c = Path(child)
    try:
        root = Path(folder).resolve()
        target = c.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte, name too long
        raise CheckpointFormatError(f"{c}: cannot resolve the path ({e})") from None
    if _within(target, root):
        return target
    blobs = cache_blobs_folder(root)
    if blobs is not None and _within(target, blobs):
        return target
    where = f"the model folder {root}" + (f" or the cache's {blobs}" if blobs is not None else "")
    raise CheckpointFormatError(
        f"{c}: leads to {target}, outside {where}\n"
        "hint: soupkit follows a link only to a file inside the model folder, or, in a Hugging "
        "Face cache snapshot, into that repository's blobs/ (see SECURITY.md)"
    )
