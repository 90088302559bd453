"""Starting Ray keeps soupkit's signal handling: ``ray.init`` installs a SIGTERM handler of its
own (``sys.exit(15)``), which replaced the CLI's (clean up, exit 143) and, inside a held region,
the one that holds a signal until every lock is free; a SIGTERM while Ray starts goes through
the handler soupkit had."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest

ray = pytest.importorskip(
    "ray", reason="needs the ray extra: pip install 'soupkit[ray]' (make test installs it)"
)
if not hasattr(ray, "remote"):  # tests/ray/ found as a namespace package: no ray installed
    pytest.skip(
        "needs the ray extra: pip install 'soupkit[ray]' (make test installs it)",
        allow_module_level=True,
    )

from soupkit import RayBackend  # noqa: E402
from soupkit._util import interrupts  # noqa: E402
from soupkit.errors import UsageError  # noqa: E402


class Asked(Exception):
    pass


def _mine(signum: int, frame: Any) -> None:
    raise Asked(signum)


def test_a_backend_that_starts_ray_keeps_the_handlers_it_found() -> None:
    # every module that starts Ray shuts it down: otherwise the backend would not start it here
    assert not ray.is_initialized(), "an earlier test left Ray running"
    sigint = signal.getsignal(signal.SIGINT)
    before = signal.signal(signal.SIGTERM, _mine)
    backend = RayBackend(
        num_cpus=0.5,
        max_workers=1,
        init_kwargs={"num_cpus": 1, "include_dashboard": False, "log_to_driver": False},
    )
    try:
        with interrupts.deferred():  # as a search's merge holds them
            held = signal.getsignal(signal.SIGTERM)
            backend.connect()
            assert ray.is_initialized()
            # still held: a SIGTERM now is recorded, not Ray's sys.exit
            assert signal.getsignal(signal.SIGTERM) is held
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(Asked):
                interrupts.check()  # delivered through the handler found before
        assert signal.getsignal(signal.SIGTERM) is _mine
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        backend.close()
        signal.signal(signal.SIGTERM, before)
    assert not ray.is_initialized()


def _ray_init_then_sigterm(**kw: Any) -> None:
    """What a SIGTERM while Ray starts does: Ray's handler first, then the signal."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("Ray's handler did not run")


def test_a_sigterm_while_ray_starts_goes_through_the_handler_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _ray_init_then_sigterm)
    before = signal.signal(signal.SIGTERM, _mine)
    try:
        with pytest.raises(Asked):  # the CLI's handler: Terminated, exit 143
            RayBackend().connect()
        assert signal.getsignal(signal.SIGTERM) is _mine
        # held (a merge's thread hand-offs): recorded, delivered at the end of the region
        with pytest.raises(Asked):
            with interrupts.deferred():
                held = signal.getsignal(signal.SIGTERM)
                with pytest.raises(UsageError, match="SIGTERM"):
                    RayBackend().connect()
                assert signal.getsignal(signal.SIGTERM) is held
        assert signal.getsignal(signal.SIGTERM) is _mine
    finally:
        signal.signal(signal.SIGTERM, before)
