"""Writing a search's chosen soup: the merge, its report with the search's history, the plot."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from soupkit.api.merging import MergeResult, run_merge_plan
from soupkit.planning.plan import MergePlan
from soupkit.search import report_plot
from soupkit.search.bn import write_recalibrated

__all__ = ["write_search_output"]


def write_search_output(
    p: MergePlan,
    out: str | os.PathLike[str],
    key: str,
    history: dict[str, Any],
    notes: Sequence[str],
    plot_fn: Callable[[dict[str, Any]], bytes],
    plot_name: str,
    *,
    force: bool,
    progress: bool | None,
    plot: bool,
    max_shard_size: int | str,
    report_extra: Mapping[str, Any] | None,
    recalibrate: tuple[torch.nn.Module, Iterable[Any]] | None = None,
) -> tuple[Path, MergeResult, Path | None, list[str]]:
    """Write a search's chosen soup (plan ``p``) atomically, with its history under ``key`` in the
    report and ``plot_fn(history)`` as ``plot_name`` beside it (a note when matplotlib is missing).

    Returns the output folder, the merge result, the plot's path (or None) and the notes.
    """
    notes = list(notes)
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
    return dest, merged, plot_path, notes
