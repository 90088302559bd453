"""``soupkit validate RECIPE``: check a recipe and its inputs, report every problem."""

from __future__ import annotations

import argparse
from pathlib import Path

from soupkit.api.merging import plan
from soupkit.cli._common import (
    add_compute_flag,
    add_key_map_flags,
    add_pickle_flag,
    command,
    key_map_from,
)
from soupkit.errors import shown


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "validate",
        "check a recipe and the headers of its inputs; list every problem",
        """
        soupkit validate recipe.yaml && soupkit merge recipe.yaml ./merged
    """,
    )
    p.add_argument("recipe", type=Path, help="YAML recipe")
    add_compute_flag(p)
    add_key_map_flags(p)
    add_pickle_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    pl = plan(
        args.recipe,
        key_map=key_map_from(args),
        compute=args.compute,
        allow_pickle=args.allow_pickle,
    )
    print(
        f"ok: {shown(args.recipe)}: {pl.method.name} over {len(pl.models)} model(s), {len(pl.jobs)} tensors"
    )
    return 0
