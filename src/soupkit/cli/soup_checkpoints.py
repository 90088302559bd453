"""``soupkit soup-checkpoints RUN_DIR OUT_DIR --last N``: average a run's last checkpoints."""

from __future__ import annotations

import argparse

from soupkit._util.format import human_seconds
from soupkit.api.merging import soup_checkpoints
from soupkit.cli._common import add_output_flags, add_pickle_flag, command, progress_flag


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "soup-checkpoints",
        "average the last N checkpoints of one training run",
        """
        soupkit soup-checkpoints runs/ft --last 5 ./soup
        soupkit soup-checkpoints runs/ft --last 3 --weights 1,2,3 ./soup
        soupkit soup-checkpoints runs/ft --pattern 'step_*.safetensors' ./soup
    """,
    )
    p.add_argument("run_dir", help="training output folder holding checkpoint-STEP entries")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--last",
        type=int,
        default=None,
        metavar="N",
        help="average the last N checkpoints (default: all)",
    )
    p.add_argument(
        "--pattern", default="checkpoint-*", help="glob for checkpoints (default: checkpoint-*)"
    )
    p.add_argument("--weights", default=None, help="comma-separated weights, oldest first")
    p.add_argument("--out-dtype", choices=["float32", "float16", "bfloat16"], default=None)
    add_output_flags(p)
    add_pickle_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            from soupkit.errors import UsageError

            raise UsageError(
                f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 1,2,3"
            ) from None
    r = soup_checkpoints(
        args.run_dir,
        args.out,
        last=args.last,
        pattern=args.pattern,
        weights=weights,
        out_dtype=args.out_dtype,
        force=args.force,
        progress=progress_flag(args),
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
    )
    names = ", ".join(m.label for m in r.plan.models)
    print(
        f"averaged {len(r.plan.models)} checkpoint(s) ({names}) into {r.out} in {human_seconds(r.stats.seconds)}"
    )
    return 0
