"""``soupkit wise-ft ZERO_SHOT FINE_TUNED --alpha A [A ...] OUT_DIR``: one output per alpha."""

from __future__ import annotations

import argparse
import sys

from soupkit._util.format import human_bytes, human_seconds
from soupkit.api.multi import wise_ft
from soupkit.cli._common import add_output_flags, command, progress_flag
from soupkit.errors import UsageError, shown


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "wise-ft",
        "WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned, one output per alpha, "
        "reading both models once",
        """
        soupkit wise-ft ./clip-zs ./clip-ft --alpha 0.5 ./wise
        soupkit wise-ft ./clip-zs ./clip-ft --alpha 0.25 0.5 0.75 ./wise    # ./wise/alpha-0.25/, ...
        soupkit wise-ft ./clip-zs ./clip-ft ./wise --alpha 0,0.1,0.2,0.3 --out-dtype bfloat16
    """,
    )
    p.add_argument("zero_shot", help="the zero-shot (pretrained) model: file or folder")
    p.add_argument("fine_tuned", help="its fine-tune: file or folder")
    p.add_argument(
        "out",
        nargs="?",
        default=None,
        help="output folder; receives one subfolder alpha-0.50/ per alpha",
    )
    p.add_argument(
        "--alpha",
        nargs="+",
        required=True,
        metavar="A",
        help="mixing coefficients (0 = zero-shot, 1 = fine-tuned), space or comma "
        "separated; OUT_DIR may follow them",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        default=None,
        help="cast inputs to this dtype first",
    )
    p.add_argument(
        "--out-dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        default=None,
        help="output dtype (default: the inputs')",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept PyTorch pickle checkpoints, loaded only with torch.load(weights_only=True)",
    )
    p.add_argument(
        "--allow-nonfinite", action="store_true", help="write NaN/Inf outputs instead of stopping"
    )
    p.add_argument(
        "--no-hash-inputs",
        action="store_true",
        help="do not record the sha256 of each input in the reports",
    )
    add_output_flags(p)
    p.set_defaults(func=run)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_alphas(values: list[str], out: str | None) -> tuple[list[float], str]:
    """Split ``--alpha`` values (space or comma separated) from a trailing OUT_DIR.

    argparse gives ``--alpha 0.25 0.5 OUT`` all to ``--alpha``; the last value is the output
    folder when it is not a number and no OUT_DIR was given before the flag.
    """
    items = [x for v in values for x in v.split(",") if x.strip()]
    if out is None and items and _number(items[-1]) is None:
        out = items.pop()
    if out is None:
        raise UsageError("no output folder given\nhint: soupkit wise-ft ZS FT --alpha 0.5 OUT_DIR")
    alphas: list[float] = []
    for x in items:
        a = _number(x)
        if a is None:
            raise UsageError(f"--alpha {x!r} is not a number\nhint: e.g. --alpha 0.25 0.5 0.75")
        alphas.append(a)
    if not alphas:
        raise UsageError("no alpha given\nhint: e.g. --alpha 0.25 0.5 0.75")
    return alphas, out


def run(args: argparse.Namespace) -> int:
    alphas, out = parse_alphas(args.alpha, args.out)
    results = wise_ft(
        args.zero_shot,
        args.fine_tuned,
        out,
        alphas=alphas,
        dtype=args.dtype,
        out_dtype=args.out_dtype,
        force=args.force,
        progress=progress_flag(args),
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        hash_inputs=not args.no_hash_inputs,
    )
    s = results[0].stats
    print(
        f"wrote {len(results)} WiSE-FT model(s) in one pass: read {human_bytes(s.bytes_read)} in "
        f"{human_seconds(s.seconds)}"
    )
    for a, r in zip(alphas, results):
        print(f"  alpha {a:g}: {r.out}")
    for n in results[0].plan.notes:
        print(f"note: {shown(n, limit=2000)}")
    bad = sorted({t for r in results for t in r.stats.nonfinite})
    if bad:
        print(
            f"warning: {len(bad)} tensor(s) hold NaN or Inf (written because of "
            f"--allow-nonfinite): {', '.join(shown(t) for t in bad[:10])}",
            file=sys.stderr,
        )
    return 0
