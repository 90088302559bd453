"""Finishing a search: its timing, and when asked, the chosen soup written with its history in
the report and its plot beside it (greedy soup, sweeps and learned soup share this)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import torch

from soupkit.api.merging import MergeResult, run_merge_plan
from soupkit.planning.plan import MergePlan
from soupkit.search import report_plot
from soupkit.search.bn import write_recalibrated

__all__ = ["finish_search"]


class _SearchResult(Protocol):
    @property
    def notes(self) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_SearchResult)


def _replace(result: R, **changes: Any) -> R:
    return cast(R, dataclasses.replace(cast(Any, result), **changes))


def finish_search(
    result: R,
    out: str | os.PathLike[str] | None,
    make_plan: Callable[[], MergePlan],
    key: str,
    plot_fn: Callable[[dict[str, Any]], bytes],
    plot_name: str,
    *,
    t0: float,
    force: bool,
    progress: bool | None,
    plot: bool,
    max_shard_size: int | str,
    report_extra: Mapping[str, Any] | None,
    recalibrate: tuple[torch.nn.Module, Iterable[Any]] | None = None,
) -> R:
    """``result`` with its wall time since ``t0``; with ``out``, also written there.

    The soup (``make_plan()``) is written atomically with ``result.to_dict()`` under ``key`` in
    its report and ``plot_fn(history)`` as ``plot_name`` beside it (a note when matplotlib is
    missing); ``recalibrate=(model, loader)`` recomputes its BatchNorm statistics first. The
    returned result then has ``out``, ``merge``, ``plot`` and ``notes`` set.
    """
    if out is None:
        return _replace(result, seconds=time.perf_counter() - t0)
    history = _replace(result, seconds=time.perf_counter() - t0).to_dict()
    p = make_plan()
    notes = list(result.notes)
    files: dict[str, bytes] = {}
    dest = Path(out)
    plot_path = None
    if plot:
        if report_plot.matplotlib_available():
            files[plot_name] = plot_fn(history)
            plot_path = dest / plot_name
        else:
            notes.append("plot skipped: matplotlib is not installed (pip install 'soupkit[plot]')")
            history["notes"] = notes
    extra = {key: history, **dict(report_extra or {})}
    merged: MergeResult
    if recalibrate is not None:
        merged = write_recalibrated(
            p,
            dest,
            recalibrate[0],
            recalibrate[1],
            force=force,
            progress=progress,
            max_shard_size=max_shard_size,
            extra_report=extra,
            extra_files=files,
        )
    else:
        merged = run_merge_plan(
            p, dest, force=force, progress=progress, extra_report=extra, extra_files=files
        )
    return _replace(
        result,
        out=dest,
        merge=merged,
        plot=plot_path,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
