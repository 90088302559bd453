"""Flags shared by several subcommands, defined once."""

from __future__ import annotations

import argparse
import textwrap

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit.io.names import KeyMap


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists and is not empty"
    )
    p.add_argument(
        "--max-shard-size",
        default=MAX_SHARD_SIZE,
        metavar="SIZE",
        help="largest output shard, e.g. 5GB (default), 500MB, 2GiB",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def add_pickle_flag(p: argparse.ArgumentParser) -> None:
    """``--allow-pickle``: the one opt-in that lets pickle checkpoints in (see SECURITY.md)."""
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept PyTorch pickle checkpoints (.bin/.pt/.pth/.ckpt), loaded only with "
        "torch.load(weights_only=True); a pickle can hide code, so only for files you trust",
    )


def add_compute_flag(p: argparse.ArgumentParser) -> None:
    """``--compute``: override the recipe's ``compute`` (exact mode, docs/mergekit.md)."""
    p.add_argument(
        "--compute",
        choices=("float32", "exact"),
        default=None,
        help="float32: accumulate in float32 (the default, more precise); exact: compute in "
        "the recipe's dtype with mergekit 0.1.5's arithmetic, bit-identical to mergekit "
        "(default: the recipe's `compute:` key)",
    )


def add_safety_flags(p: argparse.ArgumentParser) -> None:
    """Opt-ins that relax a safety default, and resuming (see SECURITY.md)."""
    add_pickle_flag(p)
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write NaN/Inf outputs instead of stopping (they are listed in the report)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep finished shards when the run is interrupted or fails, and continue "
        "from them (verified by sha256) when run again with --resume",
    )
    p.add_argument(
        "--no-hash-inputs",
        action="store_true",
        help="do not record the sha256 of each input in soupkit-report.json (saves one "
        "background read of every input the first time; digests of unchanged "
        "inputs are remembered, see SOUPKIT_HASH_CACHE in the README)",
    )


def safety_kwargs(args: argparse.Namespace) -> dict[str, bool]:
    """The keyword arguments of `soupkit.merge` that `add_safety_flags` sets."""
    return {
        "allow_pickle": args.allow_pickle,
        "allow_nonfinite": args.allow_nonfinite,
        "resume": args.resume,
        "hash_inputs": not args.no_hash_inputs,
    }


def add_key_map_flags(p: argparse.ArgumentParser) -> None:
    """Tensor renaming applied to every input at plan level (see `soupkit.io.names`)."""
    p.add_argument(
        "--strip-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="remove PREFIX from the start of every tensor name that has it, e.g. 'model.' "
        "(Lightning) or 'module.' (DDP, timm, open_clip); repeatable",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="'REGEX=>REPLACEMENT'",
        help="rename tensors with re.sub, e.g. '^encoder\\.=>model.encoder.'; repeatable, "
        "applied in order after the prefix strips",
    )


def key_map_from(args: argparse.Namespace) -> KeyMap | None:
    """The `KeyMap` that `add_key_map_flags` describes (None when no flag was given)."""
    km = KeyMap.build(strip_prefix=args.strip_prefix, rename=args.rename)
    return km or None


def progress_flag(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip("\n"), "  ")


def command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, epilog: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=examples(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser
