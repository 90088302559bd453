"""``soupkit merge RECIPE OUT_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soupkit._util.format import human_bytes, human_seconds
from soupkit.api.merging import merge
from soupkit.cli._common import (
    add_compute_flag,
    add_key_map_flags,
    add_output_flags,
    add_safety_flags,
    command,
    key_map_from,
    progress_flag,
    safety_kwargs,
)
from soupkit.errors import SoupError, shown


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "merge",
        "merge the checkpoints a YAML recipe names into OUT_DIR",
        """
        soupkit merge recipe.yaml ./merged
        soupkit merge recipe.yaml ./merged --force --max-shard-size 2GB
        soupkit merge recipe.yaml ./merged --compute exact  # mergekit 0.1.5's bits in the recipe's dtype
        soupkit merge recipe.yaml ./merged --resume      # continue after an interrupt
        soupkit merge recipe.yaml ./merged --allow-pickle # inputs saved with torch.save (.bin/.pt/.ckpt)
        soupkit merge recipe.yaml ./merged --allow-pickle --strip-prefix model.  # Lightning .ckpt files
    """,
    )
    p.add_argument(
        "recipe",
        type=Path,
        help="YAML recipe (mergekit schema: merge_method, models, base_model, parameters, ...)",
    )
    p.add_argument("out", help="output folder (Hugging Face layout)")
    add_compute_flag(p)
    add_output_flags(p)
    add_safety_flags(p)
    add_key_map_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        r = merge(
            args.recipe,
            args.out,
            force=args.force,
            progress=progress_flag(args),
            max_shard_size=args.max_shard_size,
            key_map=key_map_from(args),
            compute=args.compute,
            **safety_kwargs(args),
        )
    except (KeyboardInterrupt, SoupError):
        if args.resume:
            print(
                f"note: the finished shards were kept; run the same command with --resume to "
                f"continue {args.out}",
                file=sys.stderr,
            )
        raise
    s = r.stats
    rate = s.bytes_read / s.seconds / 1e9 if s.seconds > 0 else float("inf")
    print(
        f"merged {s.tensors} tensors with {r.plan.method.name} into {r.out}: read "
        f"{human_bytes(s.bytes_read)}, wrote {human_bytes(s.bytes_written)} in "
        f"{human_seconds(s.seconds)} ({rate:.2f} GB/s)"
    )
    for n in r.plan.notes:
        print(f"note: {shown(n, limit=2000)}")
    if s.skipped:
        print(
            f"note: resumed: {s.skipped} tensor(s) in shards finished by an earlier run were "
            "verified by sha256 and not computed again"
        )
    if s.nonfinite:
        listed = ", ".join(shown(n) for n in s.nonfinite[:10]) + (
            f" and {len(s.nonfinite) - 10} more" if len(s.nonfinite) > 10 else ""
        )
        print(
            f"warning: {len(s.nonfinite)} tensor(s) hold NaN or Inf (written because of "
            f"--allow-nonfinite): {listed}",
            file=sys.stderr,
        )
    return 0
