"""The ``soupkit`` command: a thin shell over the Python API.

Each subcommand lives in its own module here with an ``add_parser(subparsers)`` function that
registers it and sets ``func``; adding a command is one module plus its name in ``_COMMANDS``.
Exit codes: 0 ok, 1 runtime error, 2 usage or configuration error, 130 interrupted (SIGINT),
143 terminated (SIGTERM).

SIGTERM (what ``kill``, systemd, Slurm and container runtimes send) is turned into an
exception, like SIGINT, so that every ``with`` block unwinds and no partial output is left.
An interrupt that Python swallows (raised inside a ``__del__`` or weakref callback) is not
lost: see `soupkit._util.interrupts`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Sequence

from soupkit._util import interrupts as _interrupts
from soupkit._version import __version__
from soupkit.engine.malloc import tune_allocator
from soupkit.errors import SoupError, shown

__all__ = ["build_parser", "main"]

_COMMANDS = (
    "merge",
    "plan",
    "validate",
    "inspect",
    "methods",
    "soup_checkpoints",
    "wise_ft",
    "greedy",
    "sweep",
    "optimize",
    "learned",
    "lora",
    "diagnose",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``soupkit`` parser; ``only``: register just that command (its module, and the API
    it imports, are the only ones loaded: `main` uses it when the command line names one)."""
    parser = argparse.ArgumentParser(
        prog="soupkit",
        description="Model soups and weight-space merging of fine-tuned checkpoints.",
        epilog="Run `soupkit COMMAND --help` for examples of each command.",
    )
    parser.add_argument("--version", action="version", version=f"soupkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS if only is None else (only,):
        importlib.import_module(f"soupkit.cli.{name}").add_parser(sub)
    return parser


def _named_command(argv: Sequence[str]) -> str | None:
    """The command module ``argv`` names (its first argument, as every command is parsed),
    or None (no command, an option first, or an unknown name: the full parser reports it)."""
    if not argv:
        return None
    name = argv[0].replace("-", "_")
    return name if name in _COMMANDS else None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that cleanup code runs (see the module docstring)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console script).

    Only the named command's module is imported (and through it only the API it uses), so
    ``soupkit merge`` does not load the search, backends or evaluators before its first byte.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_named_command(argv))
    args = parser.parse_args(argv)
    tune_allocator()  # large method temporaries stay in the heap (see soupkit.engine.malloc)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# Characters of one line of an error message printed (the rest is counted, not printed).
MAX_LINE_CHARS = 2000


def one_line_each(message: str) -> str:
    """An error message as the terminal gets it: a last guard behind the messages' own `shown`.

    Each line has its control characters escaped and is cut to `MAX_LINE_CHARS`, so no input
    string that reached a message unescaped can send escape codes or forge a line.
    """
    return "\n".join(shown(line, limit=MAX_LINE_CHARS) for line in message.split("\n"))


def _run(args: argparse.Namespace) -> int:
    _interrupts.install()
    swallowed = _interrupts.swallowed_count()
    try:
        code = args.func(args)
        _interrupts.raise_if_swallowed(swallowed)
        return int(code or 0)
    except SoupError as e:
        print(f"error: {type(e).__name__}: {one_line_each(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(
            f"{'terminated' if term else 'interrupted'}: no unfinished output was left in place",
            file=sys.stderr,
        )
        return 143 if term else 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # an internal bug: say so plainly, traceback only on request
        if os.environ.get("SOUPKIT_DEBUG"):
            raise
        print(
            f"internal error: {type(e).__name__}: {one_line_each(str(e))}\n"
            "hint: this is a soupkit bug; rerun with SOUPKIT_DEBUG=1 for a traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
