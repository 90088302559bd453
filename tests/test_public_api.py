"""The public surface cannot change by accident (httpx's test_exported_members, pinned).

Each package's ``__all__`` is written out below: adding, renaming or removing a public name
means editing this file, on purpose. Every name must import, carry documentation (the API
reference is generated from docstrings and leaves out what has none), and must not share its
name with a submodule, where ``soupkit.x`` would mean two things. The layering is
tests/test_layers.py.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import soupkit

SRC = Path(soupkit.__file__).parent

PUBLIC: dict[str, list[str]] = {
    "soupkit": [
        "CheckpointFormatError",
        "CheckpointSoup",
        "ConfigError",
        "DiagnosisReport",
        "EvaluationError",
        "GreedySoupResult",
        "KeyMap",
        "LearnedSoupResult",
        "LocalBackend",
        "LoraResult",
        "MergeConfig",
        "MergeIOError",
        "MergePlan",
        "MergeResult",
        "MethodInputError",
        "NonFiniteError",
        "OptimizeResult",
        "OutputExistsError",
        "PlanError",
        "RayBackend",
        "RemoteEvaluator",
        "SoupError",
        "SweepResult",
        "TaskVector",
        "UnknownMethodError",
        "UnknownParameterError",
        "UnsafeFormatError",
        "UsageError",
        "__version__",
        "diagnose",
        "extract_lora",
        "find_checkpoints",
        "fold_lora",
        "greedy_soup",
        "learned_soup",
        "load_recipe",
        "merge",
        "merge_loras",
        "merge_many",
        "merge_state_dicts",
        "open_checkpoint",
        "optimize",
        "plan",
        "read_adapter",
        "recalibrate_bn",
        "soup_checkpoints",
        "sweep",
        "tune_allocator",
        "uniform_soup",
        "wise_ft",
    ],
    "soupkit.methods": [
        "CounterRNG",
        "MagnitudeCut",
        "MethodSpec",
        "Params",
        "Prepass",
        "REGISTRY",
        "all_methods",
        "get",
        "method",
    ],
    "soupkit.evaluate": [
        "BoundedEvaluator",
        "EvalResult",
        "Evaluator",
        "HFCausalLMPerplexityEvaluator",
        "HFClassificationEvaluator",
        "PerExampleEvaluator",
        "accuracy_bound",
        "load_evaluator",
        "meets",
        "run_evaluator",
    ],
    "soupkit.search": [
        "GreedySoupResult",
        "GreedyStep",
        "HeldOutScores",
        "IngredientScore",
        "LearnedSoupResult",
        "OptimizeResult",
        "ScoreCache",
        "SearchSpace",
        "StreamingMixture",
        "SweepPoint",
        "SweepResult",
        "TrialRecord",
        "checkpoint_digest",
        "classification_loss",
        "default_cache_path",
        "evaluator_identity",
        "greedy_soup",
        "learned_recipe",
        "learned_soup",
        "load_space",
        "optimize",
        "read_state",
        "recalibrate_bn",
        "sweep",
        "sweep_recipes",
        "write_recalibrated",
    ],
    "soupkit.backends": [
        "Backend",
        "Candidate",
        "Decision",
        "EvalJob",
        "EvalRequest",
        "GreedyLoop",
        "Ingredient",
        "JobOutcome",
        "LocalBackend",
        "RayBackend",
        "RecipeMerge",
        "RemoteEvaluator",
        "RunLog",
        "UniformSoup",
        "execute_job",
        "greedy_loop",
        "remote_evaluator",
        "resolve_backend",
        "run_jobs",
    ],
}

# Public names with no documentation yet, each to be fixed by the owner of its module; a name
# that gets documented must leave this set (the test fails otherwise).
KNOWN_UNDOCUMENTED: set[str] = {
    "soupkit.backends.Candidate",  # a type alias in backends/jobs.py (issue 16c's file)
}


def test_public_lists_are_sorted() -> None:
    for package, names in PUBLIC.items():
        assert names == sorted(set(names)), f"keep PUBLIC[{package!r}] sorted, each name once"


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_all_is_pinned(package: str) -> None:
    module = importlib.import_module(package)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{package}.__all__ lists a name twice"
    assert sorted(exported) == PUBLIC[package], (
        f"{package}.__all__ changed: added {sorted(set(exported) - set(PUBLIC[package]))}, "
        f"removed {sorted(set(PUBLIC[package]) - set(exported))}; if on purpose, update "
        "PUBLIC in tests/test_public_api.py (and CHANGELOG.md)"
    )


def test_the_top_level_exports_nothing_public_outside_all() -> None:
    # a name imported into soupkit/__init__.py without __all__ would be public by accident
    public = {n for n in dir(soupkit) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(soupkit, n), ModuleType)}
    assert (public - modules) | {"__version__"} == set(soupkit.__all__)


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_every_public_name_imports(package: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {package} import *", namespace)  # what a user's star import gets
    missing = [n for n in PUBLIC[package] if n not in namespace]
    assert not missing, f"listed in {package}.__all__ but not importable: {missing}"
    modules = [n for n in PUBLIC[package] if isinstance(namespace[n], ModuleType)]
    assert not modules, f"{package}.__all__ exports modules: {modules}"


def _attribute_docstring(module: ModuleType, name: str) -> str | None:
    """The string literal that follows ``name = ...`` in ``module`` or where it was imported
    from (the attribute docstring that mkdocstrings renders)."""
    source = inspect.getsource(module)
    tree = ast.parse(source)
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any((a.asname or a.name) == name for a in node.names):
                found = _attribute_docstring(importlib.import_module(node.module), name)
                if found:
                    return found
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            after = tree.body[i + 1] if i + 1 < len(tree.body) else None
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return after.value.value
    return None


def _documentation(package: ModuleType, name: str) -> str | None:
    obj = getattr(package, name)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        # a class's own docstring: `__doc__` is not inherited (an exception class without one
        # would otherwise show its parent's)
        return obj.__doc__
    if re.search(rf"`{re.escape(name)}`", package.__doc__ or ""):
        return f"the docstring of {package.__name__}"
    return _attribute_docstring(package, name)


def test_every_public_name_is_documented() -> None:
    undocumented = set()
    for package, names in PUBLIC.items():
        module = importlib.import_module(package)
        for name in names:
            doc = _documentation(module, name)
            if not (doc and doc.strip()):
                undocumented.add(f"{package}.{name}")
    new = sorted(undocumented - KNOWN_UNDOCUMENTED)
    assert not new, (
        f"public names without a docstring (an attribute docstring, the string right after "
        f"`name = ...`, for data): {new}"
    )
    gone = sorted(KNOWN_UNDOCUMENTED - undocumented)
    assert not gone, f"documented now: delete from KNOWN_UNDOCUMENTED: {gone}"


def test_no_public_name_shadows_a_submodule() -> None:
    # `from soupkit.x import y` and `soupkit.x.y` must not mean two things, nor may importing
    # a submodule replace a public function of its package
    clashes = []
    for package, names in PUBLIC.items():
        module = importlib.import_module(package)
        submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
        clashes += [f"{package}.{n}" for n in names if n in submodules]
    assert not clashes, f"public names that are also submodules: {clashes}"
