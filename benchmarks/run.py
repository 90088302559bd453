#!/usr/bin/env python
"""Benchmark soupkit against mergekit on the same recipes, inputs and machine.

For every recipe (linear, task_arithmetic, ties, dare_ties; mergekit YAML, which both tools read)
and every tool (``soupkit merge`` from the dev venv, ``mergekit-yaml`` from the separate
``benchmarks/.venv-mergekit``) the runner starts the tool as a subprocess, ``--runs`` times, and
measures

* wall time: median of the runs, with min and max;
* input GB/s: bytes of every input safetensors file the recipe reads / wall time;
* peak private memory: the largest sum of ``RssAnon`` over the process tree, sampled from
  ``/proc/PID/status`` every ``--interval`` seconds (20 ms); anonymous = heap, tensors, buffers:
  memory the process owns, which the kernel cannot drop;
* peak RSS: the kernel's high-water mark ``VmHWM`` of every process of the tree (sampled like
  RssAnon; VmHWM only grows, so a sample misses at most the last interval), summed. RSS also
  counts file pages mapped from the page cache, so an mmap-based reader shows a large RSS that
  is reclaimable: read it together with the private figure. (``ru_maxrss`` from ``wait4`` is
  NOT used: Linux folds the parent's RSS at fork/exec into it, so it reports the runner's own
  mappings; it is kept in the JSON as ``ru_maxrss_bytes`` only to show that);
* CPU: user+sys CPU seconds of the tool, and the cores other processes used meanwhile
  (system busy time minus the tool's, divided by wall time), because the machine is shared.

It also measures the page-cache read ceiling: ``cat`` of the same input files to ``/dev/null``
with a warm cache (median of 3), and reports each tool's throughput as a fraction of it.
Before every timed run the inputs are read once (warm cache) and ``sync`` flushes the previous
run's output, so runs do not pay for each other's writeback. With ``--cold`` the inputs are
instead evicted from the page cache (``posix_fadvise(DONTNEED)``) before every run of every
tool and before every timed ``cat``: the first merge of new downloads, read from the disk.

Finally it checks the outputs tensor by tensor: soupkit against mergekit (bit-identical? max
absolute difference?) and, for linear and task_arithmetic, both against an fp32 reference
computed here with mergekit's operation order.

Results: a markdown table on stdout and in ``<results>.md``, all raw numbers in ``<results>.json``
(default ``benchmarks/results/latest``).

Examples::

    python benchmarks/run.py                              # everything, 3 runs each (~40 min)
    python benchmarks/run.py --only linear,ties --runs 1
    python benchmarks/run.py --tools mergekit
    python benchmarks/run.py --smoke --tools soupkit      # tiny model, 1 run, a few seconds
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_DATA = BENCH_DIR / "data" / "full"
SMOKE_DATA = BENCH_DIR / "data" / "small"
DEFAULT_SOUPKIT = REPO / ".venv" / "bin" / "soupkit"
DEFAULT_MERGEKIT = BENCH_DIR / ".venv-mergekit" / "bin" / "mergekit-yaml"
RECIPE_NAMES = ("linear", "task_arithmetic", "ties", "dare_ties")
#: ``soupkit-mergekit`` is soupkit run on the recipe plus ``parameters: {convention: mergekit}``
#: (for the methods that have convention switches), i.e. mergekit's arithmetic: the like-for-like
#: speed comparison for ties and dare_ties. mergekit's convention is now soupkit's default too, so
#: it equals plain ``soupkit``; ``soupkit-paper`` sets ``convention: paper`` (TIES's global trim,
#: what plain ``soupkit`` ran when the figures in README.md were measured).
#: ``soupkit-nohash`` is soupkit with ``--no-hash-inputs``: no sha256 of every input file for the
#: report (soupkit's default computes them in a background thread; this shows what they cost).
#: Every soupkit tool runs with its cache of input digests off (``SOUPKIT_HASH_CACHE=0``), so each
#: run hashes as a first merge of new inputs does, except ``soupkit-hashcache``: the default as a
#: user re-merging the same inputs runs it (the cache in ``OUT_DIR/hash-cache``; its first run
#: fills it, later runs take the digests from it). ``soupkit-torch`` is soupkit with its native
#: kernels off (``SOUPKIT_KERNELS=0``): the torch path, same bytes, to show what the kernels gain.
TOOLS = (
    "soupkit",
    "soupkit-torch",
    "soupkit-nohash",
    "soupkit-hashcache",
    "soupkit-mergekit",
    "soupkit-paper",
    "mergekit",
)
CONVENTION_METHODS = ("ties", "dare_ties")
GIB = 1024**3


class BenchError(RuntimeError):
    """A problem with the benchmark set-up (missing data, bad option), not with a tool run."""


# --------------------------------------------------------------------------------------------
# recipes


def make_recipe(name: str, data: Path, n_finetunes: int) -> dict[str, Any]:
    """Return the mergekit-schema recipe ``name`` over ``data/base`` and ``data/ft1..N``.

    ``dtype: float32`` makes mergekit compute in fp32 like soupkit (which always accumulates in
    fp32), and ``out_dtype: bfloat16`` keeps the output the inputs' size, so deterministic
    methods can be compared bit for bit.
    """
    fts = [str(data / f"ft{i + 1}") for i in range(n_finetunes)]
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    if name == "linear":
        return {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in fts],
            **common,
        }
    if name == "task_arithmetic":
        return {
            "merge_method": "task_arithmetic",
            "base_model": str(data / "base"),
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in fts],
            **common,
        }
    if name == "ties":
        return {
            "merge_method": "ties",
            "base_model": str(data / "base"),
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in fts],
            **common,
        }
    if name == "dare_ties":
        return {
            "merge_method": "dare_ties",
            "base_model": str(data / "base"),
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.3}} for m in fts],
            **common,
        }
    raise BenchError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPE_NAMES)}")


def recipe_inputs(recipe: Mapping[str, Any]) -> list[Path]:
    """Every model folder a recipe reads, base first."""
    dirs = [Path(recipe["base_model"])] if recipe.get("base_model") else []
    return dirs + [Path(m["model"]) for m in recipe["models"]]


def with_convention(recipe: Mapping[str, Any], convention: str | None) -> dict[str, Any]:
    """The recipe with soupkit's global ``convention`` parameter set, where the method has one."""
    out = dict(recipe)
    if convention and recipe["merge_method"] in CONVENTION_METHODS:
        out["parameters"] = {**recipe.get("parameters", {}), "convention": convention}
    return out


