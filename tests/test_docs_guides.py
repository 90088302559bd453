"""The user guides under docs/guides/ run as written, and print what they show.

The guides are walk-throughs on toy models that the first guide creates. This test runs every
guide in the order a reader follows them, in one temporary folder:

- a ```python or ```yaml block whose first line is ``# NAME.py: ...`` / ``# NAME.yaml`` is a file
  the reader saves: it is written to the folder;
- a ```bash block is run line by line: ``python NAME.py`` runs the saved script, ``soupkit ...``
  runs the CLI (in this process, through ``soupkit.cli.main``), and each must exit 0;
- a ```text block right after a ```bash block is output that command prints: every line of it
  (whitespace collapsed; lines with ``...`` are elisions and skipped) must appear in the output;
- any other ```python block is run as a script in the folder.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from soupkit.cli import main

GUIDES = Path(__file__).resolve().parent.parent / "docs" / "guides"
ORDER = ["practitioner.md", "from-mergekit.md", "lora.md", "will-they-soup.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def commands(script: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", script)
    out = []
    for line in joined.splitlines():
        line = re.split(r"\s+#", line, maxsplit=1)[0].strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def squash(text: str) -> str:
    return " ".join(text.split())


def test_guides_cover_every_page() -> None:
    assert sorted(p.name for p in GUIDES.glob("*.md")) == sorted(ORDER)


def test_guides_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delitem(sys.modules, "my_eval", raising=False)
    ran = 0
    for name in ORDER:
        output: str | None = None
        for lang, body in blocks(GUIDES / name):
            first = body.splitlines()[0] if body else ""
            saved = re.match(r"# ([\w-]+\.(?:py|yaml))\b", first)
            if lang in ("python", "yaml") and saved:
                (tmp_path / saved.group(1)).write_text(body)
                output = None
            elif lang == "bash":
                capsys.readouterr()
                for cmd in commands(body):
                    argv = shlex.split(cmd)
                    if argv[0] == "python":
                        runpy.run_path(str(tmp_path / argv[1]), run_name="__main__")
                    else:
                        assert argv[0] == "soupkit", f"{name}: unexpected command {cmd!r}"
                        code = main(argv[1:] + (["--no-progress"] if _has_progress(argv) else []))
                        assert code == 0, f"{name}: `{cmd}` exited {code}:\n{capsys.readouterr()}"
                    ran += 1
                captured = capsys.readouterr()
                output = squash(captured.out + "\n" + captured.err)
            elif lang == "text" and output is not None:
                for line in body.splitlines():
                    if line.strip() and "..." not in line:
                        assert squash(line) in output, f"{name}: {line!r} not printed"
                output = None
            elif lang == "python":
                runpy.run_path(_script(tmp_path, body), run_name="__main__")
                capsys.readouterr()
                output = None
            else:
                output = None
    monkeypatch.delitem(sys.modules, "my_eval", raising=False)
    assert ran >= 15


def _has_progress(argv: list[str]) -> bool:
    """Commands that show a progress bar take --no-progress (keeps the captured output plain)."""
    return argv[1] in {"merge", "greedy", "sweep"}


def _script(folder: Path, body: str) -> str:
    path = folder / "_snippet.py"
    path.write_text(body)
    return str(path)
