"""The files carried beside the weights: which ones, and ``config.json`` as it is rewritten.

A merge copies the config and tokenizer files of one input folder (`carried_files` checks
their links and sizes); a LoRA fold takes each file from the first folder that has it
(`first_carried`). A merge's ``config.json`` is rewritten with the dtype the tensors are
written in and the plan's updates (a sliced model's layer count): `updated_config`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soupkit.errors import CheckpointFormatError
from soupkit.io.folder import CARRY_FILES, carried_files

__all__ = ["first_carried", "update_config", "updated_config"]


def update_config(path: Any, data: bytes, updates: Mapping[str, Any]) -> bytes:
    """``config.json`` bytes with ``updates`` applied (keys kept in order, new ones appended).

    Raises:
        CheckpointFormatError: the file is not a JSON object.
    """
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise CheckpointFormatError(
            f"{path}: not valid JSON (nested too deeply), so its layer count cannot be updated"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointFormatError(
            f"{path}: not valid JSON ({e}), so its layer count cannot be "
            "updated\nhint: fix the file or give another tokenizer_source"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    obj.update(updates)
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def updated_config(
    src: Path, data: bytes, updates: Mapping[str, Any], written_dtype: str | None
) -> bytes:
    """The carried ``config.json`` with ``updates`` (e.g. a sliced model's layer count) and
    ``torch_dtype`` (and ``dtype``, if the file has that newer key) naming the dtype the
    tensors are written in, so ``transformers`` with ``dtype="auto"`` loads what was written."""
    todo = dict(updates)
    if written_dtype is not None:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):  # carried as it is
            obj = None
        if isinstance(obj, dict):
            for key in ("torch_dtype", "dtype"):
                if (key == "torch_dtype" or key in obj) and obj.get(key) != written_dtype:
                    todo[key] = written_dtype
    return update_config(src, data, todo) if todo else data


def first_carried(folders: Sequence[Path | None]) -> dict[str, Path]:
    """Each carried file name (`CARRY_FILES` order) from the first folder that has it."""
    found = [carried_files(folder) for folder in folders if folder is not None]  # links, sizes
    out: dict[str, Path] = {}
    for name in CARRY_FILES:
        src = next((files[name] for files in found if name in files), None)
        if src is not None:
            out[name] = src
    return out
