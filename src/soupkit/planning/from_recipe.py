"""From a recipe to a plan: open every checkpoint it names (headers only), then plan.

`plan_recipe` is the one entry from a validated recipe to a `MergePlan`: recipes with mergekit
``slices`` (or a ``passthrough`` of models) go to `soupkit.planning.slices.plan_slices`, every
other one to `soupkit.planning.plan`. The model paths are opened by an `Opener`; planning
itself opens plain paths (`open_path`), and the API layer passes the opener that also folds
``model+adapter`` paths (`soupkit.adapters.model_adapter.open_model`), so that planning
imports nothing above it.
"""

from __future__ import annotations

from soupkit import methods
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit.errors import ConfigError, PlanError, SoupError, UnknownMethodError
from soupkit.io.checkpoint import Checkpoint, open_checkpoint
from soupkit.io.names import KeyMap, rename_checkpoint
from soupkit.planning.plan import (
    DEFAULT_CHUNK_ELEMS,
    MergePlan,
    Opener,
    check_method,
    check_tokenizer_source,
    plan_checked,
)
from soupkit.planning.slices import plan_slices
from soupkit.recipe.schema import MergeConfig

__all__ = ["open_path", "plan_recipe"]


def open_path(cfg: MergeConfig, path: str, *, allow_pickle: bool = False) -> Checkpoint:
    """`open_checkpoint` of a recipe's model path (relative to the recipe's folder)."""
    return open_checkpoint(cfg.resolve_model_path(path), label=path, allow_pickle=allow_pickle)


def _open_all(
    cfg: MergeConfig,
    problems: list[str],
    allow_pickle: bool,
    opener: Opener,
) -> tuple[list[Checkpoint | None], Checkpoint | None]:
    cache: dict[str, Checkpoint | None] = {}

    def get(path: str, where: str) -> Checkpoint | None:
        if path not in cache:
            try:
                cache[path] = opener(cfg, path, allow_pickle=allow_pickle)
            except SoupError as e:
                problems.append(f"{where}: {e}")
                cache[path] = None
        return cache[path]

    base = get(cfg.base_model, "base_model") if cfg.base_model else None
    models = [get(m.model, f"models[{i}]") for i, m in enumerate(cfg.models)]
    return models, base


def plan_recipe(
    cfg: MergeConfig,
    *,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    allow_pickle: bool = False,
    key_map: KeyMap | None = None,
    opener: Opener | None = None,
) -> MergePlan:
    """Open every checkpoint the recipe names (headers only) and plan the merge.

    ``allow_pickle`` accepts PyTorch pickle checkpoints (loaded only with
    ``torch.load(weights_only=True)``); without it they are refused with `UnsafeFormatError`.
    ``key_map`` renames every input's tensors first (`soupkit.io.names.KeyMap`: prefix strips
    and regex renames), after the recipe's own ``strip_prefix:``. ``opener`` opens each model
    path of the recipe (default `open_path`; the API passes one that also folds
    ``model+adapter`` paths, `soupkit.adapters.model_adapter.open_model`). Recipes with mergekit
    ``slices`` are planned by `soupkit.planning.slices.plan_slices`.

    Raises:
        ConfigError: the recipe is inconsistent with its method (unknown parameters, no base).
        PlanError: the checkpoints cannot be merged; lists every problem found.
    """
    problems: list[str] = []
    opener = opener if opener is not None else open_path
    if cfg.strip_prefix:  # the recipe's strips first, then the caller's renames
        key_map = KeyMap(
            KeyMap.build(strip_prefix=cfg.strip_prefix).rules + (key_map.rules if key_map else ())
        )
    if cfg.slices or cfg.merge_method == "passthrough":  # `models:` too, as mergekit plans it
        return plan_slices(
            cfg,
            max_shard_size=max_shard_size,
            chunk_elems=chunk_elems,
            allow_pickle=allow_pickle,
            key_map=key_map,
            opener=opener,
        )
    try:
        spec = methods.get(cfg.merge_method)
    except UnknownMethodError as e:
        raise ConfigError([f"merge_method: {e}"]) from None
    check_method(cfg, spec, has_base=bool(cfg.base_model))
    models, base = _open_all(cfg, problems, allow_pickle, opener)
    if problems:
        raise PlanError(problems)
    if key_map:
        models = [rename_checkpoint(m, key_map) if m is not None else None for m in models]
        base = rename_checkpoint(base, key_map) if base is not None else None
    p = plan_checked(
        cfg,
        spec,
        [m for m in models if m is not None],
        base,
        max_shard_size=max_shard_size,
        chunk_elems=chunk_elems,
    )
    check_tokenizer_source(cfg, p.carry_from)
    return p
