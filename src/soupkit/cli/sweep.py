"""``soupkit sweep``: evaluate a merge over a grid of alpha / lambda / density, write the best."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.format import human_seconds
from soupkit.cli._backend import (
    add_backend_flags,
    distributed_lines,
    make_backend,
    remote_evaluators,
)
from soupkit.cli._common import command, progress_flag
from soupkit.cli._search_common import (
    add_bn_flags,
    add_cache_flags,
    add_evaluator_flags,
    add_sequential_flags,
    build_evaluator,
    cli_record,
    load_bn,
    open_cli_cache,
    sequential_options,
)
from soupkit.errors import UsageError
from soupkit.search.sweeps import SweepResult, sweep


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "sweep",
        "evaluate a merge over a grid of one parameter (alpha, lambda, density), keep the best",
        """
        # WiSE-FT: interpolate zero-shot and fine-tuned, in-distribution vs shifted scatter
        soupkit sweep --base ./zero-shot ./fine-tuned --values 0:1:11 \\
            --hf-classification id-val.csv --shift-data ood-val.csv --out ./wise-ft
        # task arithmetic: how much of the task vectors to add
        soupkit sweep --method task_arithmetic --base ./base ./ft-a ./ft-b --values 0.2,0.4,0.6,0.8,1 \\
            --evaluator my_eval.py:score --out ./ta
        # TIES density, with the paper's conventions (mergekit's are the default) and lambda fixed
        soupkit sweep --method ties --base ./base ./ft-a ./ft-b ./ft-c --values 0.1,0.2,0.3,0.5 \\
            --set convention=paper --set lambda=1.0 --evaluator my_eval.py:score --out ./ties
        # each point against the best so far by a paired sequential test, stopping early
        soupkit sweep --base ./zero-shot ./fine-tuned --values 0:1:11 --hf-classification val.csv \\
            --sequential --delta 0.01 --out ./wise-ft
        # every grid point at once on Ray workers (a local Ray instance, or --ray-address)
        soupkit sweep --backend ray --ray-num-gpus 1 --base ./zero-shot ./fine-tuned --values 0:1:21 \\
            --evaluator my_eval:score --out ./wise-ft
    """,
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="models to merge; for alpha: the fine-tuned one (with --base), or zero-shot then fine-tuned",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="output folder for the best merge, its report and plot",
    )
    p.add_argument(
        "--values",
        required=True,
        metavar="GRID",
        help="comma-separated values (0,0.5,1) or START:STOP:NUM (0:1:11, both ends included)",
    )
    p.add_argument(
        "--method",
        default=None,
        help="merge method (default for alpha: wise_ft, else linear with weights [1-alpha, alpha])",
    )
    p.add_argument(
        "--param",
        default=None,
        help="parameter to vary (default: alpha for wise_ft, lambda for task_arithmetic, density for ties/dare_*)",
    )
    p.add_argument("--base", default=None, metavar="CKPT", help="base / zero-shot model")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another global parameter, fixed over the sweep (repeatable; VALUE is read as YAML)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of stochastic methods (DARE)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="cast inputs first",
    )
    p.add_argument(
        "--out-dtype", choices=["float32", "float16", "bfloat16"], default=None, help="output dtype"
    )
    add_evaluator_flags(
        p,
        second="shift",
        second_help="second evaluation set (e.g. a distribution shift), "
        "scored at every point for the report and the ID-vs-shift scatter",
    )
    add_sequential_flags(p, "grid point against the best before it")
    add_cache_flags(p)
    add_bn_flags(p)
    add_backend_flags(p)
    p.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists and is not empty"
    )
    p.add_argument(
        "--max-shard-size",
        default=MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"largest output shard (default {MAX_SHARD_SIZE})",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write sweep.png")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.set_defaults(func=run)


def parse_grid(text: str) -> list[float]:
    """``"0,0.5,1"`` or ``"0:1:11"`` (inclusive linspace) -> values."""
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
            if num < 1:
                raise ValueError
            if num == 1:
                return [start]
            return [round(start + (stop - start) * i / (num - 1), 12) for i in range(num)]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"--values {text!r}: expected comma-separated numbers (0,0.5,1) or "
            "START:STOP:NUM (0:1:11)"
        ) from None


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lambda=1.0")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--set {item!r}: cannot read the value ({e})") from None
    return out


def run(args: argparse.Namespace) -> int:
    values = parse_grid(args.values)
    seq = sequential_options(args)
    first = [args.base] if args.base else args.checkpoints
    backend = make_backend(args)
    ev, ident, shift_ev, shift_ident = build_evaluator(args, first, second="shift")
    if backend is not None:  # workers build the evaluators themselves, under the same identities
        ev, shift_ev = remote_evaluators(args, first, "shift", ident, shift_ident)
    try:
        r = sweep(
            args.checkpoints,
            ev,
            values,
            args.out,
            method=args.method,
            param=args.param,
            base=args.base,
            parameters=parse_sets(args.set),
            seed=args.seed,
            dtype=args.dtype,
            out_dtype=args.out_dtype,
            shift_evaluator=shift_ev,
            cache=open_cli_cache(args),
            evaluator_id=ident,
            shift_evaluator_id=shift_ident,
            force=args.force,
            progress=progress_flag(args),
            plot=not args.no_plot,
            max_shard_size=args.max_shard_size,
            report_extra=cli_record(args),
            recalibrate=load_bn(args),
            backend=backend,
            **seq,
        )
    finally:
        if backend is not None:
            backend.close()
    print(summary(r))
    return 0


def summary(r: SweepResult) -> str:
    """The table printed after a sweep."""
    shift = r.shift_evaluator is not None
    lines = [f"{r.param:>10}  {'score':>10}" + (f"  {'shifted':>10}" if shift else "")]
    for pt in r.points:
        mark = "  <- best" if pt is r.best else ""
        if r.sequential is not None:
            mark += f"  on {pt.examples:,} examples" + (
                ""
                if pt.replaced_best is None
                else f"; {'better' if pt.replaced_best else 'not better'} than the best before it on {pt.examples_used:,} "
                f"(+{pt.better}/-{pt.worse} discordant, error <= {pt.error_bound:.2g})"
            )
        lines.append(
            f"{pt.value:>10g}  {pt.score:>10.6g}"
            + (f"  {pt.shift_score:>10.6g}" if shift and pt.shift_score is not None else "")
            + mark
        )
    lines.append("")
    if r.sequential is not None:
        seq = r.sequential
        lines.append(
            f"sequential decisions: delta {seq['delta']:g} each, order seed {seq['seed']}; "
            f"{seq['examples_evaluated']:,} examples evaluated for {len(r.points)} points of "
            f"{seq['examples']:,} examples each"
        )
    part = ""
    if (
        r.sequential is not None
        and r.best.examples is not None
        and r.best.examples < r.sequential["examples"]
    ):
        part = f" (on {r.best.examples:,} of {r.sequential['examples']:,} examples)"
    lines.append(
        f"{r.method}: best {r.param}={r.best.value:g} with score {r.best.score:.6g}{part}; "
        f"{r.evaluations} evaluations, {r.cache_hits} from the cache"
    )
    lines += distributed_lines(r.distributed)
    lines.append(
        f"wrote {r.out} (soupkit-report.json has every point"
        + (f", plot {r.plot.name}" if r.plot else "")
        + f") in {human_seconds(r.seconds)}"
    )
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
