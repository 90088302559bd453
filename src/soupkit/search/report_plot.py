"""PNG plots of search reports: greedy soup steps, sweep curves (and WiSE-FT's ID-vs-shift
scatter), learned-soup training. Needs matplotlib (the ``plot`` or ``eval`` extra).

Plots are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas, never through
``pyplot``: no global backend switch, no window, nothing left open in the caller's session.
Every function takes the JSON-ready dictionaries the searches put in ``soupkit-report.json``, so
a plot can be redrawn later from a report alone (`plot_report`).
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from soupkit._util import extras as _extras

__all__ = [
    "greedy_plot",
    "learned_plot",
    "matplotlib_available",
    "plot_report",
    "short_labels",
    "sweep_plot",
]

_GREEN, _RED, _BLUE, _GREY, _ORANGE = "#2e7d32", "#c62828", "#1565c0", "#9e9e9e", "#ef6c00"


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the ``plot`` extra)."""
    return _extras.available("matplotlib")


def short_labels(labels: Sequence[str]) -> list[str]:
    """The shortest path suffixes that still tell the labels apart (``runs/a/ckpt`` -> ``a/ckpt``)."""
    parts = [
        [p for p in str(lab).replace(os.sep, "/").split("/") if p not in ("", ".")] or [str(lab)]
        for lab in labels
    ]
    depth = 1
    while True:
        out = ["/".join(p[-depth:]) for p in parts]
        if len(set(out)) == len(out) or depth >= max(len(p) for p in parts):
            return out
        depth += 1


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    Figure = _extras.require("matplotlib.figure", "plot", "plotting").Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png(fig: Any) -> bytes:
    _extras.require("matplotlib.backends.backend_agg", "plot", "plotting").FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ellipsize(text: str, limit: int) -> str:
    """``text`` cut in the middle to at most ``limit`` characters (both ends stay readable)."""
    if len(text) <= limit:
        return text
    keep = limit - 1
    return text[: (keep + 1) // 2] + "\u2026" + text[len(text) - keep // 2 :]


def _title(ax: Any, lines: Sequence[str], width_in: float, fontsize: float = 9.5) -> None:
    """A title that fits the axes: every line wrapped to the figure's width, never cut off."""
    chars = max(30, int(width_in * 72 / (0.62 * fontsize)) - 4)  # average glyph ~0.6 em, a margin
    wrapped = [w for line in lines for w in textwrap.wrap(line, chars)]
    ax.set_title("\n".join(wrapped), fontsize=fontsize)


def greedy_plot(greedy: Mapping[str, Any]) -> bytes:
    """Score per greedy step: each ingredient alone, each candidate soup, the soup so far.

    With sequential decisions each candidate is annotated with the examples its decision used,
    the discordant counts (``+better/-worse``) and the decision's error bound.

    Args:
        greedy: the ``"greedy"`` section of a greedy soup report (`GreedySoupResult.to_dict`).

    Returns:
        PNG bytes.
    """
    ranked = sorted(greedy["ingredients"], key=lambda r: r["rank"])
    names = short_labels([r["label"] for r in ranked])
    steps = {s["rank"]: s for s in greedy["steps"]}
    seq = greedy.get("sequential")
    n = len(ranked)
    width = max(6.4, 1.0 + 0.75 * n) if seq else max(6.4, 1.0 + 0.55 * n)
    fig, ax = _figure(width, 5.0 if seq else 4.6)
    xs = list(range(n))
    ax.plot(
        xs, [r["score"] for r in ranked], "o", color=_GREY, ms=6, label="ingredient alone", zorder=2
    )
    soup = [ranked[0]["score"]]
    for x in xs[1:]:
        s = steps[x]
        soup.append(s["soup_score"])
        if s["accepted"]:
            ax.plot(x, s["candidate_score"], "o", color=_GREEN, ms=8, zorder=4)
        elif s["complete"] or s.get("test") == "sequential":
            ax.plot(x, s["candidate_score"], "x", color=_RED, ms=9, mew=2.2, zorder=4)
        else:
            ax.plot(x, s["candidate_score"], "v", mfc="none", color=_RED, ms=9, mew=1.8, zorder=4)
        if s.get("test") == "sequential":
            used = s.get("examples_used", 0)
            note = (
                f"{used:,}/{s['total']:,} ex.\n+{s.get('better')}/\u2212{s.get('worse')}\n"
                f"err\u2264{s.get('error_bound', 0.0):.1g}"
            )
            ax.annotate(
                note,
                (x, 0.02),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=6.5,
                color="#424242",
                zorder=5,
            )
    ax.step(xs, soup, where="post", color=_BLUE, lw=2, label="greedy soup so far", zorder=3)
    ax.plot([0], [ranked[0]["score"]], "o", color=_GREEN, ms=8, zorder=4)
    # Legend entries for the candidate markers, only for those that occur.
    done = greedy["steps"]
    ax.plot([], [], "o", color=_GREEN, ms=8, label="candidate accepted")
    if any(not s["accepted"] and (s["complete"] or s.get("test") == "sequential") for s in done):
        ax.plot([], [], "x", color=_RED, ms=9, mew=2.2, label="candidate rejected")
    if any(not s["complete"] and s.get("test") != "sequential" for s in done):
        ax.plot(
            [],
            [],
            "v",
            mfc="none",
            color=_RED,
            ms=9,
            mew=1.8,
            label="rejected early (upper bound shown)",
        )
    if (
        seq
    ):  # each candidate: examples used, +better/-worse discordant, error bound (along the bottom)
        lo = min([r["score"] for r in ranked] + [s["candidate_score"] for s in done])
        hi = max([r["score"] for r in ranked] + [s["candidate_score"] for s in done])
        pad = max(hi - lo, 1e-3)
        ax.set_ylim(lo - 0.4 * pad, hi + 0.1 * pad)  # room for the annotations along the bottom
    ax.set_xticks(xs)
    ax.set_xticklabels(
        names, rotation=35 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8
    )
    ax.set_xlabel(
        "ingredients, best first (order tried)\n"
        f"evaluator: {_ellipsize(str(greedy.get('evaluator', '?')), int(width * 11))}",
        fontsize=9,
    )
    ax.set_ylabel("validation score (higher is better)")
    rule = ">" if greedy["strict"] else ">="
    final = greedy["final"]
    held = greedy.get("held_out")
    lines = [
        f"Greedy soup: {len(final['ingredients'])} of {n} ingredients, score {final['score']:.4g} "
        f"(best single {ranked[0]['score']:.4g}; accept if {rule})"
    ]
    if seq:
        used = sum(s.get("examples_used", 0) for s in done)
        lines.append(
            f"sequential decisions (delta {seq['delta']:g}, order seed {seq['seed']}): "
            f"{used:,} of {seq['examples'] * len(done):,} candidate examples used; "
            f"{greedy['examples']['evaluated']:,} examples evaluated in all"
        )
    else:
        lines.append(
            f"{greedy['evaluations']} evaluations, {greedy['cache_hits']} cached, "
            f"{greedy['examples']['saved']:,} examples saved by early rejection"
        )
    if held:
        lines.append(
            f"held-out test set: soup {held['soup_score']:.4g}, best single {held['best_single_score']:.4g}"
        )
    _title(ax, lines, width)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def sweep_plot(sweep: Mapping[str, Any]) -> bytes:
    """Score against the swept parameter; with a second (shifted) set, also the ID-vs-shift
    scatter of the WiSE-FT paper (Wortsman et al., CVPR 2022, Figure 1).

    Args:
        sweep: the ``"sweep"`` section of a sweep report (`SweepResult.to_dict`).

    Returns:
        PNG bytes.
    """
    pts = sweep["points"]
    param = sweep["param"]
    xs = [p["value"] for p in pts]
    ys = [p["score"] for p in pts]
    shifted = [p.get("shift_score") for p in pts]
    has_shift = all(_finite(s) for s in shifted) and bool(pts)
    fig, axes = _figure(11.0 if has_shift else 6.4, 4.4, 2 if has_shift else 1)
    ax = axes[0] if has_shift else axes
    ax.plot(xs, ys, "o-", color=_BLUE, label=sweep.get("evaluator_short", "score"))
    best = sweep["best"]
    ax.plot(
        [best["value"]],
        [best["score"]],
        "*",
        color=_GREEN,
        ms=16,
        zorder=5,
        label=f"best: {param}={best['value']:g} ({best['score']:.4g})",
    )
    if has_shift:
        ax.plot(xs, shifted, "s--", color=_ORANGE, label="shifted set")
    ax.set_xlabel(param)
    ax.set_ylabel("score (higher is better)")
    seq = sweep.get("sequential")
    ax.set_title(
        f"{sweep['method']}: score vs {param}"
        + (
            f"\nsequential (delta {seq['delta']:g}): each score on the examples its point used"
            if seq
            else ""
        ),
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_shift:
        sc = axes[1]
        sc.plot(ys, shifted, "-", color=_GREY, lw=1, zorder=1)
        points = sc.scatter(ys, shifted, c=xs, cmap="viridis", s=40, zorder=3)
        for x, y, v in zip(ys, shifted, xs):
            sc.annotate(f"{v:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        sc.plot(
            [best["score"]],
            [best["shift_score"]],
            "*",
            color=_GREEN,
            ms=16,
            zorder=5,
            label="chosen (best in-distribution)",
        )
        fig.colorbar(points, ax=sc, label=param)
        sc.margins(0.08)
        sc.set_xlabel("in-distribution score")
        sc.set_ylabel("shifted score")
        sc.set_title(f"in-distribution vs shifted, one point per {param}", fontsize=10)
        sc.grid(alpha=0.3)
        sc.legend(fontsize=8)
    return _png(fig)


def learned_plot(learned: Mapping[str, Any]) -> bytes:
    """Learned-soup training: loss per step and the models' mixing coefficients per step.

    Args:
        learned: the ``"learned"`` section of a learned soup report (`LearnedSoupResult.to_dict`).

    Returns:
        PNG bytes.
    """
    losses = learned["losses"]
    coef = learned["coefficient_history"]  # per step: one (mean) coefficient per model
    names = short_labels(learned["ingredients"])
    fig, (ax, cx) = _figure(11.0, 4.2, 2)
    ax.plot(range(1, len(losses) + 1), losses, color=_BLUE, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (held-out data)")
    title = f"learned soup: {learned['steps']} steps, lr {learned['lr']:g}"
    if _finite(learned.get("score")) and _finite(learned.get("uniform_score")):
        title += f"\nscore {learned['score']:.4g} (uniform soup it started from: {learned['uniform_score']:.4g})"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    steps = range(0, len(coef))
    for k, name in enumerate(names):
        cx.plot(steps, [c[k] for c in coef], lw=1.5, label=name)
    per = (
        "mean over tensors of each model's coefficient"
        if learned["per_tensor"]
        else "mixing coefficient"
    )
    cx.set_xlabel("step")
    cx.set_ylabel(per)
    cx.set_title("coefficients (softmax of the learned logits)", fontsize=10)
    cx.grid(alpha=0.3)
    cx.legend(fontsize=7, loc="best")
    return _png(fig)


def plot_report(
    report: str | os.PathLike[str] | Mapping[str, Any], out: str | os.PathLike[str]
) -> Path:
    """Redraw the plot of a saved ``soupkit-report.json`` (greedy, sweep or learned section).

    Args:
        report: the report file (or folder holding it), or the parsed report.
        out: the PNG file to write.

    Returns:
        The written path.
    """
    if isinstance(report, Mapping):
        data = dict(report)
    else:
        path = Path(report)
        if path.is_dir():
            path = path / "soupkit-report.json"
        data = json.loads(path.read_text(encoding="utf-8"))
    for key, fn in (("greedy", greedy_plot), ("sweep", sweep_plot), ("learned", learned_plot)):
        if key in data:
            dest = Path(out)
            dest.write_bytes(fn(data[key]))
            return dest
    raise ValueError("the report has no 'greedy', 'sweep' or 'learned' section to plot")
