"""Every error soupkit raises on purpose.

```
SoupError                       base: anything soupkit reports to a user
├── UsageError                  bad arguments or configuration (CLI exit code 2)
│   ├── ConfigError             a recipe failed validation; carries *all* problems at once
│   ├── UnknownMethodError      `merge_method` names no registered method
│   ├── UnknownParameterError   a parameter the method does not declare
│   └── OutputExistsError       the output folder exists and is not empty (use --force)
├── CheckpointFormatError       a file that is not a valid checkpoint (truncated, malformed, hostile)
│   └── UnsafeFormatError       a pickle checkpoint without the explicit opt-in
├── PlanError                   inputs that cannot be merged; carries *all* problems at once
├── NonFiniteError              NaN / Inf in an input or produced by a method
├── MethodInputError            a method cannot merge the values of one tensor (e.g. antipodal)
├── EvaluationError             an evaluator failed on a named candidate
└── MergeIOError                the output could not be written (disk full, permissions)
```

Messages have three parts: *what* (file, tensor, model), *observed versus expected*, and a
*hint*. `SoupError.exit_code` is what the CLI exits with: 2 for usage and configuration
problems, 1 for everything that goes wrong at run time.

Every string that comes from an input (a tensor name, a path, a key of a recipe or an index)
goes through `shown` before it is put in a message or printed: control characters are shown
escaped, as ``repr`` does (``\\x1b``, ``\\n``), so a hostile name cannot move the cursor, retitle
the terminal or forge a log line, and a name longer than `MAX_SHOWN_CHARS` is cut, so a 5 MB
name gives a short line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = [
    "CheckpointFormatError",
    "ConfigError",
    "EvaluationError",
    "MergeIOError",
    "MethodInputError",
    "NonFiniteError",
    "OutputExistsError",
    "PlanError",
    "SoupError",
    "UnknownMethodError",
    "UnknownParameterError",
    "UnsafeFormatError",
    "UsageError",
    "shown",
]

# How many characters of one untrusted string a message shows (the rest is counted, not shown).
MAX_SHOWN_CHARS = 200


def shown(value: object, *, quote: bool = False, limit: int = MAX_SHOWN_CHARS) -> str:
    r"""An untrusted string (tensor name, path, key) as a message may show it.

    Non-printable characters (C0/C1 controls, newlines, escape sequences, bidi overrides, lone
    surrogates from undecodable file names) are escaped as ``repr`` escapes them; text longer
    than ``limit`` characters is cut, with the number of characters left out.

    Args:
        value: a str, a path or bytes (decoded as the file system does).
        quote: put it in single quotes (like ``{name!r}``) - for names inside a sentence.
        limit: characters kept.

    Examples:
        >>> print(shown("w\x1b[2J"))
        w\x1b[2J
        >>> print(shown("b\nerror: fake", quote=True))
        'b\nerror: fake'
        >>> print(shown("x" * 300, limit=3))
        xxx...(297 more characters)
    """
    if isinstance(value, bytes):
        text = os.fsdecode(value)
    elif isinstance(value, os.PathLike):
        text = os.fsdecode(os.fspath(value))
    else:
        text = str(value)
    cut = len(text) - limit if len(text) > limit else 0
    if cut:
        text = text[:limit]
    if quote:
        text = repr(text)
    elif not text.isprintable():
        text = repr(text)[1:-1]
    return text + (f"...({cut} more characters)" if cut else "")


def _item(text: str) -> str:
    """A list item whose continuation lines stay indented under it."""
    first, *rest = text.split("\n")
    return "\n".join(
        [f"  - {first}"] + [f"    {r}" if not r.startswith("    ") else r for r in rest]
    )


class SoupError(Exception):
    """Base class: an error soupkit explains to the user (no traceback needed)."""

    exit_code: int = 1


class UsageError(SoupError):
    """Raised for bad arguments or configuration, detected before any data moves."""

    exit_code = 2


class ConfigError(UsageError):
    """Raised when a recipe fails validation. ``errors`` holds every problem found."""

    def __init__(self, errors: Sequence[str], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.errors)} problem(s){where}:"]
        lines += [_item(e) for e in self.errors]
        super().__init__("\n".join(lines))


class UnknownMethodError(UsageError):
    """Raised when a merge method name is not registered (message suggests close names)."""


class UnknownParameterError(UsageError):
    """Raised when a recipe sets a parameter that the method does not declare."""


class OutputExistsError(UsageError):
    """Raised when the output folder exists and is not empty, and ``force`` was not given."""


class CheckpointFormatError(SoupError):
    """Raised when a checkpoint file is malformed, truncated, inconsistent or hostile."""


class UnsafeFormatError(CheckpointFormatError):
    """Raised for pickle-based checkpoints unless the user explicitly opted in."""

    exit_code = 2


class PlanError(SoupError):
    """Raised when the inputs cannot be merged (missing tensors, shape or dtype mismatches).

    ``problems`` holds every problem found, so a user fixes them all in one go.
    """

    exit_code = 2

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        head = f"cannot merge: {len(self.problems)} problem(s) found before any data was read"
        super().__init__("\n".join([head] + [_item(p) for p in self.problems]))


class NonFiniteError(SoupError):
    """Raised when a tensor holds NaN or Inf (in an input or produced by a method)."""


class MethodInputError(SoupError):
    """Raised when a merge method cannot merge the values of one tensor (e.g. `multislerp` on
    antipodal tensors whose weights cancel); the engine adds the tensor's name."""


class EvaluationError(SoupError):
    """Raised when an evaluator fails; the message names the candidate."""


class MergeIOError(SoupError):
    """Raised when the output cannot be written (disk full, permissions, ...)."""
