"""``soupkit lora fold|merge|extract``: PEFT LoRA adapters folded into their base, merged exactly,
or extracted from a full fine-tune."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit.adapters.lora import LoraResult, extract_lora, fold_lora, merge_loras
from soupkit.cli._common import command, examples, progress_flag
from soupkit.errors import UsageError


class _Intermixed(argparse.ArgumentParser):
    """Positionals may follow options (``A1 A2 --base B --rank 16 OUT``), as the examples show.

    argparse assigns a run of positionals all at once, so a plain parser would take ``A1 A2`` as
    the adapters and the output and then refuse ``OUT``; intermixed parsing collects them all.
    """

    _inner = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = command(
        sub,
        "lora",
        "fold PEFT LoRA adapters into their base, merge several exactly, or extract one",
        """
        soupkit lora fold ./adapter --base ./llama ./folded
        soupkit lora extract ./llama-ft --base ./llama --rank 16 ./adapter
        soupkit lora merge ./ad-math ./ad-code --base ./llama --method ties --param density=0.5 ./merged
        soupkit lora merge ./ad-a ./ad-b --base ./llama --method task_arithmetic --weights 0.6,0.4 --rank 16 ./ad-ab
    """,
    )
    lsub = p.add_subparsers(
        dest="lora_command", metavar="{fold,merge,extract}", required=True, parser_class=_Intermixed
    )

    f = lsub.add_parser(
        "fold",
        help="write W + scale * B @ A for every adapted module (PEFT's merge_and_unload)",
        description="Fold one or more LoRA adapters into their base model, streaming "
        "tensor by tensor. Several adapters are added one after the other.",
        epilog=examples("""
                            soupkit lora fold ./adapter --base ./llama ./folded
                            soupkit lora fold ./adapter --base ./llama ./folded --out-dtype bfloat16 --rounding peft
                        """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folder(s)")
    f.add_argument("out", help="output folder (Hugging Face layout)")
    f.add_argument(
        "--rounding",
        choices=["fp32", "peft"],
        default="fp32",
        help="fp32: add in float32 and round once (default); peft: PEFT's rounding for "
        "half-precision weights (identical for float32 weights)",
    )
    f.add_argument(
        "--tokenizer-source",
        choices=["base", "adapter"],
        default="base",
        help="copy tokenizer files from the base (default) or the adapter folder",
    )
    _shared(f)
    f.set_defaults(func=run_fold)

    m = lsub.add_parser(
        "merge",
        help="merge several adapters' deltas (B @ A) with any merge method",
        description="Merge LoRA adapters of one base exactly in weight space: each "
        "adapter's delta scale * B @ A is its task vector. Writes the full "
        "model, or with --rank a new adapter (truncated SVD; the relative "
        "error of each tensor is reported).",
        epilog=examples("""
                            soupkit lora merge ./a1 ./a2 --base ./llama --method ties --param density=0.5 ./merged
                            soupkit lora merge ./a1 ./a2 --base ./llama --method delta_linear --weights 2,1 --rank 16 ./a12
                            soupkit lora merge ./a1 ./a2 ./a3 --base ./llama --method dare_ties --param density=0.3 --seed 1 ./m
                        """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT adapter folders")
    m.add_argument("out", help="output folder")
    m.add_argument(
        "--method",
        default="task_arithmetic",
        help="merge method (see `soupkit methods`; default task_arithmetic): every method merges "
        "the deltas scale*B@A, e.g. delta_linear (their weighted average), except "
        "peft_linear (PEFT's combination_type='linear', a sum of the factors A and B); "
        "'linear' is refused as ambiguous",
    )
    m.add_argument(
        "--weights",
        default=None,
        help="comma-separated per-adapter weights (the `weight` parameter)",
    )
    m.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method parameter, e.g. density=0.5 or lambda=1.2 (repeatable; YAML values)",
    )
    m.add_argument(
        "--rank",
        type=int,
        default=None,
        help="write a new LoRA adapter of this rank instead of a full model",
    )
    m.add_argument("--seed", type=int, default=0, help="seed for stochastic methods (DARE)")
    _shared(m)
    m.set_defaults(func=run_merge)

    e = lsub.add_parser(
        "extract",
        help="a PEFT LoRA adapter of rank R from a full fine-tune (truncated SVD)",
        description="Extract a LoRA adapter from a full fine-tune: each module's weight "
        "difference W_ft - W_base, factored by its truncated SVD (the closest "
        "rank-R approximation), streamed module by module. Other changed tensors "
        "(norms, biases, embeddings) are stored whole (modules_to_save). The "
        "relative error of each module is printed and stored in the report.",
        epilog=examples("""
                            soupkit lora extract ./llama-ft --base ./llama --rank 16 ./adapter
                            soupkit lora extract ./llama-ft --base ./llama --rank 64 --out-dtype bfloat16 ./adapter
                        """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument(
        "fine_tuned", metavar="FINE_TUNED", help="the fine-tuned model (folder or .safetensors)"
    )
    e.add_argument("out", help="output adapter folder")
    e.add_argument("--base", required=True, help="the model it was fine-tuned from")
    e.add_argument("--rank", type=int, required=True, help="the LoRA rank r")
    e.add_argument(
        "--out-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="dtype of the factors (default float32)",
    )
    e.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    e.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    e.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin checkpoints (torch.load(weights_only=True))",
    )
    e.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write NaN/Inf factors instead of stopping (they are listed in the report)",
    )
    e.set_defaults(func=run_extract)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="the base model the adapters were trained on")
    p.add_argument(
        "--out-dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="output dtype (default: the base's / the adapters')",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument(
        "--max-shard-size", default=MAX_SHARD_SIZE, metavar="SIZE", help="largest output shard"
    )
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin checkpoints / adapter_model.bin (torch.load(weights_only=True))",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write NaN/Inf outputs instead of stopping (they are listed in the report)",
    )


def run_fold(args: argparse.Namespace) -> int:
    r = fold_lora(
        args.adapters,
        args.base,
        args.out,
        out_dtype=args.out_dtype,
        rounding=args.rounding,
        tokenizer_source=args.tokenizer_source,
        force=args.force,
        progress=progress_flag(args),
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(
        f"folded {len(args.adapters)} adapter(s) into {args.base}: {len(r.changed)} tensor(s) changed -> {r.out}"
    )
    for n in r.notes:
        print(f"note: {n}")
    return 0


def _params(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--param {item!r}: expected KEY=VALUE, e.g. density=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UsageError(f"--param {item!r}: the value is not valid YAML ({e})") from None
    return out


def run_merge(args: argparse.Namespace) -> int:
    model_parameters = None
    if args.weights:
        try:
            ws = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise UsageError(
                f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 0.6,0.4"
            ) from None
        if len(ws) != len(args.adapters):
            raise UsageError(
                f"--weights has {len(ws)} value(s) for {len(args.adapters)} adapter(s)"
            )
        model_parameters = [{"weight": w} for w in ws]
    r = merge_loras(
        args.adapters,
        args.base,
        args.out,
        method=args.method,
        parameters=_params(args.param),
        model_parameters=model_parameters,
        rank=args.rank,
        seed=args.seed,
        out_dtype=args.out_dtype,
        force=args.force,
        progress=progress_flag(args),
        max_shard_size=args.max_shard_size,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
    )
    for n in r.notes:
        print(f"note: {n}")
    if r.kind == "adapter":
        print(
            f"merged {len(args.adapters)} adapter(s) with {args.method} into a rank-{args.rank} adapter "
            f"({len(r.changed)} module(s)) -> {r.out}"
        )
        if args.method != "peft_linear":
            _print_errors(r)
    else:
        print(
            f"merged {len(args.adapters)} adapter(s) with {args.method} into {args.base}: "
            f"{len(r.changed)} tensor(s) changed -> {r.out}"
        )
    return 0


def _print_errors(r: LoraResult) -> None:
    errs = sorted(r.svd_errors.items(), key=lambda kv: -kv[1])
    overall = r.report.get("lora", {}).get("svd", {}).get("overall", 0.0)
    print(
        f"truncated SVD, relative Frobenius error: overall {overall:.3g}, max {r.max_svd_error:.3g}"
    )
    for name, e in errs[:5]:
        print(f"  {e:10.3g}  {name}")
    if len(errs) > 5:
        print(f"  ... {len(errs) - 5} more in soupkit-report.json")


def run_extract(args: argparse.Namespace) -> int:
    r = extract_lora(
        args.fine_tuned,
        args.base,
        args.out,
        rank=args.rank,
        out_dtype=args.out_dtype,
        force=args.force,
        progress=progress_flag(args),
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
    )
    for n in r.notes:
        print(f"note: {n}")
    whole = r.report["lora"]["stored_whole"]
    print(
        f"extracted a rank-{args.rank} LoRA of {args.fine_tuned} relative to {args.base}: "
        f"{len(r.changed)} module(s) factored, {len(whole)} tensor(s) stored whole -> {r.out}"
    )
    _print_errors(r)
    return 0
