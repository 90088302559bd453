"""Flags of ``greedy`` and ``sweep`` that choose where evaluations run: ``--backend local|ray``.

With ``--backend ray`` the evaluators are rebuilt on every Ray worker rather than shipped: a
``--evaluator MOD:FN`` is imported there by its import string; a built-in Hugging Face
evaluator (``--hf-classification`` / ``--hf-perplexity``) is constructed there by the same code
and flags as here (`build_cli_evaluator`). Their cache identities are the ones a local run
derives, so local and Ray runs share the score cache.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from soupkit.backends import RayBackend, RemoteEvaluator
from soupkit.cli._search_common import build_evaluator
from soupkit.errors import UsageError

__all__ = [
    "add_backend_flags",
    "build_cli_evaluator",
    "distributed_lines",
    "make_backend",
    "remote_evaluators",
]

_RAY_FLAGS = (
    "ray_address",
    "ray_num_cpus",
    "ray_num_gpus",
    "ray_memory",
    "ray_workers",
    "ray_max_retries",
)
# The flags a built-in evaluator is built from (see soupkit.cli._search_common.build_evaluator).
_EVAL_FLAGS = (
    "evaluator",
    "hf_classification",
    "hf_perplexity",
    "text_column",
    "text_pair_column",
    "label_column",
    "metric",
    "model_dir",
    "batch_size",
    "max_length",
    "device",
    "eval_dtype",
    "eval_autocast",
)


def add_backend_flags(p: argparse.ArgumentParser, *, speculate: bool = False) -> None:
    """``--backend`` and the ``--ray-*`` flags (``--speculate`` for greedy soup)."""
    g = p.add_argument_group("where evaluations run (Ray needs: pip install 'soupkit[ray]')")
    g.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: one evaluation after another in this process (default); ray: as Ray tasks "
        "on a local Ray instance or a cluster (workers read checkpoints from shared storage)",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="Ray cluster to join, e.g. auto or HEAD:6379 (default: $RAY_ADDRESS, else start a "
        "local Ray instance)",
    )
    g.add_argument(
        "--ray-num-cpus",
        type=float,
        default=None,
        metavar="N",
        help="CPUs per evaluation (default 1)",
    )
    g.add_argument(
        "--ray-num-gpus",
        type=float,
        default=None,
        metavar="N",
        help="GPUs per evaluation (default 0; 0.5 puts two evaluations on a GPU)",
    )
    g.add_argument(
        "--ray-memory",
        default=None,
        metavar="SIZE",
        help="memory per evaluation for Ray's scheduler, e.g. 40GB (default: not reserved)",
    )
    g.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        metavar="N",
        help="at most N evaluations at once (default: as many as the cluster's resources fit)",
    )
    g.add_argument(
        "--ray-max-retries",
        type=int,
        default=None,
        metavar="N",
        help="resubmit an evaluation whose worker died up to N times (default 3)",
    )
    g.add_argument(
        "--ray-retry-exceptions",
        action="store_true",
        help="also resubmit an evaluation whose evaluator raised (transient errors, e.g. CUDA OOM)",
    )
    if speculate:
        g.add_argument(
            "--speculate",
            type=int,
            default=None,
            metavar="N",
            help="evaluate up to N candidates of later greedy steps ahead, under accept and reject "
            "hypotheses; stale ones are cancelled (default: workers - 1; 0: off)",
        )


def make_backend(args: argparse.Namespace) -> RayBackend | None:
    """The backend the flags ask for (``None``: local), not connected yet.

    Raises:
        UsageError: ``--ray-*`` / ``--speculate`` without ``--backend ray``, or invalid values.
    """
    given = [f for f in _RAY_FLAGS if getattr(args, f, None) is not None]
    if getattr(args, "ray_retry_exceptions", False):
        given.append("ray_retry_exceptions")
    if getattr(args, "speculate", None) is not None:
        given.append("speculate")
        if args.speculate < 0:
            raise UsageError(f"--speculate must be 0 or more, got {args.speculate}")
    if args.backend != "ray":
        if given:
            names = ", ".join("--" + f.replace("_", "-") for f in given)
            raise UsageError(
                f"{names} only apply with --backend ray (got --backend {args.backend})\n"
                "hint: add --backend ray, or drop them"
            )
        return None
    return RayBackend(
        address=args.ray_address,
        num_cpus=1.0 if args.ray_num_cpus is None else args.ray_num_cpus,
        num_gpus=0.0 if args.ray_num_gpus is None else args.ray_num_gpus,
        memory=args.ray_memory,
        max_workers=args.ray_workers,
        max_retries=3 if args.ray_max_retries is None else args.ray_max_retries,
        retry_exceptions=args.ray_retry_exceptions,
    )


def build_cli_evaluator(flags: dict[str, Any], checkpoints: list[str], data: str | None) -> Any:
    """Build the evaluator the CLI flags describe, on a worker (``data``: use this file instead of
    the built-in evaluator's, for the second evaluation set)."""
    ns = argparse.Namespace(**flags, evaluator_id="worker")
    if data is not None:
        kind = "hf_classification" if flags.get("hf_classification") else "hf_perplexity"
        setattr(ns, kind, data)
    return build_evaluator(ns, checkpoints, second=None)[0]


def remote_evaluators(
    args: argparse.Namespace,
    checkpoints: Sequence[str],
    second: str | None,
    ident: str,
    second_ident: str | None,
) -> tuple[RemoteEvaluator, RemoteEvaluator | None]:
    """The evaluators of the flags, as workers build them (keeping the identities given)."""
    flags = {f: getattr(args, f, None) for f in _EVAL_FLAGS}
    cwd = os.getcwd()
    if args.evaluator:
        main = RemoteEvaluator.from_spec(args.evaluator, key=ident, cwd=cwd)
    else:
        main = RemoteEvaluator.from_factory(
            build_cli_evaluator, flags, list(checkpoints), None, key=ident
        )
    extra = None
    if second:
        spec2, data2 = (
            getattr(args, f"{second}_evaluator", None),
            getattr(args, f"{second}_data", None),
        )
        if spec2:
            extra = RemoteEvaluator.from_spec(spec2, key=second_ident, cwd=cwd)
        elif data2:
            extra = RemoteEvaluator.from_factory(
                build_cli_evaluator, flags, list(checkpoints), data2, key=second_ident
            )
    return main, extra


def distributed_lines(d: dict[str, Any] | None) -> list[str]:
    """What the backend did, for the summary printed after a search."""
    if not d:
        return []
    speed = f", speed-up {d['speedup']:.2f}x" if d.get("speedup") else ""
    lines = [
        f"backend {d['backend']}: {d.get('workers', 1)} worker slot(s), {d['jobs']} job(s) on "
        f"{d['worker_processes']} worker process(es), {d['evaluator_builds']} evaluator build(s); "
        f"worker time {d['busy_seconds']:.2f}s in {d['wall_seconds']:.2f}s wall{speed}"
    ]
    spec = d.get("speculation")
    if spec and spec["depth"]:
        lines.append(
            f"speculation (up to {spec['depth']} ahead): {spec['launched']} launched, {spec['used']} used, "
            f"{spec['wasted']} wasted ({spec['wasted_seconds']:.2f}s), {spec['cancelled']} cancelled"
        )
    if d.get("retries"):
        lines.append(
            f"retried {len(d['retries'])} failed attempt(s); see the notes and soupkit-report.json"
        )
    return lines
