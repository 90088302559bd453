"""Load a user's evaluator from an import string: ``package.module:name`` or ``path/file.py:name``.

The named object *is* the evaluator (a function or an instance with ``__call__``). An evaluator
that needs configuration is built in the user's module, e.g. ``evaluator = MyEval("val.csv")``,
and named as ``mymodule:evaluator``; soupkit never guesses constructor arguments.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import cast

from soupkit.errors import EvaluationError
from soupkit.evaluate.protocol import Evaluator

__all__ = ["load_evaluator"]

_FORMS = "'package.module:name' or 'path/to/file.py:name'"


@contextlib.contextmanager
def import_path(directory: str, *, first: bool) -> Iterator[None]:
    """``directory`` on ``sys.path`` while the evaluator is imported, and never after: nothing
    else soupkit imports later (matplotlib, transformers, ...) can be shadowed by a file there."""
    added = directory not in sys.path
    if added:
        if first:
            sys.path.insert(0, directory)
        else:
            sys.path.append(directory)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(directory)


def _import_file(path: Path, spec_text: str) -> ModuleType:
    if not path.is_file():
        raise EvaluationError(
            f"cannot load evaluator {spec_text!r}: file {str(path)!r} does not exist "
            f"(resolved from {os.getcwd()})\nhint: give {_FORMS}"
        )
    resolved = path.resolve()
    # A unique, stable module name: two files called eval.py do not collide, and registering it
    # in sys.modules lets the file use dataclasses, pickling and relative module lookups.
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    name = f"_soupkit_user_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise EvaluationError(
            f"cannot load evaluator {spec_text!r}: {str(path)!r} is not an importable Python "
            "file\nhint: the file must end in .py"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        # like `python file.py`, the file's siblings are importable - while it is imported
        with import_path(str(resolved.parent), first=True):
            spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        if not isinstance(e, Exception):
            raise
        raise EvaluationError(
            f"cannot load evaluator {spec_text!r}: running {str(path)!r} raised "
            f"{type(e).__name__}: {e}\nhint: the traceback above shows the failing line"
        ) from e
    return module


def _import_module(module_name: str, spec_text: str) -> ModuleType:
    try:
        # the current directory is searched after the installed packages, during this import only
        with import_path(os.getcwd(), first=False):
            return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Tell "your module does not exist" apart from "your module imports something missing".
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise EvaluationError(
                f"cannot load evaluator {spec_text!r}: no module named {e.name!r} (searched "
                f"the current directory {os.getcwd()} and sys.path)\nhint: run soupkit from "
                f"the folder that contains the module, install it, or give a file path "
                "('path/to/file.py:name')"
            ) from e
        raise EvaluationError(
            f"cannot load evaluator {spec_text!r}: importing {module_name!r} failed because it "
            f"imports {e.name!r}, which is not installed\nhint: pip install the missing package"
        ) from e
    except Exception as e:
        raise EvaluationError(
            f"cannot load evaluator {spec_text!r}: importing {module_name!r} raised "
            f"{type(e).__name__}: {e}\nhint: the traceback above shows the failing line"
        ) from e


def load_evaluator(spec: str) -> Evaluator:
    """Import the evaluator named by ``spec``.

    What is imported, and from where (SECURITY.md, "The evaluator's import rule"):

    - ``path/to/file.py:name``: that file, loaded by its path (under a private module name);
      while it runs its top level, its own folder is first on ``sys.path`` (as with ``python
      file.py``), so it can import its neighbours; the current directory is not searched.
    - ``package.module:name``: that module, found on ``sys.path`` with the current directory
      searched *after* the installed packages, while the import runs.

    Either entry is removed from ``sys.path`` when the import returns, so a file such as
    ``matplotlib.py`` in the current directory never shadows what soupkit imports later.
    ``name`` may be dotted (``module:obj.attr``).

    Args:
        spec (`str`): ``"package.module:name"`` or ``"path/to/file.py:name"``.

    Returns:
        `Evaluator`: the named callable.

    Raises:
        EvaluationError: malformed spec, missing module / file / attribute, an error while
            importing, or an object that is not a usable evaluator.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise EvaluationError(
            f"cannot load evaluator {spec!r}: expected {_FORMS}, got no ':name' part\n"
            f"hint: for a function `score` in eval_fns.py, write 'eval_fns:score'"
        )
    is_file = target.endswith(".py") or os.sep in target or "/" in target
    module = _import_file(Path(target), spec) if is_file else _import_module(target, spec)

    obj: object = module
    walked: list[str] = []
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = f"{target}" + "".join(f".{w}" for w in walked)
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            close = difflib.get_close_matches(part, public, n=3)
            suggestion = (
                f"did you mean {', '.join(repr(c) for c in close)}?"
                if close
                else (f"available: {', '.join(public[:20]) or '(nothing public)'}")
            )
            raise EvaluationError(
                f"cannot load evaluator {spec!r}: {where!r} has no attribute {part!r}\n"
                f"hint: {suggestion}"
            )
        obj = getattr(obj, part)
        walked.append(part)

    if inspect.isclass(obj):
        raise EvaluationError(
            f"cannot load evaluator {spec!r}: {attr!r} is a class, expected a function or an "
            f"instance\nhint: create it in your module, e.g. `evaluator = {attr}(...)`, and "
            f"name that: '{target}:evaluator'"
        )
    if not callable(obj):
        raise EvaluationError(
            f"cannot load evaluator {spec!r}: {attr!r} is a {type(obj).__name__}, which is not "
            "callable; expected a callable(state) -> float\nhint: name the function itself"
        )
    return cast(Evaluator, obj)  # callable; its signature is checked when it is called
