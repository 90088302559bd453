"""mergekit's ``model+adapter`` paths: a base model with a PEFT LoRA adapter folded into it.

A recipe may name ``./base+./lora`` (mergekit: ``org/model+org/adapter``) wherever it names a
model: the model is the base with the adapter folded in, ``W + scale * B @ A`` per adapted
module. As mergekit does (its ``--lora-merge-cache``), the folded model is written once into a
cache folder and read from there: `soupkit.adapters.lora.fold_lora` streams it tensor by tensor (memory:
one base tensor plus that module's factors), so the result is exactly ``soupkit lora fold``'s.
The cache key holds both paths, the identity and state of each of their files (`HashCache.key`:
device, inode, size, modification and change times; the change time moves on any write and no
program can set it back) and the rounding, so an edited adapter is folded again, even one
rewritten with the same size and its old modification time.

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
from soupkit.io.digest import HashCache
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


def _stamp(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(HashCache.key(p) for p in files)


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
        "\n".join([str(m.resolve()), _stamp(m), str(a.resolve()), _stamp(a), rounding]).encode()
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
