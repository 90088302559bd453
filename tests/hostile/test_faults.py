"""Faults: inputs never modified, output never an input, crashes / interrupts / full disks leave
nothing that looks complete and no debris, --resume continues byte-identically."""

from __future__ import annotations

import fcntl
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_helpers import debris, tree_state
from safetensors.torch import save_file

import soupkit
from soupkit.errors import CheckpointFormatError, MergeIOError, OutputExistsError, UsageError
from soupkit.io import writer as writer_mod
from soupkit.io.writer import JOURNAL_NAME, LOCK_NAME, ShardWriter, remove_stale


def make_models(root: Path, n: int = 3, rows: int = 40) -> list[Path]:
    """Folders with config files and 6 float tensors each (several shards at a 5 KB limit)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        folder = root / f"m{i}"
        folder.mkdir(parents=True)
        save_file(
            {f"layer{j}.weight": torch.randn(rows, 16, generator=g) for j in range(6)}
            | {"pos": torch.arange(8)},
            str(folder / "model.safetensors"),
        )
        (folder / "config.json").write_text('{"model_type": "tiny"}')
        out.append(folder)
    return out


def recipe(models: list[Path]) -> dict[str, Any]:
    return {"merge_method": "linear", "models": [{"model": str(m)} for m in models]}


SHARD = 5000  # bytes: ~6 output shards for the models above


def shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


# --- the output may not be an input -------------------------------------------------------------


def test_output_is_an_input_folder(tmp_path: Path) -> None:
    ms = make_models(tmp_path)
    for force in (False, True):
        with pytest.raises(
            UsageError, match="the output folder holds input .*m1/model.safetensors"
        ):
            soupkit.merge(recipe(ms), ms[1], force=force)
    assert (ms[1] / "model.safetensors").is_file()


def test_output_is_an_input_file(tmp_path: Path) -> None:
    ms = make_models(tmp_path)
    f = ms[0] / "model.safetensors"
    with pytest.raises(UsageError, match=r"the output is input"):
        soupkit.merge(recipe([f, ms[1]]), f, force=True)


def test_output_inside_an_input_folder(tmp_path: Path) -> None:
    ms = make_models(tmp_path)
    with pytest.raises(
        UsageError, match=rf"the output would be inside the input model folder {ms[2]}"
    ):
        soupkit.merge(recipe(ms), ms[2] / "merged")
    assert not (ms[2] / "merged").exists() and not debris(ms[2])


def test_output_folder_holding_inputs_is_refused_even_with_force(tmp_path: Path) -> None:
    ms = make_models(tmp_path / "models")
    before = tree_state(tmp_path)
    with pytest.raises(UsageError, match="would destroy that input"):
        soupkit.merge(recipe(ms), tmp_path / "models", force=True)
    with pytest.raises(UsageError, match="would destroy that input"):
        soupkit.merge(recipe(ms), tmp_path, force=True)
    assert tree_state(tmp_path) == before


def test_symlinks_to_inputs_are_resolved(tmp_path: Path) -> None:
    ms = make_models(tmp_path)
    os.symlink(ms[0], tmp_path / "alias")
    with pytest.raises(UsageError, match="holds input"):
        soupkit.merge(recipe(ms), tmp_path / "alias", force=True)
    with pytest.raises(UsageError, match="inside the input model folder"):
        soupkit.merge(recipe(ms), tmp_path / "alias" / "out")
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(UsageError, match="not a usable output path"):
        soupkit.merge(recipe(ms), tmp_path / "loop")


def test_output_may_not_replace_the_tokenizer_source(tmp_path: Path) -> None:
    ms = make_models(tmp_path)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    with pytest.raises(UsageError, match="where the config and tokenizer files come from"):
        soupkit.merge({**recipe(ms), "tokenizer_source": str(tok)}, tok, force=True)
    assert (tok / "tokenizer.json").is_file()


def test_output_beside_a_file_input_is_fine(tmp_path: Path) -> None:
    ms = make_models(tmp_path)
    files = [m / "model.safetensors" for m in ms]
    soupkit.merge(recipe(files), ms[0].parent / "soup")
    assert (tmp_path / "soup" / "model.safetensors").is_file()


# --- an existing output ---------------------------------------------------------------------------


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from soupkit.cli import main

    ms = make_models(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rp = tmp_path / "r.yaml"
    rp.write_text(json.dumps(recipe(ms)))
    assert main(["merge", str(rp), str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: OutputExistsError: {out}: output folder exists and is not empty" in err
        and "--force" in err
    )
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["merge", str(rp), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not debris(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputExistsError, match="exists and is not a folder"):
        soupkit.merge(recipe(ms), tmp_path / "afile")
    # an empty existing folder is fine without --force
    (tmp_path / "empty").mkdir()
    soupkit.merge(recipe(ms), tmp_path / "empty")


# --- inputs are never modified --------------------------------------------------------------------


def test_inputs_untouched_by_merge_force_and_resume(tmp_path: Path) -> None:
    ms = make_models(tmp_path / "in")
    before = tree_state(tmp_path / "in")
    soupkit.merge(recipe(ms), tmp_path / "a", max_shard_size=SHARD)
    soupkit.merge(recipe(ms), tmp_path / "a", max_shard_size=SHARD, force=True)
    soupkit.merge(recipe(ms), tmp_path / "b", max_shard_size=SHARD, resume=True)
    assert tree_state(tmp_path / "in") == before


def test_input_changed_during_the_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ms = make_models(tmp_path)
    real = soupkit.api.merging.run_plan

    def run_then_touch(*a: Any, **k: Any) -> Any:
        stats = real(*a, **k)
        os.utime(ms[1] / "model.safetensors", ns=(1, 1))  # another program rewrote it meanwhile
        return stats

    monkeypatch.setattr(soupkit.api.merging, "run_plan", run_then_touch)
    with pytest.raises(
        CheckpointFormatError,
        match=r"m1/model.safetensors: the input file changed while soupkit was merging it",
    ):
        soupkit.merge(recipe(ms), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not debris(tmp_path)


# --- crashes and interrupts at random points ------------------------------------------------------


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, MemoryError])
def test_failure_at_random_points_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: type[BaseException]
) -> None:
    ms = make_models(tmp_path / "in")
    ref = soupkit.merge(recipe(ms), tmp_path / "ref", max_shard_size=SHARD, chunk_elems=100)
    calls = {"n": 0}
    real_write = ShardWriter.write

    def counting(self: ShardWriter, *a: Any, **k: Any) -> None:
        calls["n"] += 1
        real_write(self, *a, **k)

    monkeypatch.setattr(ShardWriter, "write", counting)
    soupkit.merge(recipe(ms), tmp_path / "count", max_shard_size=SHARD, chunk_elems=100)
    total = calls["n"]
    rng = random.Random(7)
    for k in sorted(rng.sample(range(1, total + 1), 6)) + [total]:

        def failing(self: ShardWriter, *a: Any, _k: int = k, **kw: Any) -> None:
            calls["n"] += 1
            if calls["n"] == _k:
                raise exc("injected")
            real_write(self, *a, **kw)

        calls["n"] = 0
        monkeypatch.setattr(ShardWriter, "write", failing)
        with pytest.raises(exc):
            soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD, chunk_elems=100)
        assert not (tmp_path / "out").exists(), k
        assert not debris(tmp_path), k
    monkeypatch.setattr(ShardWriter, "write", real_write)
    soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD, chunk_elems=100)
    assert shards(tmp_path / "out") == shards(ref.out)


def test_interrupt_while_writing_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = make_models(tmp_path / "in")

    def boom(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(soupkit.api.merging, "_report", boom)
    with pytest.raises(KeyboardInterrupt):
        soupkit.merge(recipe(ms), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not debris(tmp_path)


class _SignalledInDel:
    """Raises an interrupt from ``__del__``, as a signal arriving during garbage collection does:
    Python cannot propagate it there and would print "Exception ignored" and carry on."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __del__(self) -> None:
        raise self.exc


