"""Flags shared by several subcommands, defined once."""

from __future__ import annotations

import argparse
import textwrap


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")


def progress_flag(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip("\n"), "  ")


def command(sub: argparse._SubParsersAction, name: str, help: str, epilog: str) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    return sub.add_parser(name, help=help, description=help, epilog=examples(epilog),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