def dump_yaml(recipe: Mapping[str, Any]) -> str:
    """Serialise a recipe as YAML without needing PyYAML (JSON scalars are valid YAML)."""
    lines = []
    for key, value in recipe.items():
        if key == "parameters":
            lines.append(
                "parameters: {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in value.items()) + "}"
            )
        elif key == "models":
            lines.append("models:")
            for m in value:
                lines.append(f"  - model: {json.dumps(m['model'])}")
                params = ", ".join(f"{k}: {json.dumps(v)}" for k, v in m["parameters"].items())
                lines.append(f"    parameters: {{{params}}}")
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# safetensors folders


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder: from its index if present, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BenchError(f"{folder}: no model.safetensors.index.json and no *.safetensors files")
    return files


class Checkpoint:
    """Lazy tensor access to a HF safetensors folder (single file or sharded)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        self._handles: dict[str, Any] = {}
        self._where: dict[str, Path] = {}
        for path in safetensors_files(folder):
            handle = safe_open(str(path), framework="pt")
            self._handles[str(path)] = handle
            for name in handle.keys():
                self._where[name] = path

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> Any:
        return self._handles[str(self._where[name])].get_tensor(name)


def reference_tensor(
    recipe: Mapping[str, Any], ckpts: Mapping[Path, Checkpoint], name: str
) -> Any | None:
    """fp32 reference for deterministic recipes, with mergekit 0.1.5's operation order.

    linear: ``acc = 0; acc += w_i * x_i (in model order); acc / sum(w)`` (normalize: true).
    task_arithmetic: ``base + sum_0(stack(w_i * (x_i - base)))`` (normalize: false).
    Returns None for methods with no reference here (ties is compared tool against tool; dare
    is random).
    """
    import torch

    method = recipe["merge_method"]
    models = [(Path(m["model"]), float(m["parameters"]["weight"])) for m in recipe["models"]]
    out_dtype = getattr(torch, recipe.get("out_dtype") or recipe.get("dtype") or "bfloat16")
    if method == "linear":
        acc: Any = None
        for path, w in models:
            x = ckpts[path].get(name).float()
            if acc is None:
                acc = torch.zeros_like(x)
                coef_shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            acc.addcmul_(x, torch.full(coef_shape, w, dtype=torch.float32))
        return acc.div_(torch.full(coef_shape, sum(w for _, w in models), dtype=torch.float32)).to(
            out_dtype
        )
    if method == "task_arithmetic":
        base = ckpts[Path(recipe["base_model"])].get(name).float()
        deltas = torch.stack([ckpts[p].get(name).float() - base for p, _ in models])
        weights = torch.tensor([w for _, w in models], dtype=torch.float32).reshape(
            -1, *[1] * base.dim()
        )
        return (base + deltas.mul_(weights).sum(dim=0)).to(out_dtype)
    return None


@dataclass
class Diff:
    """Tensor-by-tensor comparison of two outputs (or an output and the reference)."""

    tensors: int = 0
    tensors_differ: int = 0
    elements: int = 0
    elements_differ: int = 0
    max_abs_diff: float = 0.0
    problems: list[str] = field(default_factory=list)
    #: ties only: differing elements where some model's |delta| equals its per-tensor top-k
    #: threshold, i.e. differences that only the tie-breaking among equal magnitudes explains.
    elements_differ_at_trim_ties: int | None = None

    @property
    def identical(self) -> bool:
        return not self.problems and self.tensors_differ == 0

    def summary(self) -> str:
        if self.problems:
            return (
                "MISMATCH: "
                + "; ".join(self.problems[:3])
                + (" ..." if len(self.problems) > 3 else "")
            )
        if self.identical:
            return f"bit-identical ({self.tensors} tensors)"
        text = (
            f"max abs diff {self.max_abs_diff:.3g}; {self.elements_differ / self.elements:.2%} of elements and "
            f"{self.tensors_differ}/{self.tensors} tensors differ"
        )
        if self.elements_differ_at_trim_ties is not None:
            text += (
                f"; {self.elements_differ_at_trim_ties / self.elements_differ:.2%} of the differing elements sit on a "
                "tie at some model's per-tensor top-k threshold (equal |delta|, kept by one tool, dropped by the other)"
            )
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "identical": self.identical,
            "tensors": self.tensors,
            "tensors_differ": self.tensors_differ,
            "elements": self.elements,
            "elements_differ": self.elements_differ,
            "max_abs_diff": self.max_abs_diff,
            "problems": self.problems,
            "elements_differ_at_trim_ties": self.elements_differ_at_trim_ties,
            "summary": self.summary(),
        }


def _same_bytes(a: Any, b: Any) -> bool:
    """Bit-identical (so -0.0 != +0.0 and NaN payloads count), not merely equal values."""
    import torch

    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _accumulate(diff: Diff, name: str, a: Any, b: Any) -> Any | None:
    """Add one tensor pair to ``diff``; return the mask of differing elements (None if none)."""
    import torch

    diff.tensors += 1
    diff.elements += a.numel()
    if a.shape != b.shape:
        diff.problems.append(f"{name}: shape {list(a.shape)} vs {list(b.shape)}")
        return None
    if a.dtype != b.dtype:
        diff.problems.append(f"{name}: dtype {a.dtype} vs {b.dtype}")
        return None
    if _same_bytes(a, b):
        return None
    if a.element_size() == 2:
        mask = a.view(torch.int16) != b.view(torch.int16)
    else:
        mask = a.float() != b.float()
    d = (a.float() - b.float()).abs_()
    diff.tensors_differ += 1
    diff.elements_differ += int(torch.count_nonzero(mask))
    diff.max_abs_diff = max(diff.max_abs_diff, float(d.max()))
    return mask


def trim_tie_mask(recipe: Mapping[str, Any], ckpts: Mapping[Path, Checkpoint], name: str) -> Any:
    """Elements where some model's fp32 |delta| equals its per-tensor top-k threshold.

    ``k = max(1, int(density * numel))`` as mergekit's ``sparsify.magnitude``; the threshold is
    the k-th largest |delta| (``kthvalue``, no full sort). Top-k implementations may keep any
    subset of such a tie group, so differences there are tie-breaking, not arithmetic.
    """
    import torch

    base = ckpts[Path(recipe["base_model"])].get(name).float()
    mask = torch.zeros(base.shape, dtype=torch.bool)
    for m in recipe["models"]:
        density = float(m["parameters"].get("density", 1.0))
        if density >= 1:
            continue
        mag = (ckpts[Path(m["model"])].get(name).float() - base).abs_()
        k = max(1, int(density * mag.numel()))
        kth = mag.flatten().kthvalue(mag.numel() - k + 1).values
        mask |= mag == kth
    return mask


def compare_outputs(recipe: Mapping[str, Any], outputs: Mapping[str, Path]) -> dict[str, Diff]:
    """Compare every pair of tool outputs and each output with the reference, in one pass.

    Keys are ``"soupkit vs mergekit"``, ``"soupkit vs reference"``, ... Only one tensor per
    checkpoint is in memory at a time.
    """
    ckpts = {tool: Checkpoint(p) for tool, p in outputs.items()}
    tools = list(ckpts)
    diffs: dict[str, Diff] = {}
    pairs = [(a, b) for i, a in enumerate(tools) for b in tools[i + 1 :]]
    for a, b in pairs:
        diffs[f"{a} vs {b}"] = Diff()
        for missing in sorted(ckpts[b].names() - ckpts[a].names()):
            diffs[f"{a} vs {b}"].problems.append(f"{missing}: only in {b}")
        for missing in sorted(ckpts[a].names() - ckpts[b].names()):
            diffs[f"{a} vs {b}"].problems.append(f"{missing}: only in {a}")
    has_reference = recipe["merge_method"] in ("linear", "task_arithmetic")
    explain_ties = recipe["merge_method"] == "ties"
    inputs = (
        {p: Checkpoint(p) for p in recipe_inputs(recipe)} if has_reference or explain_ties else {}
    )
    if has_reference:
        expected_names = set.intersection(*(c.names() for c in inputs.values()))
        for tool in tools:
            d = diffs[f"{tool} vs reference"] = Diff()
            for missing in sorted(expected_names - ckpts[tool].names()):
                d.problems.append(f"{missing}: missing from {tool} output")
            for extra in sorted(ckpts[tool].names() - expected_names):
                d.problems.append(f"{extra}: unexpected in {tool} output")
    names = sorted(set.union(*(c.names() for c in ckpts.values())))
    for name in names:
        tensors = {t: c.get(name) for t, c in ckpts.items() if name in c.names()}
        tie_mask = None
        for a, b in pairs:
            if a in tensors and b in tensors:
                d = diffs[f"{a} vs {b}"]
                differ = _accumulate(d, name, tensors[a], tensors[b])
                if explain_ties:
                    d.elements_differ_at_trim_ties = d.elements_differ_at_trim_ties or 0
                    if differ is not None:
                        if tie_mask is None:
                            tie_mask = trim_tie_mask(recipe, inputs, name)
                        d.elements_differ_at_trim_ties += int((differ & tie_mask).sum())
        if has_reference and all(name in c.names() for c in inputs.values()):
            ref = reference_tensor(recipe, inputs, name)
            for tool, t in tensors.items():
                _accumulate(diffs[f"{tool} vs reference"], name, t, ref)
    return diffs


# --------------------------------------------------------------------------------------------
# measuring one process tree


@dataclass
class RunResult:
    """One timed run of one tool."""

    returncode: int
    wall_s: float
    peak_private_bytes: int  # max over samples of sum(RssAnon) over the process tree
    peak_rss_sampled_bytes: int  # max over samples of sum(VmRSS) over the process tree
    peak_rss_vmhwm_bytes: int  # sum over the tree of each process's last-seen VmHWM
    ru_maxrss_bytes: int  # from wait4: includes the runner's RSS inherited at fork (unreliable)
    cpu_s: float  # user + sys of the child and its waited-for descendants
    other_cores: float  # cores busy with other processes during the run (shared machine)
    samples: int
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    log: str

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int] | None:
    """Read ``/proc/PID/status`` fields in KiB; None when the process has gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            text = fh.read().decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[key] = int(rest.split()[0])
    return out


