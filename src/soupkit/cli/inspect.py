"""``soupkit inspect PATH``: a checkpoint's tensors from headers only."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from soupkit._util.format import human_bytes
from soupkit.cli._common import add_pickle_flag, command
from soupkit.errors import shown
from soupkit.io.checkpoint import open_checkpoint


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "inspect",
        "show a checkpoint's tensors, dtypes, shapes, parameters and size (headers only)",
        """
        soupkit inspect ./model
        soupkit inspect model.safetensors --json
        soupkit inspect org/name@main          # a Hub id: from the cache, else downloaded
    """,
    )
    p.add_argument(
        "path", help="a .safetensors file, a model folder, or a Hub id (org/name[@revision])"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_pickle_flag(p)
    p.add_argument("--max-rows", type=int, default=60, help="tensors to list (default 60; 0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ck = open_checkpoint(args.path, allow_pickle=args.allow_pickle)
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(ck.path),
                    "files": [str(f) for f in ck.files],
                    "num_params": ck.num_params,
                    "bytes": ck.nbytes,
                    "tensors": {
                        n: {"dtype": t.dtype, "shape": list(t.shape)} for n, t in ck.tensors.items()
                    },
                    **({"hub": ck.hub.to_json()} if ck.hub is not None else {}),
                },
                indent=2,
            )
        )
        return 0
    dtypes: Counter[str] = Counter()
    for t in ck.tensors.values():
        dtypes[t.dtype] += t.numel
    print(
        f"{shown(ck.label)}: {len(ck.tensors)} tensors in {len(ck.files)} file(s), "
        f"{ck.num_params:,} parameters, {human_bytes(ck.nbytes)}"
    )
    print("dtypes: " + ", ".join(f"{d} {n:,}" for d, n in dtypes.most_common()))
    if ck.hub is not None:
        print(f"note: {ck.hub.note(ck.label)}")
    rows = list(ck.tensors.values())
    limit = len(rows) if args.max_rows == 0 else args.max_rows
    # names are shown escaped (a name cannot send escape codes) and cut to 200 characters
    names = [shown(t.name) for t in rows[:limit]]
    width = min(60, max((len(n) for n in names), default=10))
    for t, name in zip(rows, names):
        print(f"  {name:<{width}}  {t.dtype:<5} {str(list(t.shape)):<20} {t.numel:>14,}")
    if len(rows) > limit:
        print(f"  ... {len(rows) - limit} more (use --max-rows 0 for all)")
    return 0
