"""The one progress bar: tqdm on stderr, shown by default only when stderr is a terminal.

Every long loop in soupkit (merges, diagnostics, LoRA folds, searches) gets its bar here, so
the look and the ``progress=`` rule (``None``: a terminal decides; ``True`` / ``False``: forced)
are the same everywhere.
"""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int | None, enabled: bool | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on stderr; ``unit="B"`` counts bytes (scaled by 1024)."""
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    scale = unit == "B"
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        disable=disable,
        dynamic_ncols=True,
        leave=False,
    )
