"""`soupkit merge` and `import soupkit` load only what they use (CHANGELOG, benchmarks/README.md).

Each check runs in a fresh interpreter, since this process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import soupkit

PROBE = """
import json, sys
{code}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("soupkit"))))
"""


def _loaded(code: str) -> set[str]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = r.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {r.stderr[-2000:]}"
    return set(json.loads(lines[-1]))


def test_merge_command_loads_no_search_backend_or_evaluator() -> None:
    code = (
        "from soupkit.cli import main\n"
        "try:\n    main(['merge', '--help'])\nexcept SystemExit:\n    pass"
    )
    loaded = _loaded(code)
    assert "soupkit.cli.merge" in loaded and "soupkit.api.merging" in loaded
    heavy = {m for m in loaded if m.split(".")[1:2] in (["search"], ["backends"], ["evaluate"])}
    assert not heavy, f"soupkit merge imported {sorted(heavy)}"
    others = {m for m in loaded if m.startswith("soupkit.cli.") and m != "soupkit.cli.merge"}
    assert others <= {"soupkit.cli._common"}, f"other commands imported: {sorted(others)}"


def test_import_soupkit_loads_its_names_on_first_use() -> None:
    loaded = _loaded("import soupkit")
    assert not {m for m in loaded if m.startswith(("soupkit.api", "soupkit.search"))}
    assert "soupkit.search.greedy" in _loaded("import soupkit; soupkit.greedy_soup")


def test_unknown_public_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        soupkit.not_a_name  # noqa: B018
