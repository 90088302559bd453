"""Real kills of `soupkit merge` at random moments: the complete, correct output or nothing.

Each run is its own process running ``soupkit merge`` (the CLI's ``main``) on 24 MB of inputs (384 MB in the long run)
writing 8 shards. The processes come from a multiprocessing fork server that imported soupkit
once, so a run costs the merge and not the two-second torch import. The signal (SIGINT,
SIGTERM or SIGKILL) is sent a random delay after the run starts writing (its partial folder
appears), so kills land before, during and after the shards and the rename.
After every kill: the output folder either does not exist or is byte-identical to a reference
merge; SIGINT / SIGTERM leave no debris at all; SIGKILL may leave a partial folder, which the
next run removes; and that re-run succeeds.

``SOUPKIT_KILL_RUNS=N`` (or ``HYPOTHESIS_PROFILE=long``: 40) sets the number of kills (default 6);
``HYPOTHESIS_PROFILE=long`` also makes the inputs 3 x 128 MB (384 MB read, 8 shards of 16 MB).
``SOUPKIT_KILL_SEED`` fixes the random delays (the seed is printed in every failure message).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import hostile_helpers
import pytest
import torch
from hostile_helpers import debris
from safetensors.torch import save_file

import soupkit

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
RUNS = int(os.environ.get("SOUPKIT_KILL_RUNS", "40" if LONG else "6"))
SEED = int(os.environ.get("SOUPKIT_KILL_SEED", str(random.SystemRandom().randrange(1 << 30))))
SHARD = "16MB" if LONG else "1MB"
ROWS = 4096 if LONG else 256  # x 1024 float32 columns x 8 tensors per model
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kill")
    models = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        p = root / f"m{i}.safetensors"
        save_file(
            {f"layer{j}.weight": torch.randn(ROWS, 1024, generator=g) for j in range(8)}, str(p)
        )
        models.append(p)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "linear",
                "models": [{"model": str(m)} for m in models],
                "out_dtype": "bfloat16",
            }
        )
    )
    t0 = time.perf_counter()
    ref = soupkit.merge(recipe, root / "ref", max_shard_size=SHARD)
    return {
        "root": root,
        "recipe": recipe,
        "ref": outputs(ref.out),
        "seconds": time.perf_counter() - t0,
    }


def outputs(out: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(out.iterdir())
        if p.suffix == ".safetensors" or p.name.endswith(".index.json")
    }


def start(recipe: Path, out: Path, log: Path, *extra: str) -> Any:
    argv = ["merge", str(recipe), str(out), "--max-shard-size", SHARD, "--no-progress", *extra]
    return hostile_helpers.cli_process(argv, log)


def kill_while_writing(proc: Any, out: Path, log: Path, delay: float, sig: int) -> tuple[int, str]:
    """Wait until ``proc`` starts writing ``out``, then ``delay`` seconds more, then send ``sig``."""
    parent, prefix = out.parent, f".soupkit-partial-{out.name}-"
    deadline = time.monotonic() + 120
    while proc.is_alive() and time.monotonic() < deadline:
        if out.exists() or any(p.name.startswith(prefix) for p in parent.iterdir()):
            break
        time.sleep(0.002)
    time.sleep(delay)
    if proc.is_alive():
        # it can still end between the check and the kill (the fork server reaps it at once):
        # then it finished before the signal, which check_after_kill accepts
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
    proc.join(timeout=120)
    return proc.exitcode, log.read_text() if log.exists() else ""


def run_kills(
    setup: dict[str, Any], n: int, extra: tuple[str, ...], rng: random.Random
) -> list[dict[str, Any]]:
    """Start ``n`` merges at once, each killed by its own thread at a random moment."""
    window = max(0.05, 3 * setup["seconds"])  # several merges share 2 cores: each runs slower
    runs = []
    for k in range(n):
        folder = setup["root"] / f"run{len(extra)}-{k}"
        folder.mkdir()
        runs.append(
            {
                "folder": folder,
                "out": folder / "out",
                "sig": SIGNALS[k % 3],
                "delay": rng.uniform(0, window),
            }
        )
    for r in runs:
        r["log"] = setup["root"] / f"{r['folder'].name}.log"
        r["proc"] = start(setup["recipe"], r["out"], r["log"], *extra)

    def watch(r: dict[str, Any]) -> None:
        r["code"], r["err"] = kill_while_writing(
            r["proc"], r["out"], r["log"], r["delay"], r["sig"]
        )

    threads = [threading.Thread(target=watch, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return runs


def outcome(r: dict[str, Any]) -> str:
    """How the run ended: finished before the signal, or killed (leaving debris or not)."""
    if r["out"].exists():
        return "finished"
    return "killed, debris" if debris(r["folder"]) else "killed, clean"


def check_after_kill(r: dict[str, Any], ref: dict[str, bytes]) -> None:
    what = f"seed={SEED} signal={signal.Signals(r['sig']).name} delay={r['delay']:.3f}s exit={r['code']} stderr={r['err'][-500:]!r}"
    assert "Traceback" not in r["err"], what
    if r["out"].exists():  # killed too late: the run finished; it must be complete and correct
        assert outputs(r["out"]) == ref, what
        assert (r["out"] / "soupkit-report.json").is_file(), what
        return
    assert sorted(os.listdir(r["folder"])) == debris(r["folder"]), (
        what
    )  # nothing but hidden work folders
    if r["sig"] == signal.SIGKILL:
        assert r["code"] == -signal.SIGKILL, what
    else:
        assert r["code"] in (130, 143), what
        expected = "interrupted" if r["sig"] == signal.SIGINT else "terminated"
        assert (
            r["err"].rstrip().endswith(f"{expected}: no unfinished output was left in place")
            or "--resume to continue" in r["err"]
        ), what


def test_kill_at_random_moments(setup: dict[str, Any]) -> None:
    rng = random.Random(SEED)
    runs = run_kills(setup, RUNS, (), rng)
    print(
        f"seed={SEED}: "
        + ", ".join(f"{signal.Signals(r['sig']).name}@{r['delay']:.2f}s {outcome(r)}" for r in runs)
    )
    for r in runs:
        check_after_kill(r, setup["ref"])
        if r["sig"] != signal.SIGKILL:  # an interrupt or a term cleans up after itself
            assert debris(r["folder"]) == [], f"seed={SEED} {r['sig']} left {debris(r['folder'])}"
    # every folder: a re-run succeeds, gives the reference bytes and clears what SIGKILL left
    for r in runs:
        soupkit.merge(setup["recipe"], r["out"], max_shard_size=SHARD, force=True)
        assert outputs(r["out"]) == setup["ref"], f"seed={SEED}"
        assert debris(r["folder"]) == [], f"seed={SEED}"


def test_kill_then_resume_gives_identical_bytes(setup: dict[str, Any]) -> None:
    rng = random.Random(SEED + 1)
    runs = run_kills(setup, max(2, RUNS // 2), ("--resume",), rng)
    for r in runs:
        check_after_kill(r, setup["ref"])
        if r["out"].exists():
            continue
        kept = debris(r["folder"])
        assert len(kept) <= 1, f"seed={SEED} {kept}"
        soupkit.merge(setup["recipe"], r["out"], max_shard_size=SHARD, resume=True)
        assert outputs(r["out"]) == setup["ref"], f"seed={SEED}"
        assert debris(r["folder"]) == [], f"seed={SEED}"
