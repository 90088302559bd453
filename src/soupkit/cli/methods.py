"""``soupkit methods``: the registered merge methods."""

from __future__ import annotations

import argparse

from soupkit import methods
from soupkit.cli._common import command


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "methods",
        "list the merge methods with their parameters and papers",
        """
        soupkit methods
    """,
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for spec in methods.all_methods():
        tags = [spec.kind.replace("_", "-")]
        if spec.needs_base:
            tags.append("needs base")
        elif spec.optional_base:
            tags.append("optional base")
        elif spec.base_as_input:
            tags.append("base is one more input")
        if spec.stochastic:
            tags.append("seeded")
        if spec.streams_whole_tensors:
            tags.append("whole tensors")
        elif spec.prepass is not None:
            tags.append("chunks after a pre-pass")
        print(f"{spec.name:<18} {spec.summary}")
        print(
            f"{'':<18} per-model: {', '.join(spec.per_model_names) or '-'}; "
            f"global: {', '.join(spec.global_names) or '-'}; [{', '.join(tags)}]"
        )
        print(f"{'':<18} {spec.paper}")
    return 0
