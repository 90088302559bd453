"""``soupkit learned``: learn mixing coefficients on held-out labelled data (ingredients streamed)."""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.format import human_seconds
from soupkit.cli._common import command, progress_flag
from soupkit.cli._search_common import cli_record
from soupkit.errors import UsageError
from soupkit.evaluate.builtin import HFClassificationEvaluator
from soupkit.evaluate.loader import load_evaluator
from soupkit.search.learned import LearnedSoupResult, classification_loss, learned_soup
from soupkit.search.report_plot import short_labels


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "learned",
        "learned soup: train per-model (or per-tensor) mixing coefficients on held-out data",
        """
        soupkit learned --hf-classification heldout.csv --out ./learned ft-*/
        soupkit learned --hf-classification heldout.csv --per-tensor --steps 200 --lr 0.02 \\
            --test-data test.csv --out ./learned ft-*/
        soupkit learned --setup my_setup.py:setup --evaluator my_eval.py:accuracy --out ./learned a b c
    """,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="the ingredients (at least 2)")
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="output folder for the soup, its report and plot",
    )
    src = p.add_argument_group(
        "model and training data (exactly one of --hf-classification, --setup)"
    )
    src.add_argument(
        "--hf-classification",
        metavar="DATA",
        help="held-out labelled DATA (.csv/.tsv/.jsonl) for a Hugging Face sequence classifier; "
        "the loss is cross-entropy",
    )
    src.add_argument(
        "--setup",
        metavar="MOD:FN",
        help="FN() returns a dict: model (required), data (re-iterable batches, required), "
        "loss_fn(model, batch) (default: cross-entropy), bn_data (batches for BatchNorm recalibration)",
    )
    src.add_argument("--text-column", default="text", help="text column of DATA (default: text)")
    src.add_argument("--text-pair-column", default=None, help="second text column for pair tasks")
    src.add_argument(
        "--label-column", default="label", help="label column of DATA (default: label)"
    )
    src.add_argument(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="Hugging Face folder with config and tokenizer (default: the first checkpoint's folder)",
    )
    src.add_argument("--batch-size", type=int, default=16, help="examples per step (default 16)")
    src.add_argument(
        "--max-length", type=int, default=128, help="token limit per example (default 128)"
    )
    src.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    t = p.add_argument_group("training")
    t.add_argument(
        "--steps", type=int, default=100, help="optimisation steps, one batch each (default 100)"
    )
    t.add_argument(
        "--lr", type=float, default=0.05, help="AdamW learning rate of the logits (default 0.05)"
    )
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument(
        "--per-tensor",
        action="store_true",
        help="one coefficient per model and tensor (default: per model)",
    )
    t.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    t.add_argument("--seed", type=int, default=0, help="seed of the batch order (default 0)")
    e = p.add_argument_group("scoring the result (optional)")
    e.add_argument(
        "--evaluator", metavar="MOD:FN", default=None, help="score the learned and the uniform soup"
    )
    e.add_argument(
        "--test-data",
        metavar="FILE",
        default=None,
        help="with --hf-classification: score the learned and the uniform soup's accuracy on FILE",
    )
    p.add_argument(
        "--force", action="store_true", help="replace OUT_DIR if it exists and is not empty"
    )
    p.add_argument(
        "--max-shard-size",
        default=MAX_SHARD_SIZE,
        metavar="SIZE",
        help=f"largest output shard (default {MAX_SHARD_SIZE})",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write learned-soup.png")
    p.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    p.set_defaults(func=run)


def _model_dir(args: argparse.Namespace) -> str:
    if args.model_dir:
        return str(args.model_dir)
    first = Path(args.checkpoints[0])
    return str(first if first.is_dir() else first.parent)


def _hf(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """The classifier and its labelled batches, tokenized by the built-in evaluator's code."""
    ev = HFClassificationEvaluator(
        _model_dir(args),
        args.hf_classification,
        text_column=args.text_column,
        label_column=args.label_column,
        text_pair_column=args.text_pair_column,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
    )
    model = ev.model
    model.requires_grad_(True)  # the evaluator froze it; the coefficients need parameter gradients
    model.eval()  # no dropout: the loss is a function of the coefficients alone
    data = ev.labelled_batches()
    random.Random(args.seed).shuffle(data)  # batches come sorted by length; mix them
    return model, data


def _setup(spec: str) -> Mapping[str, Any]:
    got = load_evaluator(spec)()  # type: ignore[call-arg]
    if not isinstance(got, Mapping) or "model" not in got or "data" not in got:
        raise UsageError(
            f"--setup {spec}: expected FN() to return a dict with 'model' and 'data' "
            f"(optional 'loss_fn', 'bn_data'), got {type(got).__name__}"
            + (f" with keys {sorted(got)}" if isinstance(got, Mapping) else "")
        )
    unknown = set(got) - {"model", "data", "loss_fn", "bn_data"}
    if unknown:
        raise UsageError(
            f"--setup {spec}: unknown key(s) {sorted(unknown)}; expected model, data, loss_fn, bn_data"
        )
    return got


def run(args: argparse.Namespace) -> int:
    if bool(args.hf_classification) == bool(args.setup):
        raise UsageError("give exactly one of --hf-classification DATA and --setup MOD:FN")
    if args.test_data and not args.hf_classification:
        raise UsageError(
            "--test-data needs --hf-classification; with --setup, score with --evaluator"
        )
    if args.test_data and args.evaluator:
        raise UsageError("give --evaluator or --test-data, not both")
    loss_fn, bn_data = classification_loss, None
    if args.setup:
        s = _setup(args.setup)
        model, data = s["model"], s["data"]
        loss_fn = s.get("loss_fn") or classification_loss
        bn_data = s.get("bn_data")
    else:
        model, data = _hf(args)
    evaluator = None
    if args.evaluator:
        evaluator = load_evaluator(args.evaluator)
    elif args.test_data:
        evaluator = HFClassificationEvaluator(
            _model_dir(args),
            args.test_data,
            text_column=args.text_column,
            label_column=args.label_column,
            text_pair_column=args.text_pair_column,
            batch_size=args.batch_size,
            max_length=args.max_length,
            device=args.device,
        )
    r = learned_soup(
        args.checkpoints,
        data,
        args.out,
        model=model,
        loss_fn=loss_fn,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        per_tensor=args.per_tensor,
        temperature=args.temperature,
        evaluator=evaluator,
        recalibrate_bn_data=bn_data,
        force=args.force,
        progress=progress_flag(args),
        plot=not args.no_plot,
        max_shard_size=args.max_shard_size,
        report_extra=cli_record(args),
    )
    print(summary(r))
    return 0


def summary(r: LearnedSoupResult) -> str:
    """The table printed after a learned soup."""
    names = short_labels(r.ingredients)
    width = max(len(n) for n in names)
    mean = r.coefficient_history[-1]
    head = "mean coefficient" if r.per_tensor else "coefficient"
    lines = [f"{'ingredient':<{width}}  {head:>16}"]
    lines += [f"{n:<{width}}  {c:>16.4f}" for n, c in zip(names, mean)]
    lines.append("")
    if r.losses:
        lines.append(
            f"loss {r.losses[0]:.4g} -> {r.losses[-1]:.4g} over {r.steps} steps (lr {r.lr:g}"
            + (", per tensor" if r.per_tensor else "")
            + ")"
        )
    if r.score is not None:
        lines.append(f"score: learned soup {r.score:.6g}, uniform soup {r.uniform_score:.6g}")
    lines.append(
        f"wrote {r.out} (soupkit-report.json has the coefficients and losses"
        + (f", plot {r.plot.name}" if r.plot else "")
        + f") in {human_seconds(r.seconds)}"
    )
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
