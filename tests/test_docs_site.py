"""The docs site's generated command-line reference covers every command, as argparse prints it.

`make docs` (mkdocs build --strict) checks links, anchors and docstrings; this checks the hook
that writes docs/reference/cli.md from the parsers (tools/mkdocs_cli_reference.py).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

from soupkit.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mkdocs_cli_reference", ROOT / "tools" / "mkdocs_cli_reference.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def commands(
    parser: argparse.ArgumentParser, path: str = "soupkit"
) -> dict[str, argparse.ArgumentParser]:
    out = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(commands(sub, f"{path} {name}"))
    return out


def test_cli_reference_has_every_command_with_its_help(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("SOUPKIT_CACHE_DIR", "~/.cache/soupkit")  # as the hook sets them
    text = hook().cli_reference()
    assert str(Path.home()) not in text  # no builder's home folder in the published pages
    found = commands(build_parser())
    assert {"soupkit merge", "soupkit greedy", "soupkit lora fold"} <= set(found)
    for path, parser in found.items():
        assert f"`{path}`" in text, f"{path} missing from the CLI reference"
        assert parser.format_help().rstrip() in text, f"the help of {path} differs"


def test_hook_replaces_only_the_marker() -> None:
    mod = hook()
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert mod.MARKER in page
    out = mod.on_page_markdown(page, page=None)
    assert mod.MARKER not in out and "## `soupkit`" in out
    assert mod.on_page_markdown("# other page\n", page=None) == "# other page\n"