def _busy_cpu_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + sum(getattr(t, k, 0.0) for k in ("iowait", "steal", "guest", "guest_nice"))
    return float(sum(t) - idle)


def measure(
    cmd: Sequence[str],
    log_path: Path,
    *,
    cwd: Path,
    interval: float = 0.02,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> RunResult:
    """Run ``cmd`` with stdout+stderr to ``log_path`` and measure time, memory and CPU.

    The child is reaped with ``os.wait4`` so its kernel high-water RSS and CPU time come back
    exactly; the process tree (re-listed every ~10 samples) is sampled every ``interval`` s.
    """
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        busy0 = _busy_cpu_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        pids = [proc.pid]
        peak_anon = peak_rss = samples = 0
        hwm: dict[int, int] = {}  # pid -> VmHWM (KiB), last seen
        status = rusage = None
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    break
                if samples % 10 == 0:
                    try:
                        pids = [proc.pid] + [
                            c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                        ]
                    except psutil.NoSuchProcess:
                        pass
                anon = rss = 0
                for p in pids:
                    st = _status_kib(p, ("RssAnon", "VmRSS", "VmHWM"))
                    if st:
                        anon += st.get("RssAnon", 0)
                        rss += st.get("VmRSS", 0)
                        hwm[p] = max(hwm.get(p, 0), st.get("VmHWM", 0))
                peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
                samples += 1
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    proc.kill()
                time.sleep(interval)
        except BaseException:
            proc.kill()
            os.waitpid(proc.pid, 0)
            proc.returncode = -9
            raise
        wall = time.perf_counter() - t0
        busy = _busy_cpu_seconds() - busy0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = rusage.ru_utime + rusage.ru_stime
    return RunResult(
        returncode=proc.returncode,
        wall_s=wall,
        peak_private_bytes=peak_anon * 1024,
        peak_rss_sampled_bytes=peak_rss * 1024,
        peak_rss_vmhwm_bytes=max(sum(hwm.values()), peak_rss) * 1024,
        ru_maxrss_bytes=rusage.ru_maxrss * 1024,
        cpu_s=cpu,
        other_cores=max(0.0, (busy - cpu) / wall) if wall > 0 else 0.0,
        samples=samples,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
        log=str(log_path),
    )


def evict(files: Sequence[Path]) -> None:
    """Drop ``files`` from the page cache (``posix_fadvise(DONTNEED)``: no root needed).

    Dirty pages cannot be dropped, so the caller syncs first. What a user's first merge of new
    downloads sees: every byte comes from the disk.
    """
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: Sequence[Path], cold: bool) -> None:
    """Put ``files`` in the page cache (a ``cat``), or out of it (``cold``)."""
    if cold:
        evict(files)
    else:
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)


