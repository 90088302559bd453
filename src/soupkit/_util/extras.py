"""Optional dependencies (pip extras): the one place that imports them and explains a miss.

A plain ``pip install soupkit`` covers merging, planning, inspecting, task vectors, LoRA and
soups driven by your own evaluator. The extras add the rest; every optional package is
imported through :func:`require` (or probed with :func:`available`) inside the function that
needs it, never when ``soupkit`` is imported, so a missing extra fails only the feature that
needs it, with the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from soupkit.errors import SoupError, UsageError

__all__ = ["EXTRAS", "available", "install_hint", "require"]

#: extra name -> (the modules it brings, what it enables). ``docs/install.md`` documents the
#: same table and a test keeps them and pyproject.toml's extras in step.
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "eval": (
        ("transformers", "matplotlib"),
        "the built-in Hugging Face evaluators (classification accuracy, causal-LM "
        "perplexity) and the plots of soups and sweeps",
    ),
    "plot": (("matplotlib",), "PNG plots of greedy soups, sweeps, learned soups and diagnoses"),
    "ray": (("ray",), "`--backend ray`: candidate evaluation on a Ray cluster"),
    "hub": (("huggingface_hub",), "Hub ids via huggingface_hub"),
    "optimize": (
        ("optuna", "cmaes"),
        "`soupkit optimize`: Optuna-based recipe search (TPE, CMA-ES)",
    ),
    "lm-eval": (("lm_eval",), "`--lm-eval`: score causal LMs with lm-evaluation-harness tasks"),
    "dev": ((), "the test suite, ruff, mypy and the build front end (contributors)"),
    "docs": ((), "MkDocs, Material and mkdocstrings, to build the documentation site"),
}


def install_hint(extra: str) -> str:
    """The hint line that installs an extra: ``hint: pip install 'soupkit[EXTRA]'``."""
    return f"hint: pip install 'soupkit[{extra}]'"


def available(module: str) -> bool:
    """Whether an optional module can be imported (it is imported, as its use would)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(
    module: str, extra: str, feature: str, error: type[SoupError] = UsageError
) -> ModuleType:
    """Import an optional module, or raise ``error`` naming the feature and the extra.

    Args:
        module: the module to import (``"transformers"``, ``"ray"``, ``"matplotlib.figure"``).
        extra: the pip extra that installs it (a key of :data:`EXTRAS`).
        feature: what needs it, as the subject of a sentence (``"the Ray backend"``).
        error: the :class:`~soupkit.errors.SoupError` subclass to raise.

    Returns:
        The imported module.

    Raises:
        SoupError: ``error``, when the module is not installed; its message ends with the
            ``pip install`` command.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; expected one of {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise error(
            f"{feature} needs the {top!r} package, which is not installed ({e})\n"
            f"{install_hint(extra)}"
        ) from None
