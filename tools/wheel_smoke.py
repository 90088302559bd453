"""Install a built wheel into a fresh venv and use it as a new user would (``make smoke``).

    python tools/wheel_smoke.py dist/soupkit-*.whl [--constraints constraints.txt] [--dir DIR]

The venv (in ``--dir``, by default ``$TMPDIR/soupkit-wheel-smoke``, emptied first and left for
inspection) gets torch first (``pip install torch==<pin>``, the CPU wheel here), then the wheel
with ``-c constraints.txt``: a plain install, no extras. Everything then runs from a temporary
directory with a clean environment (no PYTHONPATH), so a module, data file or entry point
missing from the wheel fails here instead of working by accident from the source tree. Checks:

- the CLI (``--help``, ``--version``, ``methods``, ``inspect``, ``validate``, ``plan``,
  ``merge``) exits 0 and prints nothing on stderr (no warning such as torch's "Failed to
  initialize NumPy" on a plain install);
- the Python API is the installed copy (``soupkit.__file__`` inside the venv) and merges with
  the expected numbers, from files and in memory; ``py.typed`` and the native kernels
  (``soupkit.kernels``) are shipped;
- a feature whose extra is missing (``--backend ray``, the Hugging Face evaluators) fails with
  the ``pip install 'soupkit[EXTRA]'`` command and no traceback.

Exit code 0 when every check passes; prints the time each phase took. The venv is removed at
the start of the next run rather than at the end (deleting torch's files takes a while).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the fresh venv, from the temporary directory: the Python API as a user calls it.
API_CHECK = r"""
import json, sys, warnings
from pathlib import Path
warnings.simplefilter("error")
venv, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import importlib.resources, importlib.metadata
import torch
from safetensors.torch import load_file
import soupkit

where = Path(soupkit.__file__).resolve()
assert venv in where.parents, f"soupkit imported from {where}, not from the venv {venv}"
assert soupkit.__version__ == importlib.metadata.version("soupkit"), soupkit.__version__
assert importlib.resources.files("soupkit").joinpath("py.typed").is_file(), "py.typed missing"
import soupkit.kernels  # the wheel ships the native kernels, built for this CPU family
assert soupkit.kernels.available(), "soupkit.kernels not available from the wheel"

a, b = load_file(work / "a.safetensors"), load_file(work / "b.safetensors")
res = soupkit.uniform_soup([work / "a.safetensors", work / "b.safetensors"], work / "api-soup",
                           progress=False)
out = load_file(work / "api-soup" / "model.safetensors")
for name in a:
    assert torch.equal(out[name], (a[name] + b[name]) / 2), name
report = json.loads((work / "api-soup" / "soupkit-report.json").read_text())
assert report["soupkit_version"] == soupkit.__version__, report.keys()

mem = soupkit.merge_state_dicts([a, b], "task_arithmetic", base=a)  # a + (a - a) + (b - a)
for name in a:
    assert torch.equal(mem[name], a[name] + (b[name] - a[name])), name

from soupkit.evaluate import HFClassificationEvaluator
try:
    HFClassificationEvaluator("x", work / "val.csv")
except soupkit.EvaluationError as e:
    assert "pip install 'soupkit[eval]'" in str(e), str(e)
else:
    raise AssertionError("HFClassificationEvaluator worked without the eval extra")
print("api ok:", where)
"""


def run(
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    code: int = 0,
    quiet: bool = True,
    what: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run a command; fail with its output unless it exits ``code`` (and, if ``quiet``, with an
    empty stderr)."""
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    bad = r.returncode != code or (quiet and r.stderr.strip())
    if bad:
        sys.exit(
            f"wheel smoke test FAILED: {what or ' '.join(cmd)}\n  exit code {r.returncode} "
            f"(expected {code})\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
        )
    return r


def torch_pin(constraints: Path) -> str:
    for line in constraints.read_text().splitlines():
        if re.match(r"^torch==", line.strip()):
            return line.strip()
    return "torch"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--constraints", type=Path, default=ROOT / "constraints.txt")
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "soupkit-wheel-smoke",
        help="where the venv and the work folder go (emptied first)",
    )
    args = ap.parse_args(argv)
    wheel, constraints = args.wheel.resolve(), args.constraints.resolve()
    if not wheel.is_file() or wheel.suffix != ".whl":
        sys.exit(f"wheel smoke test: {wheel} is not a wheel file; run `make dist` first")

    tmp = args.dir.resolve()
    t = time.perf_counter()
    shutil.rmtree(tmp, ignore_errors=True)
    venv, work = tmp / "venv", tmp / "work"
    work.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        PYTHONNOUSERSITE="1",
    )
    py, exe = str(venv / "bin" / "python"), str(venv / "bin" / "soupkit")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    times: dict[str, float] = {"clean": time.perf_counter() - t}

    t = time.perf_counter()
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", str(venv)], cwd=work, env=env, quiet=False)
    run(pip + [torch_pin(constraints)], cwd=work, env=env, quiet=False, what="pip install torch")
    times["venv + torch"] = time.perf_counter() - t
    t = time.perf_counter()
    run(
        pip + ["-c", str(constraints), str(wheel)],
        cwd=work,
        env=env,
        quiet=False,
        what=f"pip install {wheel.name}",
    )
    times["install wheel"] = time.perf_counter() - t

    t = time.perf_counter()
    run(
        [
            py,
            "-c",
            textwrap.dedent("""
        import torch
        from safetensors.torch import save_file
        g = torch.Generator().manual_seed(0)
        for name in ("a", "b"):
            save_file({"layer.weight": torch.randn(8, 4, generator=g),
                       "layer.bias": torch.randn(8, generator=g)}, f"{name}.safetensors")
        """),
        ],
        cwd=work,
        env=env,
        what="write two tiny checkpoints",
    )
    (work / "soup.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: a.safetensors\n  - model: b.safetensors\n"
    )
    (work / "val.csv").write_text("text,label\nhello,0\n")
    out = run([exe, "--help"], cwd=work, env=env).stdout
    assert "merge" in out and "greedy" in out, out
    version = run([exe, "--version"], cwd=work, env=env).stdout
    assert version.startswith("soupkit "), version
    assert "ties" in run([exe, "methods"], cwd=work, env=env).stdout
    assert "layer.weight" in run([exe, "inspect", "a.safetensors"], cwd=work, env=env).stdout
    run([exe, "validate", "soup.yaml"], cwd=work, env=env)
    run([exe, "plan", "soup.yaml"], cwd=work, env=env)
    run([exe, "merge", "soup.yaml", "cli-soup"], cwd=work, env=env)
    assert (work / "cli-soup" / "model.safetensors").is_file()
    run([exe, "inspect", "cli-soup"], cwd=work, env=env)
    r = run(
        [
            exe,
            "greedy",
            "--backend",
            "ray",
            "--evaluator",
            "nowhere:fn",
            "--out",
            "g",
            "a.safetensors",
            "b.safetensors",
        ],
        cwd=work,
        env=env,
        code=2,
        quiet=False,
        what="soupkit greedy --backend ray without the ray extra",
    )
    assert "pip install 'soupkit[ray]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    run([py, "-c", API_CHECK, str(venv), str(work)], cwd=work, env=env, what="the Python API")
    times["CLI + API checks"] = time.perf_counter() - t

    summary = ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
    print(f"wheel smoke test passed ({wheel.name}, plain install, no extras, in {tmp}): {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
