"""Flags shared by ``greedy``, ``sweep`` and ``learned``: evaluators, held-out sets, cache, BatchNorm.

An evaluator is either a user's Python object (``--evaluator pkg.mod:fn`` or ``file.py:fn``) or a
built-in Hugging Face evaluator (``--hf-classification DATA`` / ``--hf-perplexity TEXT``). Its
identity in the score cache is ``--evaluator-id`` if given, else the evaluator's ``cache_key``
attribute, else derived:

* user evaluators: the spec plus the SHA-256 of the module's source file: editing the module
  invalidates its scores; changing a data file the module reads does not (use
  ``--evaluator-id`` or ``--no-cache`` then);
* built-in evaluators: every constructor argument plus the SHA-256 of the data file and of the
  model folder's config and tokenizer files.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soupkit.errors import UsageError
from soupkit.evaluate.builtin import HFCausalLMPerplexityEvaluator, HFClassificationEvaluator
from soupkit.evaluate.identity import own_cache_key, spec_identity
from soupkit.evaluate.loader import load_evaluator
from soupkit.io.digest import sha256_file
from soupkit.search.cache import ScoreCache, default_cache_path

__all__ = [
    "add_bn_flags",
    "add_cache_flags",
    "add_evaluator_flags",
    "build_evaluator",
    "cli_record",
    "load_bn",
    "open_cli_cache",
]

_CARRY_HASHED = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def add_evaluator_flags(
    p: argparse.ArgumentParser, *, second: str | None, second_help: str
) -> None:
    """The evaluator flags; ``second`` (``"test"`` / ``"shift"``) adds ``--{second}-evaluator``
    and ``--{second}-data`` for a second evaluation set."""
    g = p.add_argument_group(
        "evaluation (exactly one of --evaluator, --hf-classification, --hf-perplexity)"
    )
    g.add_argument(
        "--evaluator",
        metavar="MOD:FN",
        help="your evaluator: 'package.module:name' or 'path/file.py:name', a callable "
        "state_dict -> float (higher is better)",
    )
    g.add_argument(
        "--hf-classification",
        metavar="DATA",
        help="built-in: accuracy of a Hugging Face sequence classifier on DATA (.csv, .tsv, .jsonl)",
    )
    g.add_argument(
        "--hf-perplexity",
        metavar="TEXT",
        help="built-in: negative perplexity of a causal LM on TEXT (.txt one document per line, or .csv/.jsonl)",
    )
    g.add_argument("--text-column", default="text", help="text column of DATA (default: text)")
    g.add_argument(
        "--text-pair-column", default=None, help="second text column for pair tasks (NLI)"
    )
    g.add_argument("--label-column", default="label", help="label column of DATA (default: label)")
    g.add_argument(
        "--metric",
        choices=["accuracy", "neg_loss"],
        default="accuracy",
        help="classification score (default: accuracy, which allows exact early rejection)",
    )
    g.add_argument(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="Hugging Face folder with config and tokenizer (default: the first checkpoint's folder)",
    )
    g.add_argument(
        "--batch-size", type=int, default=32, help="examples per forward pass (default 32)"
    )
    g.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="token limit per example (default: 128 for classification, 512 for perplexity)",
    )
    g.add_argument("--device", default="cpu", help="torch device for evaluation (default: cpu)")
    g.add_argument(
        "--eval-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype the built-in evaluators cast the weights to (default float32)",
    )
    g.add_argument(
        "--eval-autocast",
        choices=["bfloat16", "float16"],
        default=None,
        help="mixed-precision evaluation with torch.autocast: matrix products in this dtype, "
        "weights and norms in float32 (bfloat16 is ~2x faster on CPUs with AVX512-BF16)",
    )
    g.add_argument(
        "--evaluator-id",
        default=None,
        metavar="NAME",
        help="the evaluator's identity in the score cache (default: derived, see docs/soups.md)",
    )
    if second:
        g.add_argument(
            f"--{second}-evaluator",
            metavar="MOD:FN",
            default=None,
            help=second_help + " (your evaluator)",
        )
        g.add_argument(
            f"--{second}-data",
            metavar="FILE",
            default=None,
            help=second_help + " (same built-in evaluator on another file)",
        )


def add_sequential_flags(p: argparse.ArgumentParser, what: str) -> None:
    """``--sequential`` and its settings (greedy soup, sweep)."""
    g = p.add_argument_group(
        "paired sequential decisions (default: exact decisions on every example)"
    )
    g.add_argument(
        "--sequential",
        action="store_true",
        help=f"decide each {what} on as few examples as a paired sequential test needs: examples in "
        "a seeded random order, compared example by example, stop once the decision agrees with "
        "the exact one up to error probability --delta (needs per-example accuracy, e.g. "
        "--hf-classification)",
    )
    g.add_argument(
        "--delta",
        type=float,
        default=None,
        metavar="P",
        help="error probability of each sequential decision (default 0.01)",
    )
    g.add_argument(
        "--order-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the evaluation order (default 0)",
    )
    g.add_argument(
        "--sequential-batch",
        type=int,
        default=None,
        metavar="N",
        help="examples evaluated between two checks of the test (default 128)",
    )
    g.add_argument(
        "--margin",
        type=float,
        default=None,
        metavar="ACC",
        help="indifference margin in accuracy (e.g. 0.005): candidates closer than that may be decided "
        "either way, the others keep the --delta bound (default 0: every decision bounded)",
    )


def sequential_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``sequential=`` / ``delta=`` / ... keyword arguments; settings without --sequential are an error.

    The values themselves are checked by the search (``UsageError``, exit code 2).

    Raises:
        UsageError: --delta / --order-seed / --sequential-batch / --margin without --sequential.
    """
    names = ("delta", "order_seed", "sequential_batch", "margin")
    given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if not args.sequential:
        if given:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            raise UsageError(
                f"{flags} only apply with --sequential\nhint: add --sequential, or drop them"
            )
        return {}
    return {"sequential": True, **given}


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache",
        default=None,
        metavar="FILE",
        help=f"score cache (default: {default_cache_path()}; $SOUPKIT_CACHE_DIR moves it)",
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the score cache")


