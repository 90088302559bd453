#!/usr/bin/env python
"""Plot benchmark results: wall time and peak memory of each merge, per tool, from run.py's JSON.

    .venv/bin/python benchmarks/plot_results.py \\
        benchmarks/results/latest-kernels-elementwise.json \\
        benchmarks/results/latest-kernels-consensus.json \\
        benchmarks/results/latest-cold.json benchmarks/results/latest-x2.json \\
        --tools soupkit,soupkit-nohash,mergekit --out docs/img/benchmarks-issue17.png

One row per merge (recipe, inputs, warm or cold page cache); per tool a bar of the median wall
time with its min-max whisker, log scale, labelled with how many times faster than mergekit's
median it is when mergekit ran; a grey tick marks ``cat`` of the inputs (the read ceiling); and
a bar of the tool's peak private memory (RssAnon of its process tree). Tools a file skipped are
left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator  # noqa: E402

GIB = 1 << 30
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def rows(
    results: list[dict[str, Any]], tools: list[str] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per merge: its label, the cat ceiling and each tool's figures; and the tools in
    the order they first appear (or ``tools``)."""
    out: list[dict[str, Any]] = []
    seen: list[str] = []
    for res in results:
        meta = res["meta"]
        where = [Path(meta["data"]).name]
        if meta.get("cold"):
            where.append("cold")
        for rec in res["recipes"]:
            figures = {}
            for name, t in rec["tools"].items():
                if "skipped" in t or "median_wall_s" not in t or (tools and name not in tools):
                    continue
                figures[name] = t
                if name not in seen:
                    seen.append(name)
            if figures:
                cat = rec.get("cat", {}).get("median_s")
                out.append(
                    {"label": f"{rec['name']} ({', '.join(where)})", "cat": cat, "tools": figures}
                )
    order = [t for t in tools if t in seen] if tools else seen
    return out, order


def plot(results: list[dict[str, Any]], out: Path, tools: list[str] | None = None) -> Path:
    """Draw ``results`` (run.py JSON documents) into the PNG ``out``."""
    table, order = rows(results, tools)
    if not table:
        raise SystemExit("plot_results: no tool ran in these results (all skipped or filtered out)")
    n, k = len(table), len(order)
    height = 0.8 / k
    fig, (ax_t, ax_m) = plt.subplots(
        1, 2, figsize=(12, 1.0 + 0.75 * n), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    for j, tool in enumerate(order):
        ys, wall, lo, hi, mem, ys_m = [], [], [], [], [], []
        for i, row in enumerate(table):
            t = row["tools"].get(tool)
            if t is None:
                continue
            y = i + (j - (k - 1) / 2) * height
            ys.append(y)
            wall.append(t["median_wall_s"])
            lo.append(t["median_wall_s"] - t.get("min_wall_s", t["median_wall_s"]))
            hi.append(t.get("max_wall_s", t["median_wall_s"]) - t["median_wall_s"])
            if t.get("peak_private_bytes"):
                ys_m.append(y)
                mem.append(t["peak_private_bytes"] / GIB)
                ax_m.annotate(
                    f"{mem[-1]:.2f}", (mem[-1], y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7,
                )  # fmt: skip
            ref = row["tools"].get("mergekit")
            if tool != "mergekit" and ref is not None:
                ratio = ref["median_wall_s"] / t["median_wall_s"]
                ax_t.annotate(
                    f"{ratio:.1f}x", (t["median_wall_s"], y), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8,
                )  # fmt: skip
        color = COLORS[j % len(COLORS)]
        ax_t.barh(ys, wall, height=height, xerr=[lo, hi], color=color, label=tool, capsize=2)
        ax_m.barh(ys_m, mem, height=height, color=color)
    cats = [(i, row["cat"]) for i, row in enumerate(table) if row["cat"]]
    if cats:
        ax_t.scatter(
            [c for _, c in cats], [i for i, _ in cats], marker="|", s=400, color="0.4",
            zorder=3, label="cat of the inputs",
        )  # fmt: skip
    ax_t.set_yticks(range(n), [row["label"] for row in table])
    ax_t.invert_yaxis()
    ax_t.set_xscale("log")
    ax_t.set_xlabel("wall seconds (median, min-max; log scale); label: times faster than mergekit")
    ax_m.set_xscale("log")
    ax_m.set_xlabel("peak private memory, GiB (log scale)")
    mems = [
        t["peak_private_bytes"] / GIB for row in table for t in row["tools"].values()
        if t.get("peak_private_bytes")
    ]  # fmt: skip
    if mems:  # results from an older run.py may have no memory figures
        top = max(mems)
        ticks = [x for x in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64) if x <= top * 2]
        ax_m.set_xlim(right=top * 2.5)
        ax_m.xaxis.set_major_locator(FixedLocator(ticks))
        ax_m.set_xticklabels([f"{x:g}" for x in ticks])
        ax_m.xaxis.set_minor_locator(NullLocator())
        ax_m.xaxis.set_minor_formatter(NullFormatter())
    for ax in (ax_t, ax_m):
        ax.grid(axis="x", which="both", alpha=0.3)
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
               bbox_to_anchor=(0.5, 0.965), frameon=False)  # fmt: skip
    dates = sorted({r["meta"]["date"] for r in results})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    fig.suptitle(
        f"soupkit benchmarks ({results[0]['meta']['machine']['logical_cores']} cores; {when})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="run.py --results FILE.json files")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--tools", help="comma-separated tools to show (default: every tool that ran)")
    args = ap.parse_args(argv)
    docs = []
    for f in args.results:
        try:
            docs.append(json.loads(f.read_text()))
        except (OSError, ValueError) as e:
            print(f"plot_results: {f}: cannot read run.py results ({e})", file=sys.stderr)
            return 2
    tools = args.tools.split(",") if args.tools else None
    print(f"wrote {plot(docs, args.out, tools)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
