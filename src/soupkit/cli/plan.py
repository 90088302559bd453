"""``soupkit plan RECIPE``: a dry run from headers only."""

from __future__ import annotations

import argparse
from pathlib import Path

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit.api.merging import plan
from soupkit.cli._common import (
    add_compute_flag,
    add_key_map_flags,
    add_pickle_flag,
    command,
    key_map_from,
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "plan",
        "dry run: show what a merge would do, from headers only",
        """
        soupkit plan recipe.yaml
        soupkit plan recipe.yaml --all
        soupkit plan recipe.yaml --compute exact
    """,
    )
    p.add_argument("recipe", type=Path, help="YAML recipe")
    p.add_argument(
        "--max-shard-size", default=MAX_SHARD_SIZE, metavar="SIZE", help="largest output shard"
    )
    p.add_argument("--all", action="store_true", help="list every tensor, not only the first 40")
    add_compute_flag(p)
    add_key_map_flags(p)
    add_pickle_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pl = plan(
        args.recipe,
        max_shard_size=args.max_shard_size,
        key_map=key_map_from(args),
        allow_pickle=args.allow_pickle,
        compute=args.compute,
    )
    print(pl.describe(max_rows=len(pl.jobs) if args.all else 40))
    return 0
