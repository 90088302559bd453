"""mergekit's ``model+adapter`` paths: a base model with a PEFT LoRA adapter folded into it.

A recipe may name ``./base+./lora`` (mergekit: ``org/model+org/adapter``) wherever it names a
model: the model is the base with the adapter folded in, ``W + scale * B @ A`` per adapted
module. As mergekit does (its ``--lora-merge-cache``), the folded model is written once into a
cache folder and read from there: `soupkit.adapters.lora.fold_lora` streams it tensor by tensor (memory:
one base tensor plus that module's factors), so the result is exactly ``soupkit lora fold``'s.
The cache key holds both paths, the sha256 of every adapter file (adapters are small, and a
retrained one has the same size; its old modification time can come with it, from ``cp -p`` or
``rsync -t``), the resolved path, size, modification and change times of every model file (any
write moves the change time, which ordinary programs cannot set back; no device or inode
number, which a remount can change), and the rounding: an edited adapter or model is folded
again, and the same files after a remount find their fold.

Rounding: the default mode folds in float32 and rounds once (``soupkit lora fold``'s default);
exact mode (``compute: exact``) folds as PEFT's ``merge_and_unload`` does on CPU, which is what
mergekit runs (``rounding="peft"``; identical for float32 weights).

Only local paths: soupkit does not download, so a Hub id on either side gets the usual hint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from soupkit.adapters.lora import fold_lora
from soupkit.errors import CheckpointFormatError
from soupkit.io.checkpoint import Checkpoint, open_checkpoint
from soupkit.io.digest import sha256_file
from soupkit.planning.from_recipe import open_path
from soupkit.recipe.schema import MergeConfig

__all__ = [
    "CACHE_ENV",
    "fold_cache_dir",
    "open_model",
    "resolve_model_adapter",
    "split_model_adapter",
]

CACHE_ENV = "SOUPKIT_LORA_CACHE"


def fold_cache_dir() -> Path:
    """Where folded ``model+adapter`` inputs are kept: ``$SOUPKIT_LORA_CACHE``, else
    ``$XDG_CACHE_HOME/soupkit/lora`` (``~/.cache/soupkit/lora``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "soupkit" / "lora"


def split_model_adapter(path: str, resolve: Callable[[str], str]) -> tuple[str, str] | None:
    """``(model, adapter)`` when ``path`` is ``model+adapter`` (and not itself an existing path),
    else None. The split is at the first ``+`` whose left side exists (paths may contain ``+``)."""
    if "+" not in path or os.path.exists(resolve(path)):
        return None
    for i, ch in enumerate(path):
        if ch == "+" and os.path.exists(resolve(path[:i])):
            return path[:i], path[i + 1 :]
    i = path.index("+")
    return path[:i], path[i + 1 :]


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _content(path: Path) -> str:
    """The adapter's files by content (their sha256)."""
    return ";".join(
        f"{p.relative_to(path) if p != path else p.name}:{sha256_file(p)}" for p in _files(path)
    )


def _state(path: Path) -> str:
    """The model's files by resolved path, size, modification and change times."""
    out = []
    for p in _files(path):
        st = p.stat()
        out.append(f"{os.path.realpath(p)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}")
    return ";".join(out)


def resolve_model_adapter(
    model: str,
    adapter: str,
    resolve: Callable[[str], str],
    *,
    exact: bool,
    allow_pickle: bool = False,
) -> tuple[Path, str]:
    """Fold ``adapter`` into ``model`` (cached) and return the folded folder and a note for the plan.

    Raises:
        CheckpointFormatError: either side is missing or unreadable (names it).
        PlanError: the adapter does not fit the model.
    """
    m, a = Path(resolve(model)), Path(resolve(adapter))
    for side, p in (("model", m), ("adapter", a)):
        if not p.exists():
            hint = (
                " (a Hub id inside `model+adapter` is not resolved yet, unlike a model given "
                f"alone: fetch it once with `hf download {p}` and give its snapshot folder)"
                if str(p).count("/") == 1 and not str(p).startswith((".", "/"))
                else ""
            )
            raise CheckpointFormatError(
                f"{model}+{adapter}: the {side} {str(p)!r} does not exist{hint}"
            )
    rounding: Literal["fp32", "peft"] = "peft" if exact else "fp32"
    key = hashlib.sha256(
        "\n".join([str(m.resolve()), _state(m), str(a.resolve()), _content(a), rounding]).encode()
    ).hexdigest()[:24]
    dest = fold_cache_dir() / f"{m.name}+{a.name}-{key}"
    if (
        not (dest / "model.safetensors").is_file()
        and not (dest / "model.safetensors.index.json").is_file()
    ):
        fold_lora(
            a, m, dest, rounding=rounding, force=True, progress=False, allow_pickle=allow_pickle
        )
        how = "folded"
    else:
        how = "taken from the cache"
    note = (
        f"{model}+{adapter}: the adapter is folded into the model (W + scale * B @ A, "
        f"{'PEFT' if exact else 'float32'} rounding), {how}: {dest}"
    )
    return dest, note


def open_model(cfg: MergeConfig, path: str, *, allow_pickle: bool = False) -> Checkpoint:
    """`open_checkpoint` for a recipe's model path, ``model+adapter`` included (folded, cached;
    the checkpoint's notes say so)."""
    split = split_model_adapter(path, cfg.resolve_model_path)
    if split is None:
        return open_path(cfg, path, allow_pickle=allow_pickle)
    folded, note = resolve_model_adapter(
        *split, cfg.resolve_model_path, exact=cfg.compute == "exact", allow_pickle=allow_pickle
    )
    ck = open_checkpoint(folded, label=path)
    return dataclasses.replace(ck, notes=(*ck.notes, note))
