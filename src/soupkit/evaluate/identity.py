"""The source hash of an evaluator: what makes an edited evaluator's cached scores stale.

A score cache names an evaluator by its import string or qualified name plus `source_digest`,
the first 16 hex digits of the sha256 of the file that defines it. The search layer (a plain
function given in Python), the backends (an import string a worker imports) and the CLI
(``--evaluator pkg.mod:fn``) all name evaluators with this one function, so the same
evaluator gets the same identity wherever it comes from.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from soupkit.evaluate.loader import import_path
from soupkit.io.digest import sha256_file

__all__ = ["own_cache_key", "source_digest", "spec_identity"]


def _spec_file(spec: str, cwd: str) -> Path | None:
    """The module file an import string (``"pkg.mod:fn"`` / ``"file.py:fn"``) names, found
    without running the module (only its parent packages are imported)."""
    target = spec.rpartition(":")[0]
    if target.endswith(".py") or "/" in target or os.sep in target:
        return Path(target) if os.path.isabs(target) else Path(cwd) / target
    try:
        if "." in target:
            with import_path(cwd, first=False):  # searched as load_evaluator searches
                found = importlib.util.find_spec(target)
        else:
            found = importlib.machinery.PathFinder.find_spec(
                target, [p for p in sys.path if p] + [cwd]
            )
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin else None


def _object_file(obj: object) -> Path | None:
    try:
        src = inspect.getsourcefile(obj)  # type: ignore[arg-type]
    except TypeError:
        return None
    return Path(src) if src is not None else None


def source_digest(evaluator: object, cwd: str | None = None) -> str | None:
    """The first 16 hex digits of the sha256 of the file that defines ``evaluator``.

    Args:
        evaluator: an import string (``"pkg.mod:fn"`` or ``"path/to/file.py:fn"``, located
            without running the module), or a Python object (a function, a class).
        cwd: the folder relative paths and module names are resolved against (for an import
            string; default: the current directory).

    Returns:
        The digest, or None when no source file is found.
    """
    if isinstance(evaluator, str):
        path = _spec_file(evaluator, cwd if cwd is not None else os.getcwd())
    else:
        path = _object_file(evaluator)
    if path is None or not path.is_file():
        return None
    return sha256_file(path)[:16]


def own_cache_key(evaluator: object) -> str | None:
    """The identity an evaluator gives itself: its ``cache_key`` attribute, a non-empty string
    or a method returning one; None when it gives none."""
    key = getattr(evaluator, "cache_key", None)
    if callable(key):
        key = key()
    return key if isinstance(key, str) and key else None


def spec_identity(spec: str, cwd: str | None = None) -> str:
    """The identity of an evaluator named by an import string: the string and the digest of
    its source file (`source_digest`; ``nosource`` when none is found), so editing the
    evaluator invalidates its cached scores."""
    return f"{spec}@{source_digest(spec, cwd) or 'nosource'}"
