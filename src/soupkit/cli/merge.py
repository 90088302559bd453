"""``soupkit merge RECIPE OUT_DIR``."""

from __future__ import annotations

import argparse

from soupkit._format import human_bytes, human_seconds
from soupkit.api import merge
from soupkit.cli._common import add_output_flags, command, progress_flag


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(sub, "merge", "merge the checkpoints a YAML recipe names into OUT_DIR", """
        soupkit merge recipe.yaml ./merged
        soupkit merge recipe.yaml ./merged --force --max-shard-size 2GB
    """)
    p.add_argument("recipe", help="YAML recipe (mergekit schema: merge_method, models, base_model, parameters, ...)")
    p.add_argument("out", help="output folder (Hugging Face layout)")
    add_output_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    r = merge(args.recipe, args.out, force=args.force, progress=progress_flag(args),
              max_shard_size=args.max_shard_size)
    s = r.stats
    rate = s.bytes_read / s.seconds / 1e9 if s.seconds > 0 else float("inf")
    print(f"merged {s.tensors} tensors with {r.plan.method.name} into {r.out}: read "
          f"{human_bytes(s.bytes_read)}, wrote {human_bytes(s.bytes_written)} in "
          f"{human_seconds(s.seconds)} ({rate:.2f} GB/s)")
    for n in r.plan.notes:
        print(f"note: {n}")
    return 0
