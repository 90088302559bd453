"""The public surface and the layering cannot change by accident."""

from __future__ import annotations

import ast
from pathlib import Path

import soupkit

SRC = Path(soupkit.__file__).parent


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(soupkit) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(soupkit, n)).__name__ == "module"}
    assert set(soupkit.__all__) == (public - modules) | {"__version__"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_layering_imports_point_inward() -> None:
    def mods(folder: str) -> list[Path]:
        if (SRC / folder).is_dir():
            return sorted((SRC / folder).rglob("*.py"))
        return [SRC / folder] if (SRC / folder).is_file() else []

    for path in mods("methods"):
        for imp in imports_of(path):
            top = imp.split(".")[0]
            assert top in {
                "__future__",
                "collections",
                "dataclasses",
                "typing",
                "math",
                "importlib",
                "difflib",
                "re",
                "functools",
                "itertools",
                "enum",
                "torch",
                "pydantic",
                "soupkit",
            }, f"{path.name} imports {imp}"
            if top == "soupkit":
                assert imp.startswith(("soupkit.methods", "soupkit.errors")), (
                    f"{path.name} imports {imp}"
                )
    for path in mods("io"):
        assert not {
            i
            for i in imports_of(path)
            if i.startswith(
                (
                    "soupkit.planning.plan",
                    "soupkit.engine.execute",
                    "soupkit.api.merging",
                    "soupkit.cli",
                    "soupkit.search",
                )
            )
        }, path
    for path in SRC.rglob("*.py"):
        if "cli" in path.relative_to(SRC).parts:
            continue
        assert not {i for i in imports_of(path) if i.startswith("soupkit.cli")}, (
            f"{path} imports the CLI"
        )
    for path in mods("search"):
        assert not {
            i for i in imports_of(path) if i.split(".")[0] in {"transformers", "datasets"}
        }, path
    assert not {
        i
        for i in imports_of(SRC / "planning" / "plan.py")
        if i.startswith(("soupkit.engine.execute", "soupkit.api.merging"))
    }
