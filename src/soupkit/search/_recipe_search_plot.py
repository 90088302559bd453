"""The plots of `soupkit.optimize`: the optimisation history and the best recipe per layer.

Drawn like every soupkit plot (`soupkit.search.report_plot`): a bare matplotlib ``Figure`` on the Agg
canvas, from JSON-ready data, so they can be redrawn from ``report.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from soupkit.planning.plan import MergePlan
from soupkit.recipe.params import _LAYER
from soupkit.recipe.schema import MergeConfig
from soupkit.search.report_plot import _BLUE, _GREEN, _GREY, _RED, _figure, _png, short_labels

__all__ = ["coefficients", "coefficients_plot", "history_plot"]


def history_plot(report: Mapping[str, Any]) -> bytes:
    """Validation score of every trial (pruned ones at their rejected upper bound), the best so
    far, and the held-out scores of the best few trials.

    Args:
        report: the optimize report (`OptimizeResult.to_dict`).
    """
    trials = report["trials"]
    fig, ax = _figure(7.2, 4.4)
    comp = [(t["number"], t["score"]) for t in trials if t["state"] == "complete"]
    pruned = [(t["number"], t["score"]) for t in trials if t["state"] != "complete"]
    if comp:
        ax.plot(*zip(*comp), "o", color=_BLUE, ms=4, label=f"trial ({len(comp)} complete)")
    if pruned:
        ax.plot(
            *zip(*pruned),
            "v",
            color=_GREY,
            ms=4,
            alpha=0.7,
            label=f"pruned ({len(pruned)}): upper bound, cannot beat the best",
        )
    best, xs, ys = -math.inf, [], []
    for t in sorted(trials, key=lambda t: t["number"]):
        if t["state"] == "complete" and t["score"] > best:
            best = t["score"]
        if best > -math.inf:
            xs.append(t["number"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color=_GREEN, lw=1.8, label="best so far (validation)")
    held = [
        (t["number"], t["holdout"]) for t in report.get("top", []) if t.get("holdout") is not None
    ]
    if held:
        ax.plot(
            *zip(*held), "D", color=_RED, ms=6, mfc="none", label="held-out score (best trials)"
        )
    b = report["best"]
    ax.plot(
        [b["number"]],
        [b["score"]],
        "*",
        color=_GREEN,
        ms=15,
        zorder=5,
        label=f"best: trial {b['number']} ({b['score']:.4g})",
    )
    ax.set_xlabel("trial")
    ax.set_ylabel("score (higher is better)")
    st = report["study"]
    ax.set_title(
        f"optimize: {st['sampler']} sampler, seed {st['seed']}, {len(trials)} trials", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def coefficients(p: MergePlan, cfg: MergeConfig) -> dict[str, Any]:
    """The best recipe's per-model numeric parameters as resolved per layer (the first tensor of
    each numbered layer, and ``other`` for the tensors outside the layers), from the plan."""
    reps: dict[str, str] = {}
    for job in p.jobs:
        if job.params is None:
            continue
        m = _LAYER.search(job.name)
        where = m.group(1) if m else "other"
        reps.setdefault(where, job.name)
    order = sorted((k for k in reps if k != "other"), key=int) + (
        ["other"] if "other" in reps else []
    )
    jobs = {j.name: j for j in p.jobs}
    labels = short_labels([e.model for e in cfg.models])
    series: list[dict[str, Any]] = []
    for key in p.method.per_model_names:
        rows: list[list[float]] = []
        for where in order:
            vals = getattr(jobs[reps[where]].params, key, None)
            if not isinstance(vals, tuple) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals
            ):
                rows = []
                break
            rows.append([float(v) for v in vals])
        if rows and any(
            len({r[i] for r in rows}) > 1 or rows[0][i] != p.method.params.per_model.get(key)
            for i in range(len(labels))
        ):
            for i, lab in enumerate(labels):
                series.append({"param": key, "model": lab, "values": [r[i] for r in rows]})
    return {"method": p.method.name, "layers": order, "series": series}


def coefficients_plot(coeffs: Mapping[str, Any]) -> bytes:
    """One panel per parameter: each model's value per layer."""
    params = list(dict.fromkeys(s["param"] for s in coeffs["series"]))
    fig, axes = _figure(max(6.0, 4.6 * len(params)), 4.2, len(params))
    axes = [axes] if len(params) == 1 else list(axes)
    xs = list(range(len(coeffs["layers"])))
    for ax, param in zip(axes, params):
        for s in (s for s in coeffs["series"] if s["param"] == param):
            ax.plot(xs, s["values"], "o-", ms=4, label=s["model"])
        ax.set_xticks(xs, [str(x) for x in coeffs["layers"]], fontsize=7)
        ax.set_xlabel("layer ('other': embeddings, head and the rest outside the layers)")
        ax.set_ylabel(param)
        ax.set_title(f"best trial ({coeffs['method']}): {param} per layer", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)
