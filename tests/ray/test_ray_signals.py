"""Starting Ray keeps soupkit's signal handling: ``ray.init`` installs a SIGTERM handler of its
own (``sys.exit(15)``), which replaced the CLI's (clean up, exit 143) and, inside a held region,
the one that holds a signal until every lock is free."""

from __future__ import annotations

import os
import signal
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


class Asked(Exception):
    pass


def _mine(signum: int, frame: Any) -> None:
    raise Asked(signum)


def test_a_backend_that_starts_ray_keeps_the_handlers_it_found() -> None:
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process: the backend would not start it")
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
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        backend.close()
        signal.signal(signal.SIGTERM, before)
    assert not ray.is_initialized()