@pytest.mark.parametrize("term", [False, True], ids=["SIGINT", "SIGTERM"])
def test_interrupt_swallowed_by_python_still_cancels_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], term: bool
) -> None:
    """CI once saw SIGTERM land in a weakref callback: the merge finished, exit 0, traceback printed."""
    from soupkit.cli import Terminated, main

    ms = make_models(tmp_path / "in")
    (tmp_path / "r.yaml").write_text(json.dumps(recipe(ms)))
    real_report = soupkit.api.merging._report

    def report_then_signal(*a: Any, **k: Any) -> Any:
        out = real_report(*a, **k)
        _SignalledInDel(
            Terminated() if term else KeyboardInterrupt()
        )  # dropped at once: __del__ runs
        return out

    monkeypatch.setattr(soupkit.api.merging, "_report", report_then_signal)
    code = main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == (143 if term else 130)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.rstrip().endswith(
        f"{'terminated' if term else 'interrupted'}: no unfinished output was left in place"
    )
    assert not (tmp_path / "out").exists() and not debris(tmp_path)
    # Later runs are not cancelled by the old interrupt.
    monkeypatch.setattr(soupkit.api.merging, "_report", real_report)
    assert main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0


def test_signal_during_the_engine_waits_for_a_safe_point(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A SIGINT is held while the engine's threads hold queue locks and raised between units
    (raised inside queue internals it once left a lock taken and the clean-up hung)."""
    import signal
    import threading

    from soupkit.engine import MemorySink, run_plan

    ms = make_models(tmp_path / "in")
    p = soupkit.plan(recipe(ms))
    threads_before = threading.active_count()
    calls: list[str] = []
    # A shell starts background jobs with SIGINT ignored (CI may run us that way): use Python's
    # usual handler for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    def progress(n: int) -> None:
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)
        calls.append("returned")  # not reached if the signal raised inside the callback

    with pytest.raises(KeyboardInterrupt):
        run_plan(p, MemorySink(p), progress=progress)
    assert calls == ["returned"]  # raised at the next safe point, before any further unit
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert threading.active_count() == threads_before  # reader and writer threads stopped
    # Without a signal nothing is held back and the run completes.
    assert run_plan(p, MemorySink(p)).tensors == len(p.jobs)


def test_sigterm_during_a_cli_merge_is_held_then_cancels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal

    from soupkit.cli import main

    ms = make_models(tmp_path / "in")
    (tmp_path / "r.yaml").write_text(json.dumps(recipe(ms)))
    real_report = soupkit.api.merging._report

    def report_then_sigterm(*a: Any, **k: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_report(*a, **k)

    monkeypatch.setattr(soupkit.api.merging, "_report", report_then_sigterm)
    # the handler the CLI found (SIG_DFL in a fresh process; an earlier test's library, such as
    # ray.init's, may have installed another) is the one it leaves
    before = signal.getsignal(signal.SIGTERM)
    code = main(["merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 143 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not debris(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before


def test_other_unraisable_exceptions_still_reach_the_previous_hook(tmp_path: Path) -> None:
    import sys

    ms = make_models(tmp_path / "in")
    seen: list[BaseException] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
        from soupkit._util import interrupts as _interrupts

        mp.setattr(_interrupts, "_installed", False)
        with writer_mod.OutputFolder(tmp_path / "out"):
            _SignalledInDel(ValueError("not an interrupt"))
    assert [str(e) for e in seen] == ["not an interrupt"]
    assert (tmp_path / "out").is_dir() and ms


def test_disk_full_is_a_clear_error_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = make_models(tmp_path / "in")
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", pwrite)
    with pytest.raises(MergeIOError) as ei:
        soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD)
    msg = str(ei.value)
    assert "write failed (No space left on device)" in msg and "hint: the disk is full" in msg
    assert not (tmp_path / "out").exists() and not debris(tmp_path)


def test_disk_full_while_writing_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ms = make_models(tmp_path / "in")

    def full(self: Path, *a: Any, **k: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(
        MergeIOError,
        match=r"model.safetensors.index.json: cannot write \(No space left on device\)",
    ):
        soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD)
    monkeypatch.undo()
    assert not (tmp_path / "out").exists() and not debris(tmp_path)


@pytest.mark.parametrize("where", ["README.md", "config.json", "tokenizer.json"])
def test_disk_full_while_writing_small_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    ms = make_models(tmp_path / "in")
    for m in ms:
        (m / "tokenizer.json").write_text('{"version": "1.0"}')

    def full(*args: Any) -> int:
        raise OSError(28, "No space left on device")

    if where != "tokenizer.json":  # written whole (config.json is parsed to name the dtype written)
        real_write = Path.write_bytes

        def full_for(self: Path, *args: Any) -> int:
            return full() if self.name == where else real_write(self, *args)

        monkeypatch.setattr(Path, "write_bytes", full_for)
    else:  # other carried files are copied in blocks (soupkit.io.writer.copy_file)
        import io

        import soupkit.io.writer as writer

        class Full(io.FileIO):
            write = full

        real_open = open

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            return Full(file, "wb") if mode == "wb" else real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(writer, "open", fake_open, raising=False)
    with pytest.raises(
        MergeIOError,
        match=rf"{where}: cannot write \(No space left on device\)\nhint: the disk is full",
    ):
        soupkit.merge(recipe(ms), tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists() and not debris(tmp_path)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Any:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk(tmp_path: Path, tiny_tmpfs: Path) -> None:
    ms = make_models(tmp_path / "in", rows=400)  # ~77 KB of output: more than the 64 KB tmpfs
    with pytest.raises(MergeIOError, match="No space left on device"):
        soupkit.merge(recipe(ms), tiny_tmpfs / "out", max_shard_size=20_000)
    assert list(tiny_tmpfs.iterdir()) == []


# --- stale debris from killed runs ----------------------------------------------------------------


def fake_partial(parent: Path, name: str, dest: Path) -> Path:
    d = parent / name
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"half")
    (d / LOCK_NAME).write_text(str(dest.absolute()))
    return d


def test_stale_partials_of_killed_runs_are_removed(tmp_path: Path) -> None:
    ms = make_models(tmp_path / "in")
    dest = tmp_path / "out"
    dead = fake_partial(tmp_path, ".soupkit-partial-out-abc123", dest)
    dead_old = fake_partial(tmp_path, ".soupkit-old-out-x1", dest)
    other = fake_partial(
        tmp_path, ".soupkit-partial-out-2-zzz", tmp_path / "out-2"
    )  # another destination
    live = fake_partial(tmp_path, ".soupkit-partial-out-live", dest)
    fd = os.open(live / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run that is still going
    try:
        soupkit.merge(recipe(ms), dest)
        assert not dead.exists() and not dead_old.exists()
        assert other.exists() and live.exists()
    finally:
        os.close(fd)
    assert remove_stale(dest) == [live]


def test_partial_without_lock_file_is_left_alone(tmp_path: Path) -> None:
    d = tmp_path / ".soupkit-partial-out-nolock"
    d.mkdir()
    assert remove_stale(tmp_path / "out") == [] and d.exists()


# --- resume ---------------------------------------------------------------------------------------


def interrupt_after_shards(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Raise KeyboardInterrupt right after the n-th output shard is finished (and journaled)."""
    from soupkit.io.output import ShardFiles

    real = ShardFiles._finish
    count = {"n": 0}

    def finish(self: ShardFiles, w: ShardWriter) -> None:
        real(self, w)
        count["n"] += 1
        if count["n"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardFiles, "_finish", finish)


def test_resume_continues_from_verified_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = make_models(tmp_path / "in")
    ref = soupkit.merge(recipe(ms), tmp_path / "ref", max_shard_size=SHARD)
    assert len(ref.plan.shards) >= 4
    out = tmp_path / "out"
    interrupt_after_shards(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        soupkit.merge(recipe(ms), out, max_shard_size=SHARD, resume=True)
    monkeypatch.undo()
    assert not out.exists()
    (partial,) = [tmp_path / d for d in debris(tmp_path)]
    lines = (partial / JOURNAL_NAME).read_text().splitlines()
    assert len(lines) == 4 and "fingerprint" in lines[0]
    # tamper with one finished shard: it must be recomputed, not trusted
    first = json.loads(lines[1])["file"]
    data = bytearray((partial / first).read_bytes())
    data[-1] ^= 0xFF
    (partial / first).write_bytes(bytes(data))
    r = soupkit.merge(recipe(ms), out, max_shard_size=SHARD, resume=True)
    assert r.stats.skipped > 0
    assert shards(out) == shards(ref.out)
    report = json.loads((out / "soupkit-report.json").read_text())
    assert report["stats"]["resumed_shards"] == 2
    assert not (out / JOURNAL_NAME).exists() and not (out / LOCK_NAME).exists()
    assert not debris(tmp_path)


def test_without_resume_an_interrupted_run_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = make_models(tmp_path / "in")
    interrupt_after_shards(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD)
    assert not debris(tmp_path) and not (tmp_path / "out").exists()


def test_resume_with_a_changed_recipe_starts_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = make_models(tmp_path / "in")
    interrupt_after_shards(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD, resume=True)
    monkeypatch.undo()
    (old,) = debris(tmp_path)
    changed = recipe(ms)
    changed["models"][0]["parameters"] = {"weight": 2.0}
    r = soupkit.merge(changed, tmp_path / "out", max_shard_size=SHARD, resume=True)
    assert r.stats.skipped == 0 and not debris(tmp_path)
    ref = soupkit.merge(changed, tmp_path / "ref", max_shard_size=SHARD)
    assert shards(tmp_path / "out") == shards(ref.out)


def test_resume_refuses_a_concurrent_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ms = make_models(tmp_path / "in")
    interrupt_after_shards(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD, resume=True)
    monkeypatch.undo()
    (partial,) = [tmp_path / d for d in debris(tmp_path)]
    fd = os.open(partial / LOCK_NAME, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # pretend another process resumed it a moment ago
    try:
        with pytest.raises(
            MergeIOError, match="another soupkit run is writing this output right now"
        ):
            soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD, resume=True)
    finally:
        os.close(fd)
    soupkit.merge(recipe(ms), tmp_path / "out", max_shard_size=SHARD, resume=True)
    assert not debris(tmp_path)