def add_bn_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recalibrate-bn",
        metavar="MOD:FN",
        default=None,
        help="recompute BatchNorm statistics of the written model: FN() returns (model, loader)",
    )
    p.add_argument(
        "--bn-batches",
        type=int,
        default=None,
        metavar="N",
        help="use at most N batches for --recalibrate-bn",
    )


def open_cli_cache(args: argparse.Namespace) -> ScoreCache:
    if args.no_cache:
        return ScoreCache(None)
    return ScoreCache(args.cache if args.cache else default_cache_path())


def cli_record(args: argparse.Namespace) -> dict[str, Any]:
    """The command and its parsed options, for the report (``"cli"``)."""
    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    return {"cli": {"command": f"soupkit {args.command}", "options": options}}


def _model_dir(args: argparse.Namespace, checkpoints: Sequence[str]) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    if not checkpoints:
        raise UsageError("--model-dir is needed when no checkpoint is given")
    first = Path(checkpoints[0])
    return first if first.is_dir() else first.parent


def _user(spec: str, given: str | None) -> tuple[Any, str]:
    ev = load_evaluator(spec)
    if given:
        return ev, given
    return ev, own_cache_key(ev) or spec_identity(spec)


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in _CARRY_HASHED:
        f = folder / name
        if f.is_file():
            h.update(f"{name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()[:16]


def _builtin(kind: str, data: str, args: argparse.Namespace, model_dir: Path) -> tuple[Any, str]:
    if not Path(data).is_file():
        raise UsageError(f"{data}: no such data file")
    if kind == "classification":
        kw: dict[str, Any] = {
            "text_column": args.text_column,
            "label_column": args.label_column,
            "text_pair_column": args.text_pair_column,
            "batch_size": args.batch_size,
            "max_length": args.max_length or 128,
            "device": args.device,
            "dtype": args.eval_dtype,
            "autocast": args.eval_autocast,
            "metric": args.metric,
        }
        ev: Any = HFClassificationEvaluator(model_dir, data, **kw)
    else:
        kw = {
            "text_column": args.text_column,
            "batch_size": args.batch_size,
            "max_length": args.max_length or 512,
            "device": args.device,
            "dtype": args.eval_dtype,
            "autocast": args.eval_autocast,
        }
        ev = HFCausalLMPerplexityEvaluator(model_dir, data, **kw)
    key = own_cache_key(ev)
    if key:
        return ev, key
    ident = json.dumps(
        {
            "kind": f"hf-{kind}",
            **kw,
            "data": sha256_file(Path(data)),
            "model_files": _folder_digest(model_dir),
        },
        sort_keys=True,
    )
    return ev, f"hf-{kind}|{Path(data).name}|" + hashlib.sha256(ident.encode()).hexdigest()[:24]


def build_evaluator(
    args: argparse.Namespace, checkpoints: Sequence[str], *, second: str | None = None
) -> tuple[Any, str, Any | None, str | None]:
    """``(evaluator, identity, second_evaluator, second_identity)`` from the flags.

    Raises:
        UsageError: no evaluator, more than one, or a second set that does not fit the first.
    """
    given = [f for f in ("evaluator", "hf_classification", "hf_perplexity") if getattr(args, f)]
    if len(given) != 1:
        names = ", ".join("--" + f.replace("_", "-") for f in given) or "none"
        raise UsageError(
            f"give exactly one of --evaluator, --hf-classification, --hf-perplexity (got {names})\n"
            "hint: e.g. --evaluator my_eval.py:accuracy, or --hf-classification val.csv"
        )
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    kind = given[0]
    if kind == "evaluator":
        ev, ident = _user(args.evaluator, args.evaluator_id)
    else:
        k = "classification" if kind == "hf_classification" else "perplexity"
        ev, ident = _builtin(k, getattr(args, kind), args, _model_dir(args, checkpoints))
        ident = args.evaluator_id or ident
    ev2 = ident2 = None
    if second:
        spec2, data2 = getattr(args, f"{second}_evaluator"), getattr(args, f"{second}_data")
        if spec2 and data2:
            raise UsageError(f"give --{second}-evaluator or --{second}-data, not both")
        if spec2:
            ev2, ident2 = _user(spec2, None)
        elif data2:
            if kind == "evaluator":
                raise UsageError(
                    f"--{second}-data needs a built-in evaluator (--hf-classification / --hf-perplexity)\n"
                    f"hint: with --evaluator, give your second set as --{second}-evaluator MOD:FN"
                )
            k = "classification" if kind == "hf_classification" else "perplexity"
            ev2, ident2 = _builtin(k, data2, args, _model_dir(args, checkpoints))
    return ev, ident, ev2, ident2


def load_bn(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """``(model, loader)`` from ``--recalibrate-bn MOD:FN`` (FN() returns them), or None."""
    spec = getattr(args, "recalibrate_bn", None)
    if not spec:
        return None
    fn = load_evaluator(spec)
    got = fn()  # type: ignore[call-arg]
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        raise UsageError(
            f"--recalibrate-bn {spec}: expected the function to return (model, loader), "
            f"got {type(got).__name__}"
        )
    model, loader = got
    if args.bn_batches is not None:
        loader = list(itertools.islice(loader, args.bn_batches))
    return model, loader
