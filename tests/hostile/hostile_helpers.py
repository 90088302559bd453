"""Builders for hostile files and helpers shared by the tests in tests/hostile/."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]


def raw_file(
    path: Path, header: Any, data: bytes = b"", *, length: int | None = None, pad: bool = True
) -> Path:
    """Write a safetensors-shaped file with an arbitrary header (object, str or bytes).

    Args:
        path: where.
        header: a JSON-able object, or the header text / bytes exactly as they should appear.
        data: the data buffer.
        length: the 8-byte length field (default: the real header length).
        pad: pad a generated header with spaces to a multiple of 8, as writers do.
    """
    if isinstance(header, bytes):
        text = header
    elif isinstance(header, str):
        text = header.encode("utf-8")
    else:
        text = json.dumps(header).encode("utf-8")
        if pad:
            text += b" " * (-len(text) % 8)
    n = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def good_file(path: Path, seed: int = 0, n: int = 3) -> Path:
    """A valid safetensors file with ``n`` small float32 tensors."""
    g = torch.Generator().manual_seed(seed)
    save_file({f"t{i}": torch.randn(4, 3, generator=g) for i in range(n)}, str(path))
    return path


def sharded_folder(folder: Path, seed: int = 0) -> Path:
    """A valid two-shard Hugging Face folder (tensors a, b in shard 1; c in shard 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"a": torch.randn(4, generator=g), "b": torch.randn(2, 2, generator=g)},
        str(folder / "model-00001-of-00002.safetensors"),
    )
    save_file({"c": torch.randn(3, generator=g)}, str(folder / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 36},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00001-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_index(
    folder: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json"
) -> None:
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m soupkit.cli ARGS`` in a fresh interpreter."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        **(env or {}),
    }
    full_env.pop("SOUPKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "soupkit.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree_state(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder``: (size, mtime_ns, sha256) - to prove inputs are untouched."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


def debris(parent: Path) -> list[str]:
    """Hidden soupkit work folders left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".soupkit-"))


def cli_child(argv: list[str], log: str, threads: int | None = None) -> None:
    """Run ``soupkit`` with ``argv`` in this (forked) process, stdout and stderr into ``log``.

    The target of `cli_process`: such processes start without re-importing torch (the fork
    server preloaded soupkit), so a kill test costs the merge, not the start-up.
    """
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if threads is not None:
        torch.set_num_threads(threads)
    import signal
    import threading

    # As in a terminal: a shell starts background jobs (CI, nohup) with SIGINT ignored, which
    # the fork server would pass on, and the SIGINT kills would then test nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore; a SIGKILLed child cannot release it
    # and the resource tracker then warns about leaks. A thread lock does the same job here.
    tqdm.set_lock(threading.RLock())
    from soupkit.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


_CTX: Any = None


def cli_process(argv: list[str], log: Path, threads: int | None = None) -> Any:
    """Start ``soupkit ARGV`` as a separate process (a `multiprocessing` fork-server child).

    The fork server imports soupkit once (before any torch op, so forking is safe); every
    process it forks is a real, separately killable process running the CLI's ``main``.
    """
    import multiprocessing

    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["soupkit.cli", "hostile_helpers"])
    proc = _CTX.Process(target=cli_child, args=(argv, str(log), threads))
    proc.start()
    return proc
