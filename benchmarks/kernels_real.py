"""Do the native kernels write the torch path's bytes on trained weights?

The kernel tests (tests/kernels/) and `run.py` compare bytes on generated tensors and generated
checkpoints. This merges real fine-tunes, by default the demo's ingredients (all-MiniLM-L6-v2
fine-tuned on tweets by `make demo`: `.cache/demo/standard/models`, the shared start as base),
with every method that has a kernel, in bf16 and fp32 output, once with the kernels
(`SOUPKIT_KERNELS=1`) and once on the torch path (`SOUPKIT_KERNELS=0`), each a `soupkit merge`
process, and compares the sha256 of the written weights. Exit status 1 if any pair differs.

    make demo    # once, trains the ingredients
    .venv/bin/python benchmarks/kernels_real.py
    .venv/bin/python benchmarks/kernels_real.py --base BASE_DIR FT_DIR FT_DIR ...
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / ".cache" / "demo" / "standard" / "models"
SOUPKIT = REPO / ".venv" / "bin" / "soupkit"

#: method -> per-model parameters (a top-level ``seed`` is added for the stochastic ones)
CASES: dict[str, dict[str, Any]] = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.3},
    "dare_linear": {"weight": 0.5, "density": 0.5},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    "breadcrumbs": {"weight": 1.0, "density": 0.8, "gamma": 0.05},
}
SEEDED = {"dare_ties", "dare_linear", "della"}


def recipe(method: str, base: Path, fts: list[Path], out_dtype: str) -> dict[str, Any]:
    r: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(f), "parameters": dict(CASES[method])} for f in fts],
        "dtype": "float32",
        "out_dtype": out_dtype,
    }
    if method != "linear":
        r["base_model"] = str(base)
    if method in SEEDED:
        r["seed"] = 7
    return r


def merged_sha(recipe_file: Path, out: Path, kernels: str) -> str:
    r = subprocess.run(
        [
            str(SOUPKIT),
            "merge",
            str(recipe_file),
            str(out),
            "--force",
            "--no-progress",
            "--no-hash-inputs",
        ],
        env={**os.environ, "SOUPKIT_KERNELS": kernels},
        capture_output=True,
        text=True,
    )
    if r.returncode:
        sys.exit(f"soupkit merge {recipe_file} failed:\n{r.stderr[-2000:]}")
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, help="the base model folder (default: the demo's start)")
    ap.add_argument(
        "models", nargs="*", type=Path, help="fine-tuned folders (default: 4 demo ingredients)"
    )
    args = ap.parse_args()
    base = args.base or next(DEMO.glob("start-*"), None)
    fts = args.models or sorted(DEMO.glob("ft*"))[:4]
    if base is None or len(fts) < 2:
        sys.exit(f"no inputs: run `make demo` first (it writes {DEMO}), or pass --base and models")
    print(f"base {base}\nmodels {', '.join(f.name for f in fts)}\n")
    print("| method | output | kernels | torch path | same bytes |\n|---|---|---|---|---|")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for method in CASES:
            for dtype in ("bfloat16", "float32"):
                rf = Path(tmp) / f"{method}-{dtype}.yaml"
                rf.write_text(yaml.safe_dump(recipe(method, base, fts, dtype)))
                on = merged_sha(rf, Path(tmp) / "on", "1")
                off = merged_sha(rf, Path(tmp) / "off", "0")
                bad += on != off
                print(f"| {method} | {dtype} | {on} | {off} | {on == off} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
