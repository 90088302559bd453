"""The kernel tests need the built extension (``make kernels``, or the editable install).

Without it they are skipped with that hint, except under ``make`` (``SOUPKIT_REQUIRE_KERNELS=1``),
where a missing build fails them: CI never passes without testing the kernels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import soupkit.kernels as kernels


@pytest.fixture(autouse=True)
def _kernels_built(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if kernels.best_isa() is None:
        why = "soupkit's native kernels are not built here; run `make kernels`"
        if os.environ.get("SOUPKIT_REQUIRE_KERNELS", "") not in ("", "0"):
            pytest.fail(why)
        pytest.skip(why)
    # each test starts from the default: kernels on, the best ISA of this CPU
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.delenv(kernels.ISA_ENV, raising=False)
    yield
