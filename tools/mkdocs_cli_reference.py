"""MkDocs hook: the command-line reference, generated from soupkit's argparse parsers.

A page that holds the marker ``<!-- soupkit-cli-reference -->`` gets, in its place, every
``soupkit`` command and subcommand with its ``--help`` text as argparse prints it (at a fixed
width), read from :func:`soupkit.cli.build_parser` at build time, so the reference cannot drift
from the code. Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- soupkit-cli-reference -->"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in registration order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return out


def _render(parser: argparse.ArgumentParser, path: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, _, sub in _subcommands(parser):
        lines += _render(sub, f"{path} {name}", min(level + 1, 4))
    return lines


def cli_reference() -> str:
    """The Markdown of the whole command-line reference."""
    # argparse wraps help to $COLUMNS, and defaults such as the score cache's path come from
    # the environment: fixed, so builds agree and no builder's home folder is published
    fixed = {"COLUMNS": "100", "SOUPKIT_CACHE_DIR": "~/.cache/soupkit"}
    old = {k: os.environ.get(k) for k in fixed}
    os.environ.update(fixed)
    try:
        from soupkit.cli import build_parser

        parser = build_parser()
        table = ["| command | what it does |", "|---|---|"]
        table += [
            f"| [`soupkit {n}`](#soupkit-{n.replace('_', '-')}) | {h} |"
            for n, h, _ in _subcommands(parser)
        ]
        return "\n".join(table + [""] + _render(parser, "soupkit", 2))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: replace the marker with the generated reference."""
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
