"""The folders of src/soupkit are its layers, and a module imports only downward.

Every module is parsed (no import is executed): ``import soupkit.x``, ``from soupkit.x import
y``, ``from soupkit import x``, relative imports, imports inside functions and under
``if TYPE_CHECKING:``, and ``importlib.import_module("soupkit....")`` with a literal name all
count. Three rules (docs/architecture.md explains the layers):

1. a module imports only from its own folder or from a strictly lower layer (not from a higher
   one, nor from a sibling folder of the same rank);
2. the module graph has no cycle (not even inside one folder, nor through a type-only import);
3. nothing sits at the top of the package but ``__init__``, ``errors`` and ``_version``;

and, for outside packages: methods import only the standard modules listed below, torch and
pydantic; search never imports transformers or datasets (an Evaluator does that).

Violations that exist on main while issue 16's branches remove them are listed in ``KNOWN_*``
below: a listed violation is tolerated, an unlisted one fails, and a listed one that no longer
exists fails too (delete its line), so the lists can only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import soupkit

SRC = Path(soupkit.__file__).parent
ROOT = "soupkit"

# Bottom to top. A module may import from its own folder or from a strictly lower rank.
LAYERS: dict[str, int] = {
    "errors": 0,
    "_version": 0,
    "_util": 1,  # extras, format, interrupts, safe_regex, progress, defaults
    "methods": 2,  # pure math, the registry, MethodSpec
    "io": 3,
    # native kernels: above methods (the sparsifying ones fall back to the methods' torch
    # reference and share their cut and Philox definitions); sibling of io
    "kernels": 3,  # headers, reader, writer, the output folder, digests, Hub, names
    "recipe": 4,  # schema, parameters
    "planning": 5,  # headers + recipe -> per-tensor jobs
    "engine": 6,  # the streaming pipeline and the pre-passes methods declare
    "adapters": 7,  # LoRA and model+adapter folds
    "evaluate": 7,  # the Evaluator protocol and built-ins; sibling of adapters
    "api": 8,  # merge / plan / multi / task vectors / diagnostics / checkpoint soup
    "backends": 9,  # where evaluations run (local, Ray)
    "search": 10,  # greedy, learned, sweeps, recipe search
    ROOT: 11,  # soupkit/__init__.py: the public API, re-exported from the layers
    "cli": 12,  # the shell over the public API
}
TOP_LEVEL_MODULES = {"__init__", "errors", "_version"}

# What else a layer may import. Methods are pure tensor math: no I/O, no models, no data.
METHODS_MAY_IMPORT = {
    "__future__",
    "collections",
    "dataclasses",
    "difflib",
    "enum",
    "functools",
    "importlib",
    "itertools",
    "math",
    "pydantic",
    "re",
    "torch",
    "typing",
}
# Search calls an Evaluator and never loads models or data sets itself.
SEARCH_MUST_NOT_IMPORT = {"datasets", "transformers"}

# Allowed exceptions: (importer, imported) -> why. Empty: no import needs one today.
ALLOWED: dict[tuple[str, str], str] = {}

# Known violations, kept only while a change is under way (a listed one that no longer exists
# fails the test, so the lists cannot rot). Empty since issue 16: the layering holds.
KNOWN_UPWARD: set[tuple[str, str]] = set()  # (importer, imported)
KNOWN_CYCLES: set[frozenset[str]] = set()  # the modules of one strongly connected component


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def where(self) -> str:
        return f"{_path_of(self.importer)}:{self.line}"


def _module_names() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([ROOT, *parts])] = path
    return out


MODULES = _module_names()


def _path_of(module: str) -> str:
    return str(MODULES[module].relative_to(SRC.parent))


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The deepest soupkit module that ``import name`` names, or None outside soupkit."""
    if name != ROOT and not name.startswith(ROOT + "."):
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _literal_import_module(node: ast.Call) -> str | None:
    """``importlib.import_module("soupkit.x")``'s literal name (None for other calls)."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called != "import_module" or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def _computed_soupkit_prefix(node: ast.Call) -> str | None:
    """The literal start of ``import_module(f"soupkit.x.{name}")``, which no parser resolves."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called != "import_module" or not node.args or not isinstance(node.args[0], ast.JoinedStr):
        return None
    first = node.args[0].values[0] if node.args[0].values else None
    if isinstance(first, ast.Constant) and str(first.value).startswith(ROOT + "."):
        return str(first.value)
    return None


