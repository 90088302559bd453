"""Ray itself, imported only when needed, and evaluator objects stored in Ray's object store.

Below every other backend module (the worker fetches a `StoredObject`; `RayBackend` stores one),
so neither has to import the other. Importing this module does not import ``ray``.
"""

from __future__ import annotations

from typing import Any

from soupkit._util import extras as _extras
from soupkit.errors import EvaluationError, UsageError

__all__ = ["StoredObject", "import_ray"]

_INSTALL_HINT = _extras.install_hint("ray")


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        UsageError: ray is not installed (with the pip command that installs it).
    """
    ray = _extras.require("ray", "ray", "the Ray backend")
    if not hasattr(ray, "remote"):  # e.g. a folder named ray/ on sys.path, not the package
        where = getattr(ray, "__path__", None) or getattr(ray, "__file__", "?")
        raise UsageError(
            f"the Ray backend needs the 'ray' package; 'import ray' found {where}, which is not it\n"
            f"{_INSTALL_HINT}"
        )
    return ray


class StoredObject:
    """An evaluator object put in Ray's object store once per run; workers fetch it when they
    first need it (the reference is nested, so Ray does not fetch it for every task)."""

    def __init__(self, ref: Any) -> None:
        self.ref = [ref]

    def fetch(self) -> Any:
        """The object (called on a worker)."""
        ray = import_ray()
        try:
            return ray.get(self.ref[0])
        except Exception as e:
            raise EvaluationError(
                f"cannot unpickle the evaluator object on this Ray worker: {type(e).__name__}: {e}\n"
                "hint: its class or function must be importable on every worker (install its package, "
                "or put its folder on PYTHONPATH / runtime_env={'py_modules': [...]}), or name it by "
                "import string (RemoteEvaluator.from_spec('pkg.mod:fn'))"
            ) from e