def cat_seconds(files: Sequence[Path], runs: int = 3, cold: bool = False) -> list[float]:
    """Time ``cat FILES > /dev/null``: warm page cache (one untimed pass first), or ``cold``
    (the files evicted before each pass)."""
    cmd = ["cat", *map(str, files)]
    if not cold:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(runs):
        if cold:
            evict(files)
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------
# tools


@dataclass
class Tool:
    """How to run one merging tool, or why it cannot be run."""

    name: str
    exe: Path
    available: bool
    reason: str = ""
    convention: str | None = None  # soupkit only: set ``parameters.convention`` in the recipe
    version: str = ""
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None  # full environment for the subprocess (None: inherit)

    @property
    def is_soupkit(self) -> bool:
        return self.name.startswith("soupkit")

    def command(self, recipe: Path, out: Path) -> list[str]:
        if self.is_soupkit:
            return [str(self.exe), "merge", str(recipe), str(out), "--force", *self.extra_args]
        # No tokenizer in the generated inputs; a fixed seed for DARE; otherwise mergekit's defaults
        # (including --out-shard-size 5B, i.e. one output shard held in RAM until it is written).
        return [
            str(self.exe),
            str(recipe),
            str(out),
            "--no-copy-tokenizer",
            "--random-seed",
            "0",
            *self.extra_args,
        ]


def _tail(text: str, n: int = 6) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-n:])


