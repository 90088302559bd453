"""``soupkit diagnose CKPT CKPT ... [--base B] [--evaluator MOD:FN]``: will these soup?"""

from __future__ import annotations

import argparse
import json

from soupkit.api.diagnostics import diagnose
from soupkit.cli._common import add_key_map_flags, command, key_map_from, progress_flag
from soupkit.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "diagnose",
        "before merging: can these models soup? (architecture, distances, "
        "task-vector cosines, sign conflicts, interpolation barrier)",
        """
        soupkit diagnose ./ft-a ./ft-b --base ./base
        soupkit diagnose ./ft-a ./ft-b --base ./base --evaluator my_eval:score --out ./diagnosis
        soupkit diagnose run1/model.safetensors run2/model.safetensors --json
    """,
    )
    p.add_argument(
        "models", nargs="+", metavar="CKPT", help="the models (files or folders), two or more"
    )
    p.add_argument(
        "--base", default=None, help="their common pretrained model (enables task-vector metrics)"
    )
    p.add_argument(
        "--evaluator",
        default=None,
        metavar="MOD:FN",
        help="'package.module:function' or 'file.py:function', a callable(state_dict) -> float "
        "(higher is better); enables the interpolation curve and barrier",
    )
    p.add_argument(
        "--points", type=int, default=11, help="points on each interpolation path (default 11)"
    )
    p.add_argument(
        "--pairs",
        default=None,
        metavar="I-J,...",
        help="model index pairs to interpolate, e.g. 0-1,0-2 (default: the first with each other)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write diagnosis.json and PNG plots here"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--cosine-threshold",
        type=float,
        default=0.5,
        help="weight cosine below which models count as differently initialised (default 0.5)",
    )
    p.add_argument(
        "--barrier-tolerance",
        type=float,
        default=0.05,
        help="barrier above this fraction of the endpoint score counts as high (default 0.05)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle checkpoints (.bin/.pt/.ckpt), loaded only with torch.load(weights_only=True)",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    add_key_map_flags(p)
    p.set_defaults(func=run)


def _pairs(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    out = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            out.append((int(a), int(b)))
        except ValueError:
            raise UsageError(f"--pairs {text!r}: expected index pairs like 0-1,0-2") from None
        if not sep:
            raise UsageError(f"--pairs {text!r}: expected index pairs like 0-1,0-2")
    return out


def run(args: argparse.Namespace) -> int:
    rep = diagnose(
        args.models,
        args.base,
        evaluator=args.evaluator,
        points=args.points,
        pairs=_pairs(args.pairs),
        out=args.out,
        cosine_threshold=args.cosine_threshold,
        barrier_tolerance=args.barrier_tolerance,
        allow_pickle=args.allow_pickle,
        key_map=key_map_from(args),
        progress=progress_flag(args),
    )
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2))
    else:
        print(rep.summary())
    return 0
