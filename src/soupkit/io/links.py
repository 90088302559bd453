"""The one rule for files found inside a model folder: names, symlinks and where they lead.

Every file soupkit takes from a model folder by name (``model.safetensors``, the index, every
shard the index names, the one ``*.safetensors`` or pickle file of a folder, and the config and
tokenizer files carried to the output) goes through `resolve_model_file`. A path the user gives
directly (``soupkit inspect ./x.safetensors``) is the user's choice and is not subject to it.
"""

from __future__ import annotations

import os
from pathlib import Path

from soupkit.errors import CheckpointFormatError, shown

__all__ = ["resolve_model_file", "snapshot_blobs"]


def snapshot_blobs(folder: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face cache repository ``folder`` is a snapshot of.

    A hub cache keeps ``<cache>/models--org--name/snapshots/<revision>/<file>`` as symlinks to
    ``../../blobs/<hash>``. ``folder`` (resolved) is a snapshot when it is
    ``<repo>/snapshots/<revision>`` or a folder below one, and ``<repo>/blobs`` is a real folder.

    Returns:
        The resolved ``<repo>/blobs``, or None when ``folder`` is not inside a snapshot.
    """
    real = folder.resolve()
    for up in real.parents:  # nearest first; `real` is below it, so it is a snapshot (or in one)
        if up.name == "snapshots":
            blobs = up.parent / "blobs"
            return blobs if blobs.is_dir() and not blobs.is_symlink() else None
    return None


def resolve_model_file(folder: Path, name: str, *, what: str = "file") -> Path | None:
    """Find the file ``name`` of model folder ``folder``, following links only where allowed.

    The rule (SECURITY.md, "Links"): ``name`` is a relative path with no ``..`` part, no NUL
    byte and not empty. If it (or a folder on the way) is a symbolic link, it is followed only
    when its final target stays inside ``folder`` (after resolving ``folder`` itself), or when
    ``folder`` is a snapshot of a Hugging Face cache (see `snapshot_blobs`) and the target lies
    in that same cache repository's ``blobs/``. Anything else (a link out of the folder, a loop,
    a link to nothing) is an error, never silently skipped.

    Args:
        folder: the model folder.
        name: the file's name as the folder's convention or its index gives it.
        what: how messages call the file (``"shard"``, ``"carried file"``, ...).

    Returns:
        ``folder / name`` when no link was followed inside the folder, else the resolved
        target (no symlinks left, so the file opened later is the one checked); None when
        ``folder`` has no entry of that name.

    Raises:
        CheckpointFormatError: the name is not a plain relative name, or a link leads outside
            what the rule allows, loops, or points to nothing.
    """
    if not name or "\x00" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointFormatError(
            f"{shown(folder)}: {what} name {shown(name, quote=True)} is not a plain name inside the "
            "model folder\nhint: names must be relative, without '..'; a hostile index may try to "
            "read other files"
        )
    path = folder / name
    try:
        if not os.path.lexists(path):
            return None
        target = path.resolve(strict=True)
        root = folder.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointFormatError(
            f"{shown(path)}: is a symbolic link to {shown(os.readlink(path), quote=True)}, which does "
            "not exist\nhint: the folder is incomplete (an interrupted download?)"
        ) from None
    except (OSError, RuntimeError) as e:  # a loop, a name too long, permissions
        raise CheckpointFormatError(
            f"{shown(path)}: cannot follow ({getattr(e, 'strerror', None) or 'symlink loop'})"
        ) from None
    if target == root or root in target.parents:
        # no link on the way: the path as the caller named it (messages and reports keep it)
        return path if target.relative_to(root) == Path(os.path.normpath(name)) else target
    blobs = snapshot_blobs(folder)
    if blobs is not None and blobs in target.parents:
        return target
    raise CheckpointFormatError(
        f"{shown(path)}: {what} is a symbolic link that leads outside the model folder (to "
        f"{shown(target)})\nhint: a link is followed only if its target stays inside the model "
        "folder, or the folder is a Hugging Face cache snapshot and the target is in that cache's "
        "blobs/; copy the file into the folder if you trust it"
    )