def source_digest(pkg: Path) -> str:
    """sha256 over the package's *.py files (path + bytes): identifies uncommitted code."""
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def snapshot_soupkit(src: Path, dest: Path) -> Path:
    """Copy ``src/soupkit`` to ``dest/soupkit`` so edits made during a long run do not leak in."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest / "soupkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def probe_soupkit(exe: Path, env: Mapping[str, str] | None = None) -> Tool:
    """Check that ``soupkit merge`` exists and answers ``--help``; say precisely why not."""
    python = exe.parent / "python"
    if not exe.exists():
        hint = ""
        if python.exists():
            r = subprocess.run(
                [str(python), "-c", "import soupkit.cli"], capture_output=True, text=True
            )
            if r.returncode == 0:
                hint = (
                    f" The package imports (soupkit.cli) but the console script is missing:"
                    f" run `{exe.parent / 'pip'} install -e {REPO}` to create it."
                )
            else:
                hint = " soupkit.cli does not import yet either:\n" + _tail(r.stderr, 3)
        return Tool("soupkit", exe, False, f"{exe} not found.{hint}")
    r = subprocess.run([str(exe), "merge", "--help"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return Tool(
            "soupkit",
            exe,
            False,
            f"`{exe} merge --help` exited {r.returncode}:\n{_tail(r.stdout + r.stderr)}",
        )
    return Tool(
        "soupkit",
        exe,
        True,
        version=_dist_versions(python, "soupkit"),
        env=dict(env) if env else None,
    )


def _dist_versions(python: Path, *dists: str) -> str:
    """``"1.2.3, torch 2.13.0"``: installed versions read from package metadata (no imports)."""
    code = "import sys\nfrom importlib.metadata import version\nprint(', '.join(version(d) for d in sys.argv[1:]))"
    r = subprocess.run([str(python), "-c", code, *dists, "torch"], capture_output=True, text=True)
    if r.returncode != 0:
        return "unknown version"
    first, _, rest = r.stdout.strip().partition(", ")
    return f"{first}, torch {rest}"


def probe_mergekit(exe: Path) -> Tool:
    """Check that ``mergekit-yaml`` exists in its own venv (setup_mergekit.sh verified ``--help``).

    Not running ``--help`` here saves ~6 s of imports; a broken install fails the first run,
    whose log the report names.
    """
    if not exe.exists():
        return Tool(
            "mergekit",
            exe,
            False,
            f"{exe} not found; create it with `bash {BENCH_DIR / 'setup_mergekit.sh'}`",
        )
    return Tool("mergekit", exe, True, version=_dist_versions(exe.parent / "python", "mergekit"))


def startup_seconds(tool: Tool, runs: int = 3) -> float:
    """Median time of ``--help``: the interpreter + import cost included in every wall time."""
    cmd = [str(tool.exe), "merge", "--help"] if tool.is_soupkit else [str(tool.exe), "--help"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# reporting


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _span(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS and load: the context every figure needs on a shared machine."""
    import psutil

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "mem_total_gib": round(psutil.virtual_memory().total / GIB, 1),
        "mem_available_gib": round(psutil.virtual_memory().available / GIB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def _git_rev() -> str:
    r = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return r.stdout.strip() if r.returncode == 0 else "no commit"


def _peak_rss(entry: Mapping[str, Any]) -> int:
    """Peak RSS of a tool entry; reports written before VmHWM sampling fall back to sampled VmRSS."""
    return int(entry.get("peak_rss_vmhwm_bytes") or entry["peak_rss_sampled_bytes"])


def _engine_seconds(out: Path) -> float:
    """The merge time soupkit measured itself (``stats.seconds`` of its report): the streaming
    pass, without interpreter start-up, planning or waiting for the input hashes."""
    report = json.loads((out / "soupkit-report.json").read_text())
    return float(report["stats"]["seconds"])


def render_markdown(report: Mapping[str, Any]) -> str:
    """The results table plus the context needed to read it."""
    meta = report["meta"]
    m = meta["machine"]
    lines = [
        f"# soupkit vs mergekit — {meta['date']}",
        "",
        f"- machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['mem_total_gib']} GiB RAM; "
        f"Linux {m['kernel']}, Python {m['python']}; load average at start "
        f"{' / '.join(f'{x:.2f}' for x in m['loadavg'])}"
        + (
            f", at end {' / '.join(f'{x:.2f}' for x in meta['loadavg_end'])}"
            if meta.get("loadavg_end")
            else ""
        )
        + " (1/5/15 min; the machine is shared)",
        f"- data: `{meta['data']}`: {meta['data_desc']}",
        f"- runs per tool and recipe: {meta['runs']}"
        + (
            f" (mergekit: {meta['mergekit_runs']})"
            if meta.get("mergekit_runs", meta["runs"]) != meta["runs"]
            else ""
        )
        + " (wall = median (min–max)); cat: median of 3, "
        + (
            "COLD page cache (inputs evicted before every run)"
            if meta.get("cold")
            else "warm page cache"
        ),
        "- tools: "
        + "; ".join(
            f"{t['name']} {t['version']}"
            + (
                f" (source sha256 {meta['soupkit_source_sha256']}"
                f"{', snapshot' if meta.get('soupkit_snapshot') else ''}; git {meta['git']})"
                if t["name"].startswith("soupkit")
                else ""
            )
            if t["available"]
            else f"{t['name']}: NOT RUN ({t['reason'].splitlines()[0]})"
            for t in meta["tools"]
        ),
        *[f"- note: {n}" for n in meta.get("notes", [])],
        "",
        "| merge | tool | wall s | input GB/s | % of cat | merge pass s (GB/s) | peak private GiB | peak RSS GiB | CPU s | other cores | vs mergekit: time / private |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in report["recipes"]:
        cat = rec["cat"]
        gb = rec["input_bytes"] / 1e9
        lines.append(
            f"| {rec['name']} | cat (ceiling) | {_span(cat['seconds'], '{:.3g}')} | {gb / cat['median_s']:.3g} | 100% | – | – | – | – | – | – |"
        )
        mk = rec["tools"].get("mergekit", {})
        for tool_name, t in rec["tools"].items():
            if "skipped" in t:
                lines.append(
                    f"| {rec['name']} | {tool_name} | not run: {t['skipped']} | | | | | | | | |"
                )
                continue
            ok = [r for r in t["runs"] if r["returncode"] == 0]
            if not ok:
                rc = t["runs"][0]["returncode"] if t["runs"] else "?"
                lines.append(
                    f"| {rec['name']} | {tool_name} | FAILED (exit {rc}; log `{t['runs'][0]['log']}`) | | | | | | | | |"
                )
                continue
            walls = [r["wall_s"] for r in ok]
            med = statistics.median(walls)
            ratio = "–"
            if tool_name != "mergekit" and mk.get("median_wall_s") and mk.get("peak_private_bytes"):
                ratio = f"{med / mk['median_wall_s']:.2f}× / {t['peak_private_bytes'] / mk['peak_private_bytes']:.2f}×"
            failed = len(t["runs"]) - len(ok)
            engine = "–"
            if t.get("engine_s"):
                em = statistics.median(t["engine_s"])
                engine = f"{_span(t['engine_s'])} ({gb / em:.3g})"
            lines.append(
                f"| {rec['name']} | {tool_name}{f' ({failed} failed)' if failed else ''} | {_span(walls)} | {gb / med:.3g} | "
                f"{100 * cat['median_s'] / med:.2g}% | {engine} | {_gib(t['peak_private_bytes'])} | {_gib(_peak_rss(t))} | "
                f"{statistics.median(r['cpu_s'] for r in ok):.0f} | {statistics.median(r['other_cores'] for r in ok):.2f} | {ratio} |"
            )
    lines += ["", "Output checks (last run of each tool):", ""]
    any_check = False
    for rec in report["recipes"]:
        for pair, d in rec.get("checks", {}).items():
            lines.append(f"- {rec['name']}: {pair}: {d['summary']}")
            any_check = True
        if rec.get("check_note"):
            lines.append(f"- {rec['name']}: {rec['check_note']}")
            any_check = True
    if not any_check:
        lines.append("- none (no tool produced an output)")
    starts = ", ".join(f"{k} {v:.1f} s" for k, v in meta.get("startup_s", {}).items())
    lines += [
        "",
        "Columns: input GB/s = bytes of all input safetensors files / wall time; % of cat = cat time / wall time; "
        "peak private = max sampled sum of RssAnon over the process tree (every "
        f"{meta['interval_s'] * 1000:.0f} ms); peak RSS = sum of the processes' VmHWM (kernel high-water mark), which also "
        "counts page-cache pages the tool maps (reclaimable); CPU s = user+sys of the tool; other cores = CPU used by other processes "
        "during the run.",
        "merge pass = the streaming pass as soupkit times it (`stats.seconds` in soupkit-report.json): wall time minus "
        "interpreter start-up, planning and the wait for the input hashes.",
        f"Wall times include interpreter start-up and imports (`--help`: {starts or 'not measured'}).",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main


def _ensure_smoke_data(data: Path) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    import generate  # noqa: PLC0415  (sibling script)

    generate.main(["--small", "--quiet", "--out", str(data)])


def _data_desc(data: Path) -> tuple[str, int]:
    manifest = data / "generate.json"
    if not manifest.is_file():
        return "unknown origin (no generate.json)", 0
    g = json.loads(manifest.read_text())
    s = g["shape"]
    params = f"{g['num_params'] / 1e9:.3f} B" if g["num_params"] >= 1e8 else f"{g['num_params']:,}"
    return (
        f"{params} params (vocab {s['vocab_size']}, hidden {s['hidden_size']}, "
        f"intermediate {s['intermediate_size']}, {s['num_hidden_layers']} layers), bf16, "
        f"{g['bytes_per_checkpoint'] / 1e9:.3g} GB per checkpoint, base + {g['n_finetunes']} fine-tunes, "
        f"{g['n_shards']} shards each",
        int(g["n_finetunes"]),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark soupkit against mergekit (time, memory, throughput, output equality).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    p.add_argument("--only", help=f"comma-separated recipes (default: {','.join(RECIPE_NAMES)})")
    p.add_argument(
        "--tools",
        default="soupkit,mergekit",
        help="comma-separated, from soupkit, soupkit-nohash (soupkit with --no-hash-inputs), "
        "soupkit-hashcache (soupkit re-merging: input digests from its cache), "
        "soupkit-mergekit (soupkit with `convention: mergekit`), "
        "soupkit-paper (soupkit with `convention: paper`), "
        "soupkit-torch (soupkit with its native kernels off), "
        "mergekit (default: soupkit,mergekit)",
    )
    p.add_argument(
        "--runs", type=int, help="timed runs per tool and recipe (default 3; 1 with --smoke)"
    )
    p.add_argument(
        "--mergekit-runs",
        type=int,
        help="timed runs of mergekit per recipe (default --runs; its ties takes ~10 min a run here)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help=f"generated data folder (default {DEFAULT_DATA}; {SMOKE_DATA} with --smoke)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny generated model, 1 run, results to results/smoke.*",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        help="recipes, logs and merge outputs (default benchmarks/out[/smoke])",
    )
    p.add_argument(
        "--results",
        type=Path,
        help="results path without suffix (default benchmarks/results/latest)",
    )
    p.add_argument(
        "--soupkit",
        type=Path,
        default=DEFAULT_SOUPKIT,
        help=f"soupkit executable (default {DEFAULT_SOUPKIT})",
    )
    p.add_argument(
        "--mergekit",
        type=Path,
        default=DEFAULT_MERGEKIT,
        help=f"mergekit-yaml (default {DEFAULT_MERGEKIT})",
    )
    p.add_argument(
        "--mergekit-args", default="", help="extra mergekit-yaml flags, e.g. '--out-shard-size 1B'"
    )
    p.add_argument("--soupkit-args", default="", help="extra `soupkit merge` flags")
    p.add_argument(
        "--interval",
        type=float,
        default=0.02,
        help="memory sampling interval in seconds (default 0.02)",
    )
    p.add_argument("--timeout", type=float, help="kill a tool run after this many seconds")
    p.add_argument(
        "--cold",
        action="store_true",
        help="cold page cache: evict the inputs before every run of every tool and every timed "
        "`cat` (posix_fadvise DONTNEED), instead of warming them",
    )
    p.add_argument(
        "--snapshot",
        action="store_true",
        help="run soupkit from a copy of src/soupkit taken at start (the tree is being edited)",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only re-render the markdown of an earlier results JSON (written next to it)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the output comparison")
    p.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep merge outputs (default: delete them at the end)",
    )
    args = p.parse_args(argv)
    args.recipes = args.only.split(",") if args.only else list(RECIPE_NAMES)
    for r in args.recipes:
        if r not in RECIPE_NAMES:
            p.error(f"--only: unknown recipe {r!r}; choose from {', '.join(RECIPE_NAMES)}")
    args.tool_names = args.tools.split(",")
    for t in args.tool_names:
        if t not in TOOLS:
            p.error(f"--tools: unknown tool {t!r}; choose from {', '.join(TOOLS)}")
    args.runs = args.runs if args.runs is not None else (1 if args.smoke else 3)
    args.mergekit_runs = args.mergekit_runs if args.mergekit_runs is not None else args.runs
    if args.mergekit_runs < 1:
        p.error("--mergekit-runs must be at least 1")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    args.data = args.data or (SMOKE_DATA if args.smoke else DEFAULT_DATA)
    args.out_dir = args.out_dir or (BENCH_DIR / "out" / ("smoke" if args.smoke else "full"))
    args.results = args.results or (BENCH_DIR / "results" / ("smoke" if args.smoke else "latest"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render_markdown(report))
        print(render_markdown(report))
        return 0
    if args.smoke:
        _ensure_smoke_data(args.data)
    if not (args.data / "base").is_dir():
        raise BenchError(
            f"{args.data}/base not found; generate the inputs first: python {BENCH_DIR / 'generate.py'}"
        )
    data_desc, n_ft = _data_desc(args.data)
    n_ft = n_ft or len(list(args.data.glob("ft*")))
    args.data = args.data.resolve()
    args.out_dir = args.out_dir.resolve()  # the tools run with this as their working directory

    soupkit_env = None
    soupkit_src = REPO / "src" / "soupkit"
    if args.snapshot and any(t.startswith("soupkit") for t in args.tool_names):
        # Put a frozen copy first on PYTHONPATH: it shadows the editable install's live tree.
        snap = snapshot_soupkit(soupkit_src, args.out_dir / "soupkit-snapshot")
        soupkit_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(snap), os.environ.get("PYTHONPATH")])),
        }
        soupkit_src = snap / "soupkit"
        print(f"soupkit: running a snapshot of src/soupkit from {snap}", file=sys.stderr)
    tools: list[Tool] = []
    for name in args.tool_names:
        if name.startswith("soupkit"):
            tool = probe_soupkit(args.soupkit, soupkit_env)
            tool.name = name
            tool.convention = {"soupkit-mergekit": "mergekit", "soupkit-paper": "paper"}.get(name)
            tool.extra_args = args.soupkit_args.split() + (
                ["--no-hash-inputs"] if name == "soupkit-nohash" else []
            )
            if (
                name == "soupkit-hashcache"
            ):  # empty at the start: its first run hashes, the later reuse
                shutil.rmtree(args.out_dir / "hash-cache", ignore_errors=True)
            tool.env = {
                **(tool.env or os.environ),
                **(
                    {"SOUPKIT_CACHE_DIR": str(args.out_dir / "hash-cache")}
                    if name == "soupkit-hashcache"
                    else {"SOUPKIT_HASH_CACHE": "0"}
                ),
                **({"SOUPKIT_KERNELS": "0"} if name == "soupkit-torch" else {}),
            }
        else:
            tool = probe_mergekit(args.mergekit)
            tool.extra_args = args.mergekit_args.split()
        if not tool.available:
            print(f"[skip] {name}: {tool.reason}", file=sys.stderr)
        tools.append(tool)
    runnable = [t for t in tools if t.available]

    started = _dt.datetime.now().astimezone()
    meta: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine_info(),
        "data": str(args.data),
        "data_desc": data_desc,
        "runs": args.runs,
        "cold": args.cold,
        "mergekit_runs": args.mergekit_runs,
        "interval_s": args.interval,
        "git": _git_rev(),
        "soupkit_source_sha256": source_digest(soupkit_src) if soupkit_src.is_dir() else None,
        "soupkit_snapshot": bool(soupkit_env),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "tools": [
            {
                "name": t.name,
                "exe": str(t.exe),
                "available": t.available,
                "reason": t.reason,
                "version": t.version,
                "extra_args": t.extra_args,
            }
            for t in tools
        ],
        # start-up cost (interpreter + imports), measured outside the smoke test to keep it fast
        "startup_s": {} if args.smoke else {t.name: startup_seconds(t) for t in runnable},
    }
    print(f"machine: {meta['machine']}\ndata: {args.data}: {data_desc}", file=sys.stderr)
    report: dict[str, Any] = {"meta": meta, "recipes": []}
    any_failed = False
    recipes_dir, logs_dir, merges_dir = (
        args.out_dir / "recipes",
        args.out_dir / "logs",
        args.out_dir / "merges",
    )
    for d in (recipes_dir, logs_dir, merges_dir):
        d.mkdir(parents=True, exist_ok=True)

    for rname in args.recipes:
        recipe = make_recipe(rname, args.data, n_ft)
        recipe_path = recipes_dir / f"{rname}.yaml"
        recipe_path.write_text(dump_yaml(recipe))
        files = [f for d in recipe_inputs(recipe) for f in safetensors_files(d)]
        input_bytes = sum(f.stat().st_size for f in files)
        cat = cat_seconds(files, 3, cold=args.cold)
        rec: dict[str, Any] = {
            "name": rname,
            "recipe": str(recipe_path),
            "input_bytes": input_bytes,
            "input_files": len(files),
            "cat": {"seconds": cat, "median_s": statistics.median(cat)},
            "tools": {},
        }
        print(
            f"\n== {rname}: {len(files)} files, {input_bytes / 1e9:.2f} GB; cat {statistics.median(cat):.2f} s",
            file=sys.stderr,
        )
        outputs: dict[str, Path] = {}
        for tool in tools:
            if not tool.available:
                rec["tools"][tool.name] = {"skipped": tool.reason.splitlines()[0]}
                continue
            out = merges_dir / tool.name / rname
            tool_recipe = recipe_path
            if tool.convention and recipe["merge_method"] in CONVENTION_METHODS:
                tool_recipe = recipes_dir / f"{rname}.{tool.name}.yaml"
                tool_recipe.write_text(dump_yaml(with_convention(recipe, tool.convention)))
            runs: list[RunResult] = []
            engine_s: list[
                float
            ] = []  # soupkit's own timing of the merge (no start-up, no hashing wait)
            n_runs = args.mergekit_runs if tool.name == "mergekit" else args.runs
            for k in range(n_runs):
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                os.sync()  # the previous output's writeback must not land in this run
                warm(files, args.cold)
                r = measure(
                    tool.command(tool_recipe, out),
                    logs_dir / f"{tool.name}-{rname}-run{k + 1}.log",
                    cwd=args.out_dir,
                    interval=args.interval,
                    timeout=args.timeout,
                    env=tool.env,
                )
                runs.append(r)
                if r.returncode == 0 and tool.name.startswith("soupkit"):
                    engine_s.append(_engine_seconds(out))
                status = "ok" if r.returncode == 0 else f"FAILED exit {r.returncode} (log {r.log})"
                print(
                    f"  {tool.name} run {k + 1}/{n_runs}: {r.wall_s:.1f} s, private {_gib(r.peak_private_bytes)} GiB, "
                    f"RSS {_gib(r.peak_rss_vmhwm_bytes)} GiB, cpu {r.cpu_s:.0f} s, other cores {r.other_cores:.2f}: {status}",
                    file=sys.stderr,
                )
                if r.returncode != 0:
                    any_failed = True
                    print(_tail(Path(r.log).read_text(errors="replace"), 12), file=sys.stderr)
                    break
            ok = [r for r in runs if r.returncode == 0]
            entry: dict[str, Any] = {
                "command": tool.command(tool_recipe, out),
                "runs": [r.to_json() for r in runs],
            }
            if engine_s:
                entry["engine_s"] = engine_s
            if ok:
                entry.update(
                    median_wall_s=statistics.median(r.wall_s for r in ok),
                    min_wall_s=min(r.wall_s for r in ok),
                    max_wall_s=max(r.wall_s for r in ok),
                    peak_private_bytes=max(r.peak_private_bytes for r in ok),
                    peak_rss_vmhwm_bytes=max(r.peak_rss_vmhwm_bytes for r in ok),
                    peak_rss_sampled_bytes=max(r.peak_rss_sampled_bytes for r in ok),
                )
                if runs[-1].returncode == 0:
                    outputs[tool.name] = out
            rec["tools"][tool.name] = entry
        if not args.no_check and outputs:
            print(f"  comparing outputs of {', '.join(outputs)} ...", file=sys.stderr)
            try:
                diffs = compare_outputs(recipe, outputs)
            except Exception as exc:  # a broken output must not lose the timings
                rec["check_note"] = f"comparison failed: {type(exc).__name__}: {exc}"
                any_failed = True
            else:
                rec["checks"] = {k: d.to_json() for k, d in diffs.items()}
                for k, d in diffs.items():
                    print(f"  {k}: {d.summary()}", file=sys.stderr)
            if rname == "dare_ties" and len(outputs) > 1:
                rec["check_note"] = (
                    "dare_ties drops entries at random: the tools' masks come from different RNGs, so outputs differ by design"
                )
        if not args.keep_outputs:
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
        report["recipes"].append(rec)

    meta["loadavg_end"] = os.getloadavg()
    md = render_markdown(report)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".md").write_text(md)
    args.results.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + md)
    print(
        f"wrote {args.results.with_suffix('.md')} and {args.results.with_suffix('.json')}",
        file=sys.stderr,
    )
    if not runnable:
        print("no tool was runnable; see the [skip] messages above", file=sys.stderr)
        return 1
    return 1 if any_failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
