"""``soupkit greedy --evaluator MOD:FN --out OUT_DIR CKPT [CKPT ...]``: greedy soup."""

from __future__ import annotations

import argparse

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
from soupkit.search.greedy import GreedySoupResult, greedy_soup
from soupkit.search.report_plot import short_labels


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "greedy",
        "greedy soup: add ingredients best-first while the held-out score does not drop",
        """
        soupkit greedy --evaluator my_eval.py:accuracy --out ./soup runs/*/checkpoint-best
        soupkit greedy --hf-classification val.csv --test-data test.csv --out ./soup ft-*/
        soupkit greedy --hf-classification val.csv --text-column sentence --label-column label \\
            --model-dir ./ft-01 --batch-size 64 --device cuda --out ./soup ft-*/
        soupkit greedy --evaluator my_eval:score --strict --no-cache --out ./soup a b c
        # decide each candidate on as few examples as a paired sequential test needs
        soupkit greedy --hf-classification val.csv --sequential --delta 0.01 --order-seed 0 --out ./soup ft-*/
        # on a Ray cluster: one GPU per evaluation, checkpoints on shared storage
        soupkit greedy --backend ray --ray-address auto --ray-num-gpus 1 \\
            --evaluator my_eval:score --out /shared/soup /shared/runs/*/checkpoint-best
    """,
    )
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="fine-tuned checkpoints (files or folders) of one architecture",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="output folder for the soup, its report and plot",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="accept an ingredient only if the score improves (>, the reference code); default >= (the paper)",
    )
    p.add_argument(
        "--no-early-stop",
        action="store_true",
        help="evaluate every candidate on every example (default: stop once it cannot reach the soup)",
    )
    add_evaluator_flags(
        p,
        second="test",
        second_help="held-out test set: the soup and the best single "
        "ingredient are also scored on it",
    )
    add_sequential_flags(p, "candidate soup")
    add_cache_flags(p)
    add_bn_flags(p)
    add_backend_flags(p, speculate=True)
    p.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists and is not empty"
    )
    p.add_argument(
        "--max-shard-size",
        default=MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"largest output shard (default {MAX_SHARD_SIZE})",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write greedy-soup.png")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    seq = sequential_options(args)
    backend = make_backend(args)
    ev, ident, test_ev, test_ident = build_evaluator(args, args.checkpoints, second="test")
    if backend is not None:  # workers build the evaluators themselves, under the same identities
        ev, test_ev = remote_evaluators(args, args.checkpoints, "test", ident, test_ident)
    try:
        r = greedy_soup(
            args.checkpoints,
            ev,
            args.out,
            strict=args.strict,
            early_stop=not args.no_early_stop,
            test_evaluator=test_ev,
            cache=open_cli_cache(args),
            evaluator_id=ident,
            test_evaluator_id=test_ident,
            force=args.force,
            progress=progress_flag(args),
            plot=not args.no_plot,
            max_shard_size=args.max_shard_size,
            report_extra=cli_record(args),
            recalibrate=load_bn(args),
            backend=backend,
            speculate=getattr(args, "speculate", None),
            **seq,
        )
    finally:
        if backend is not None:
            backend.close()
    print(summary(r))
    return 0


def summary(r: GreedySoupResult) -> str:
    """The table printed after a greedy soup."""
    names = dict(
        zip(
            [s.label for s in r.ingredient_scores],
            short_labels([s.label for s in r.ingredient_scores]),
        )
    )
    width = max(len(n) for n in names.values())
    steps = {s.label: s for s in r.steps}
    lines = [f"{'rank':>4}  {'ingredient':<{width}}  {'alone':>9}  {'soup with it':>12}  decision"]
    for s in sorted(r.ingredient_scores, key=lambda s: s.rank):
        st = steps.get(s.label)
        if st is None:
            cand, decision = "", "start (best alone)"
        elif st.test == "sequential":
            cand = f"~{st.candidate_score:.4g}" if not st.complete else f"{st.candidate_score:.6g}"
            decision = (
                f"{'accepted' if st.accepted else 'rejected'} on {st.examples_used:,}/{st.total:,} "
                f"examples (+{st.better}/-{st.worse} discordant, error <= {st.error_bound:.2g})"
            )
        else:
            cand = f"{st.candidate_score:.6g}" if st.complete else f"<={st.candidate_score:.4g}"
            decision = (
                "accepted" if st.accepted else ("rejected early" if not st.complete else "rejected")
            )
        lines.append(
            f"{s.rank:>4}  {names[s.label]:<{width}}  {s.score:>9.6g}  {cand:>12}  {decision}"
        )
    rule = ">" if r.strict else ">="
    lines.append("")
    seq = r.sequential
    lines.append(
        f"greedy soup ({rule}): {len(r.ingredients)} of {len(r.ingredient_scores)} ingredients, "
        f"score {r.score:.6g}"
        + (f" on {seq['score_examples']:,} of {seq['examples']:,} examples" if seq else "")
        + f" (best single {r.best_single.score:.6g})"
    )
    saved = "saved by the sequential test" if seq else "saved by early rejection"
    lines.append(
        f"evaluations: {r.evaluations} run, {r.cache_hits} from the cache; examples evaluated "
        f"{r.examples_evaluated:,}, {saved} {r.examples_saved:,}"
    )
    if seq:
        lines.append(
            f"sequential decisions: delta {seq['delta']:g} each, order seed {seq['seed']}; any of the "
            f"{len(r.steps)} differs from the exact mode's with probability <= "
            f"{seq['any_decision_differs_at_most']:.3g}"
            + (
                f" (for candidates more than {seq['margin']:g} from the soup)"
                if seq["margin"]
                else ""
            )
        )
    if r.held_out is not None:
        lines.append(
            f"held-out test: soup {r.held_out.soup_score:.6g}, best single "
            f"{r.held_out.best_single_score:.6g} ({names.get(r.held_out.best_single, r.held_out.best_single)})"
        )
    lines += distributed_lines(r.distributed)
    lines.append(
        f"wrote {r.out} (soupkit-report.json has the history"
        + (f", plot {r.plot.name}" if r.plot else "")
        + f") in {human_seconds(r.seconds)}"
    )
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
