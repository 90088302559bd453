"""Interrupts (SIGINT, SIGTERM) that arrive at a safe moment, and never get lost.

Python turns a signal into an exception (``KeyboardInterrupt``, or the CLI's ``Terminated``)
raised wherever the main thread happens to be. Two places make that unsafe:

* inside ``threading`` and ``queue`` internals, between taking a lock and the ``try`` that
  would release it. The merge engine's main thread talks to its reader and writer threads
  through such queues; an interrupt there left a lock held and the clean-up hung for ever (CI
  caught a killed merge that never exited);
* inside a ``__del__`` method or a weakref callback, which the garbage collector runs at
  arbitrary moments: Python cannot propagate the exception, prints "Exception ignored in ..."
  with a traceback and carries on, so the run finished as if nothing had been asked.

`deferred` covers the first: while it is active (main thread only), SIGINT and SIGTERM only
record that they arrived, and `check` (called by the engine between units, while waiting, and
before the output is renamed into place) delivers them through the handler that was installed
before, so the same exception is raised, at a point where every lock is free. `install` covers
the second: an interrupt that Python swallowed is recorded instead of printed, and
`raise_if_swallowed` raises it at the next commit point.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = ["check", "deferred", "held", "install", "raise_if_swallowed", "swallowed_count"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_lock = threading.Lock()
_installed = False
_count = 0
_last: BaseException | None = None

_active = False
_previous: dict[int, Any] = {}
_pending: list[tuple[int, Any]] = []


def _record(signum: int, frame: Any) -> None:
    _pending.append((signum, frame))


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the next `check` (or the end of the block).

    A no-op outside the main thread (only it receives signals) and when already active.
    On leaving, the previous handlers come back and a signal still pending is delivered.
    """
    global _active
    if _active or threading.current_thread() is not threading.main_thread():
        yield
        return
    for s in _SIGNALS:
        old = signal.getsignal(s)
        if old is not signal.SIG_IGN and old is not None:  # None: set outside Python
            _previous[s] = signal.signal(s, _record)
    _active = True
    try:
        yield
    finally:
        _active = False
        for num, handler in _previous.items():
            signal.signal(num, handler)
        held = dict(_previous)
        _previous.clear()
        _deliver(held)


def held(fn: _F) -> _F:
    """Decorator: run ``fn`` inside `deferred`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check() -> None:
    """Deliver a signal that arrived during `deferred` (raises what its handler raises)."""
    if _pending:
        _deliver(_previous)


def _deliver(handlers: dict[int, Any]) -> None:
    if not _pending:
        return
    signum, frame = _pending[0]
    _pending.clear()
    handler = handlers.get(signum, signal.getsignal(signum))
    if callable(handler):
        handler(signum, frame)
    elif (
        handler == signal.SIG_DFL
    ):  # the default action (SIGTERM: end the process), as if never held
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def install() -> None:
    """Record (rather than print) interrupts raised where Python cannot propagate them."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            global _count, _last
            if isinstance(unraisable.exc_value, KeyboardInterrupt):
                _count += 1
                _last = unraisable.exc_value
                return
            previous(unraisable)

        sys.unraisablehook = hook
        _installed = True


def swallowed_count() -> int:
    """How many interrupts have been swallowed so far (compare before and after a step)."""
    return _count


def raise_if_swallowed(since: int) -> None:
    """Deliver a held signal, or raise the last swallowed interrupt if one came after ``since``."""
    check()
    if _count > since and _last is not None:
        raise _last.with_traceback(None)
