"""MkDocs hook: links written for GitHub (repository paths) made to work on the site.

The repository's Markdown links by repository path: docs pages reach the root files as
``../SECURITY.md``, and root files (SECURITY.md, benchmarks/README.md, included into the site by
snippets) reach the docs as ``docs/x.md`` or ``../docs/x.md``. On the site every one of those
lives in the docs folder, so the hook inlines the snippets itself (``--8<-- "FILE"`` lines) and
rewrites those link targets on top-level pages before MkDocs checks them (``--strict`` still
fails on a link that leads nowhere).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# repository path -> site page
ROOT_FILES = {
    "SECURITY.md": "security.md",
    "CHANGELOG.md": "changelog.md",
    "CONTRIBUTING.md": "contributing.md",
    "benchmarks/README.md": "benchmarks.md",
}
_SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"\s*$', re.MULTILINE)
_LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def _site_target(target: str) -> str:
    t = target
    while t.startswith("../"):
        t = t[3:]
    if t in ROOT_FILES:
        return ROOT_FILES[t]
    if t.startswith("docs/"):
        return t[len("docs/") :]
    return target


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """MkDocs event: rewrite repository-path links on top-level pages."""
    if "/" in page.file.src_uri:  # guides/ and reference/ pages link within the site already
        return markdown
    markdown = _SNIPPET.sub(lambda m: (ROOT / m["path"]).read_text(encoding="utf-8"), markdown)
    return _LINK.sub(lambda m: f"]({_site_target(m['target'])}{m['anchor'] or ''})", markdown)
