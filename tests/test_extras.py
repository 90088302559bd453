"""Optional dependencies: one table, imported only when needed, a missing one names its extra."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import soupkit
from soupkit._util import extras as _extras
from soupkit.errors import EvaluationError, UsageError

ROOT = Path(__file__).resolve().parent.parent
SRC = Path(soupkit.__file__).parent
OPTIONAL = sorted({m for mods, _ in _extras.EXTRAS.values() for m in mods})


def pyproject_extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"]["optional-dependencies"])


def test_extras_table_matches_pyproject_and_install_docs() -> None:
    declared = pyproject_extras()
    # hub and optimize are documented ahead of the branches that declare them
    assert set(declared) <= set(_extras.EXTRAS), set(declared) - set(_extras.EXTRAS)
    for extra, requirements in declared.items():
        names = {
            re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower().replace("-", "_")
            for r in requirements
        }
        for module in _extras.EXTRAS[extra][0]:
            assert module in names, f"extra {extra!r} does not install {module!r}"
    install = (ROOT / "docs" / "install.md").read_text()
    for extra in _extras.EXTRAS:
        assert f"| `{extra}` |" in install, f"docs/install.md does not document the {extra!r} extra"
    assert "numpy" in " ".join(tomllib_core_deps())


def tomllib_core_deps() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def import_time_imports(tree: ast.Module) -> set[str]:
    """Top-level module names imported when the module is imported (function bodies excluded,
    ``if TYPE_CHECKING:`` blocks excluded)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit(
                        [n for n in inner if isinstance(n, ast.stmt)]
                        + [s for h in inner if isinstance(h, ast.ExceptHandler) for s in h.body]
                    )

    visit(tree.body)
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_optional_package_is_imported_with_soupkit(path: Path) -> None:
    tree = ast.parse(path.read_text())
    bad = import_time_imports(tree) & set(OPTIONAL)
    assert not bad, (
        f"{path.relative_to(SRC)} imports {sorted(bad)} at import time; use soupkit._util.extras.require"
    )
    anywhere = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    anywhere |= {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0
    }
    direct = {m for m in anywhere if m.split(".")[0] in OPTIONAL}
    assert not direct, (
        f"{path.relative_to(SRC)} imports {sorted(direct)} itself; use soupkit._util.extras.require"
    )


def test_require_returns_the_module_or_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _extras.require("json", "eval", "a feature").dumps([]) == "[]"
    for name in ("optuna", "optuna.samplers"):  # what `import optuna` does when absent (even if
        monkeypatch.setitem(sys.modules, name, None)  # another test module imported it already)
    with pytest.raises(UsageError) as e:
        _extras.require("optuna", "optimize", "recipe search")
    assert str(e.value).startswith(
        "recipe search needs the 'optuna' package, which is not installed ("
    )
    assert str(e.value).endswith("\nhint: pip install 'soupkit[optimize]'")
    with pytest.raises(EvaluationError, match=r"soupkit\[optimize\]"):
        _extras.require("optuna.samplers", "optimize", "recipe search", EvaluationError)
    with pytest.raises(ValueError, match="unknown extra 'nope'"):
        _extras.require("json", "nope", "a feature")
    assert not _extras.available("optuna")
    assert _extras.available("json")


def test_missing_transformers_names_the_eval_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from soupkit.evaluate import HFClassificationEvaluator

    monkeypatch.setitem(sys.modules, "transformers", None)
    (tmp_path / "val.csv").write_text("text,label\nhi,0\n")
    with pytest.raises(
        EvaluationError,
        match=r"the built-in Hugging Face evaluation needs the 'transformers' "
        r"package, which is not installed .*\nhint: pip install 'soupkit\[eval\]'",
    ):
        HFClassificationEvaluator(tmp_path, tmp_path / "val.csv")


def test_plotting_without_matplotlib_names_the_plot_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from soupkit.search import report_plot

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(
        UsageError,
        match=r"plotting needs the 'matplotlib' package.*\nhint: pip install 'soupkit\[plot\]'",
    ):
        report_plot.sweep_plot({"param": "alpha", "points": []})


def test_missing_matplotlib_skips_plots_with_the_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, models: list[Path]
) -> None:
    from soupkit.search import report_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not report_plot.matplotlib_available()
    rep = soupkit.diagnose(models[:2], out=tmp_path / "diag", progress=False)
    assert "install matplotlib (pip install 'soupkit[plot]') for the plots" in rep.advice
    assert sorted(p.name for p in (tmp_path / "diag").iterdir()) == ["diagnosis.json"]


def test_core_commands_run_without_any_extra(models: list[Path]) -> None:
    """`soupkit --help`, `methods` and `inspect` with every optional package unimportable, and
    nothing on stderr (the wheel smoke test checks the same on a real plain install)."""
    script = (
        "import sys\n"
        f"for m in {OPTIONAL!r}: sys.modules[m] = None\n"
        "from soupkit.cli import main\n"
        "for argv in (['--help'], ['methods'], ['inspect', sys.argv[1]]):\n"
        "    try:\n"
        "        code = main(argv)\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "    assert code == 0, (argv, code)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(models[0])], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
