#!/usr/bin/env python
"""Do two soupkit source trees write the same bytes? A check for refactors that must not change outputs.

Merges a set of recipes over the benchmark inputs (``generate.py`` output; ``--small`` by
default) twice, once with the sources of a git revision (``--ref``, exported with ``git
archive`` into a temporary folder) and once with the working tree's ``src/``, each in its own
``soupkit merge`` process, and compares the sha256 of every file the two outputs hold. The
recipes cover every streamed code path a merge can take: elementwise methods, per-tensor and
global TIES trims, DARE / DELLA randomness, Breadcrumbs, SLERP-family methods, Model Stock, both
conventions, ``compute: exact``, and a LoRA-free one-pass multi-output merge (``soupkit
wise-ft``).

    .venv/bin/python benchmarks/generate.py --small
    .venv/bin/python benchmarks/same_bytes.py --ref 5f0d0bb            # exit 0: all identical

Files that record when or how long (``soupkit-report.json``'s timings) are compared after
dropping those fields; everything else must be equal byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Fields of soupkit-report.json that legitimately differ between two runs.
VOLATILE = {"created_unix", "seconds"}


def recipes(data: Path) -> dict[str, dict[str, Any]]:
    """name -> mergekit-schema recipe over ``data/base`` and ``data/ft1..4``."""
    base = str(data / "base")
    fts = [str(data / f"ft{i}") for i in range(1, 5)]

    def over(
        method: str,
        params: Mapping[str, Any],
        top: Mapping[str, Any] | None = None,
        models: Sequence[str] = fts,
        with_base: bool = True,
    ) -> dict[str, Any]:
        r: dict[str, Any] = {"merge_method": method}
        if with_base:
            r["base_model"] = base
        r["models"] = [{"model": m, "parameters": dict(params)} for m in models]
        r["seed"] = 7
        r["dtype"] = "float32"
        r["out_dtype"] = "bfloat16"
        if top:
            r["parameters"] = dict(top)
        return r

    out = {
        "linear": over("linear", {"weight": 1.0}, with_base=False),
        "linear-normalize-off": over(
            "linear", {"weight": 0.3}, {"normalize": False}, with_base=False
        ),
        "task_arithmetic": over("task_arithmetic", {"weight": 0.5}),
        "ties": over("ties", {"weight": 1.0, "density": 0.5}),
        "ties-paper": over("ties", {"weight": 1.0, "density": 0.5}, {"convention": "paper"}),
        "ties-global": over(
            "ties", {"weight": 1.0, "density": 0.4}, {"convention": "paper", "trim_scope": "global"}
        ),
        "dare_ties": over("dare_ties", {"weight": 1.0, "density": 0.3}),
        "dare_linear": over("dare_linear", {"weight": 0.5, "density": 0.5}),
        "della": over("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
        "della_linear": over("della_linear", {"weight": 0.5, "density": 0.5, "epsilon": 0.1}),
        "breadcrumbs": over("breadcrumbs", {"weight": 1.0, "density": 0.8, "gamma": 0.05}),
        "breadcrumbs_ties": over(
            "breadcrumbs_ties", {"weight": 1.0, "density": 0.8, "gamma": 0.05}
        ),
        "model_stock": over("model_stock", {}),
        "sce": over("sce", {"weight": 1.0}, {"select_topk": 0.5}),
        "slerp": {
            "merge_method": "slerp",
            "base_model": fts[0],
            "models": [{"model": fts[0]}, {"model": fts[1]}],
            "parameters": {"t": 0.3},
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
        "nuslerp": over("nuslerp", {"weight": 0.5}, models=fts[:2], with_base=False),
        "ties-exact-bf16": {
            **over("ties", {"weight": 1.0, "density": 0.5}),
            "dtype": "bfloat16",
            "compute": "exact",
        },
        "task_arithmetic-exact": {
            **over("task_arithmetic", {"weight": 0.5}),
            "dtype": "bfloat16",
            "compute": "exact",
        },
    }
    return out


def export_src(rev: str, dest: Path) -> Path:
    """``git archive REV src/`` unpacked into ``dest``; returns the ``src`` folder."""
    dest.mkdir(parents=True, exist_ok=True)
    tar = dest / "src.tar"
    with open(tar, "wb") as fh:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], stdout=fh, check=True)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest / "src"


def _clean_report(data: bytes) -> bytes:
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VOLATILE}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return json.dumps(strip(json.loads(data)), sort_keys=True).encode()


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name.endswith("report.json"):
                data = _clean_report(data)
            out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def merge(
    src: Path, args: Sequence[str], env_extra: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(src), "SOUPKIT_HASH_CACHE": "0", **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "soupkit.cli", *args], env=env, capture_output=True, text=True
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", required=True, help="git revision whose src/ is the reference")
    ap.add_argument(
        "--src", type=Path, default=ROOT / "src", help="the sources to check (default: src/)"
    )
    ap.add_argument("--data", type=Path, default=HERE / "data" / "small", help="generate.py output")
    ap.add_argument("--only", help="comma-separated recipe names")
    a = ap.parse_args(argv)
    if not (a.data / "base").is_dir():
        print(f"no inputs in {a.data}: run benchmarks/generate.py --small first", file=sys.stderr)
        return 2
    todo = recipes(a.data)
    if a.only:
        todo = {k: v for k, v in todo.items() if k in a.only.split(",")}
    bad = 0
    with tempfile.TemporaryDirectory(prefix="soupkit-same-bytes-") as tmp:
        t = Path(tmp)
        ref_src = export_src(a.ref, t / "ref")
        cases: list[tuple[str, list[str]]] = []
        for name, r in todo.items():
            y = t / f"{name}.yaml"
            y.write_text(json.dumps(r))  # JSON is YAML
            cases.append((name, ["merge", str(y), "{out}"]))
        fts = [str(a.data / f"ft{i}") for i in (1, 2)]
        cases.append(
            (
                "wise-ft (one pass, 3 outputs)",
                ["wise-ft", fts[0], fts[1], "{out}", "--alpha", "0,0.3,1"],
            )
        )
        for name, argv_ in cases:
            outs = {}
            for label, src in (("ref", ref_src), ("new", a.src.resolve())):
                out = t / "out" / name.split()[0]  # one path: the report records it
                shutil.rmtree(out, ignore_errors=True)
                r = merge(src, [x.replace("{out}", str(out)) for x in argv_], {})
                if r.returncode != 0:
                    print(
                        f"{name}: {label} failed (exit {r.returncode}): {r.stderr.strip()[-400:]}"
                    )
                    bad += 1
                    break
                outs[label] = digests(out)
            else:
                same = outs["ref"] == outs["new"]
                bad += not same
                diff = sorted(
                    k
                    for k in outs["ref"].keys() | outs["new"].keys()
                    if outs["ref"].get(k) != outs["new"].get(k)
                )
                print(
                    f"{name:32s} {len(outs['ref']):3d} files  "
                    + ("identical" if same else f"DIFFERENT: {', '.join(diff)}")
                )
    print("all identical" if not bad else f"{bad} case(s) differ or failed")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