def imports_of(module: str, source: str | None = None) -> Iterator[Import]:
    """Every soupkit module that ``module`` (or ``source`` in its place) imports."""
    path = MODULES[module]
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target is not None:
                    yield Import(module, target, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if _resolve(base) is None:
                continue
            for alias in node.names:
                # `from soupkit.x import y` imports the submodule soupkit.x.y when there is
                # one, else the name y from soupkit.x (whose __init__ runs).
                sub = f"{base}.{alias.name}"
                target = sub if sub in MODULES else _resolve(base)
                assert target is not None
                yield Import(module, target, node.lineno)
        elif isinstance(node, ast.Call):
            literal = _literal_import_module(node)
            target = _resolve(literal) if literal else None
            if target is not None:
                yield Import(module, target, node.lineno)


def outside_imports(module: str) -> set[str]:
    """The top-level names of everything but soupkit that ``module`` imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out - {ROOT}


def layer_of(module: str) -> str:
    if module == ROOT:
        return ROOT
    return module.split(".")[1]


def all_imports() -> list[Import]:
    """Each (importer, imported, line) once; `from x import a, b` is one import of x."""
    found = {imp for module in MODULES for imp in imports_of(module) if imp.imported != module}
    return sorted(found, key=lambda i: (i.importer, i.line, i.imported))


def upward_imports() -> dict[tuple[str, str], list[Import]]:
    found: dict[tuple[str, str], list[Import]] = {}
    for imp in all_imports():
        src, dst = layer_of(imp.importer), layer_of(imp.imported)
        if src == dst or LAYERS[dst] < LAYERS[src]:
            continue
        if (imp.importer, imp.imported) in ALLOWED:
            continue
        found.setdefault((imp.importer, imp.imported), []).append(imp)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The components of more than one node (Tarjan's algorithm, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)

    for start in sorted(graph):
        if start in index:
            continue
        visit(start)
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    visit(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while not component or node not in component:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                if len(component) > 1:
                    components.append(frozenset(component))
    return sorted(components, key=sorted)


def cycles() -> dict[frozenset[str], list[Import]]:
    """Each set of modules that import each other in a cycle, with the imports inside it."""
    edges = all_imports()
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in edges:
        graph[imp.importer].add(imp.imported)
    return {
        c: [e for e in edges if e.importer in c and e.imported in c]
        for c in strongly_connected(graph)
    }


def _report_upward(pairs: dict[tuple[str, str], list[Import]]) -> str:
    lines = []
    for (src, dst), imps in sorted(pairs.items()):
        at = ", ".join(i.where() for i in imps)
        lines.append(
            f"  {src} (layer {layer_of(src)}, rank {LAYERS[layer_of(src)]}) imports {dst} "
            f"(layer {layer_of(dst)}, rank {LAYERS[layer_of(dst)]}) at {at}"
        )
    return "\n".join(lines)


def _report_cycles(found: dict[frozenset[str], list[Import]]) -> str:
    lines = []
    for component, edges in found.items():
        lines.append(f"  cycle among {sorted(component)}:")
        lines += [f"    {e.importer} -> {e.imported} ({e.where()})" for e in edges]
    return "\n".join(lines)


def test_every_module_has_a_layer() -> None:
    unknown = sorted({layer_of(m) for m in MODULES} - set(LAYERS))
    assert not unknown, f"folders with no layer in tests/test_layers.py LAYERS: {unknown}"


def test_nothing_at_the_top_level_but_the_public_api_errors_and_version() -> None:
    top = sorted(p.stem for p in SRC.glob("*.py") if p.stem not in TOP_LEVEL_MODULES)
    assert not top, (
        f"modules at the top of src/soupkit: {top}; move each into the folder of its layer "
        "(docs/architecture.md)"
    )


def test_imports_point_downward() -> None:
    found = upward_imports()
    new = {k: v for k, v in found.items() if k not in KNOWN_UPWARD}
    gone = sorted(KNOWN_UPWARD - set(found))
    assert not new, (
        "imports from a higher layer or a sibling layer (import from a lower layer, or move "
        "the code down; docs/architecture.md):\n" + _report_upward(new)
    )
    assert not gone, f"fixed: delete these from KNOWN_UPWARD in tests/test_layers.py: {gone}"


def test_no_import_cycle() -> None:
    found = cycles()
    new = {k: v for k, v in found.items() if k not in KNOWN_CYCLES}
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not new, "import cycles (each component and the imports inside it):\n" + (
        _report_cycles(new)
    )
    assert not gone, f"no longer cycles: delete these from KNOWN_CYCLES: {gone}"


def test_methods_are_pure_and_search_loads_no_data() -> None:
    bad = []
    for module in MODULES:
        if layer_of(module) == "methods":
            bad += [f"{module} imports {i}" for i in outside_imports(module) - METHODS_MAY_IMPORT]
        if layer_of(module) == "search":
            bad += [
                f"{module} imports {i}" for i in outside_imports(module) & SEARCH_MUST_NOT_IMPORT
            ]
    assert not bad, "\n".join(sorted(bad))


def test_computed_imports_stay_in_their_folder() -> None:
    # import_module(f"soupkit.methods.{name}") is invisible to the checks above: allow it
    # only from a module of the folder it names (a registry loading its own members).
    bad = []
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                prefix = _computed_soupkit_prefix(node)
                if prefix is not None and prefix.split(".")[1] != layer_of(module):
                    bad.append(f"{_path_of(module)}:{node.lineno} imports {prefix}...")
    assert not bad, "computed imports of another folder:\n" + "\n".join(bad)


def test_the_parser_sees_every_kind_of_import() -> None:
    source = (
        "import soupkit.io.header\n"
        "from soupkit import errors\n"
        "from soupkit import merge\n"
        "from . import plan\n"
        "from ..io.reader import x\n"
        "from .. import methods\n"
        "def f():\n"
        "    from soupkit.search import greedy\n"
        "    import importlib\n"
        "    importlib.import_module('soupkit.cli')\n"
        "if TYPE_CHECKING:\n"
        "    from soupkit.api.merging import MergeResult\n"
        "import torch, soupkit.search.greedy.nothing\n"
    )
    got = sorted((i.line, i.imported) for i in imports_of("soupkit.planning.sizes", source))
    got = [(name, line) for line, name in got]
    assert got == [
        ("soupkit.io.header", 1),
        ("soupkit.errors", 2),
        ("soupkit", 3),
        ("soupkit.planning.plan", 4),
        ("soupkit.io.reader", 5),
        ("soupkit.methods", 6),
        ("soupkit.search.greedy", 8),
        ("soupkit.cli", 10),
        ("soupkit.api.merging", 12),
        ("soupkit.search.greedy", 13),
    ]


def test_the_cycle_finder_on_a_known_graph() -> None:
    graph = {
        "a": {"b"},
        "b": {"c", "d"},
        "c": {"a"},  # a -> b -> c -> a
        "d": {"e"},
        "e": {"d", "f"},  # d <-> e
        "f": set(),
        "g": {"a"},  # into a cycle, not on one
    }
    assert strongly_connected(graph) == [frozenset("abc"), frozenset("de")]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
