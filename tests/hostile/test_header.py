"""Every malformed safetensors file gives a CheckpointFormatError naming the file and the problem."""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile_helpers import entry, good_file, raw_file, run_cli

import soupkit
from soupkit.errors import CheckpointFormatError
from soupkit.io.header import MAX_HEADER_BYTES, read_safetensors_header

F32_8 = entry("F32", [2], 0, 8)
Builder = Callable[[Path], Path]

CASES: list[tuple[str, Builder, list[str]]] = [
    ("empty", lambda p: (p.write_bytes(b""), p)[1], ["file is 0 bytes, too short", "truncated"]),
    ("five-bytes", lambda p: (p.write_bytes(b"\x01\x02\x03\x04\x05"), p)[1], ["file is 5 bytes"]),
    (
        "length-beyond-file",
        lambda p: raw_file(p, {"t": F32_8}, b"\0" * 8, length=10_000),
        ["header length field says 10000 bytes but the file has only", "truncated"],
    ),
    (
        "length-over-100MB",
        lambda p: raw_file(p, b"{}", length=MAX_HEADER_BYTES + 1),
        [
            "not a safetensors file: the first 8 bytes are not a plausible header length (file is 10 bytes)",
            f"at most {MAX_HEADER_BYTES} bytes",
        ],
    ),
    (
        "length-2^64-1",
        lambda p: raw_file(p, b"{}", length=2**64 - 1),
        ["not a plausible header length"],
    ),
    (
        "truncated-data",
        lambda p: raw_file(p, {"t": entry("F32", [4], 0, 16)}, b"\0" * 9),
        ["tensor 't': data_offsets [0, 16] outside the data buffer of 9 bytes", "truncated"],
    ),
    ("not-json", lambda p: raw_file(p, b"{not json}     "), ["header is not valid JSON"]),
    ("json-array", lambda p: raw_file(p, [1, 2]), ["header is a JSON list, expected an object"]),
    ("json-string", lambda p: raw_file(p, '"hello"'), ["header is a JSON str, expected an object"]),
    ("not-utf8", lambda p: raw_file(p, b'{"\xff\xfe": 1}'), ["header is not valid UTF-8 (byte 2)"]),
    (
        "nan-token",
        lambda p: raw_file(p, '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, NaN]}}'),
        ["token NaN", "JSON does not allow"],
    ),
    (
        "infinity-token",
        lambda p: raw_file(p, '{"__metadata__": {"a": -Infinity}}'),
        ["token -Infinity"],
    ),
    ("deeply-nested", lambda p: raw_file(p, "[" * 200_000), ["nested too deeply"]),
    ("deeply-nested-objects", lambda p: raw_file(p, '{"a":' * 100_000), ["nested too deeply"]),
    (
        "huge-integer-literal",
        lambda p: raw_file(
            p, '{"t": {"dtype": "F32", "shape": [1' + "0" * 5000 + '], "data_offsets": [0, 4]}}'
        ),
        ["header is not valid JSON", "digits"],
    ),
    (
        "offset-past-buffer",
        lambda p: raw_file(p, {"t": entry("F32", [2], 0, 8)}, b"\0" * 4),
        ["tensor 't': data_offsets [0, 8] outside the data buffer of 4 bytes"],
    ),
    (
        "negative-offset",
        lambda p: raw_file(p, {"t": entry("F32", [2], -8, 0)}, b"\0" * 8),
        ["data_offsets [-8, 0] outside the data buffer"],
    ),
    (
        "reversed-offsets",
        lambda p: raw_file(p, {"t": entry("F32", [0], 8, 0)}, b"\0" * 8),
        ["data_offsets [8, 0] outside"],
    ),
    (
        "float-offsets",
        lambda p: raw_file(
            p, {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}, b"\0" * 8
        ),
        ["data_offsets [0.0, 8.0] is not [begin, end]"],
    ),
    (
        "bool-offsets",
        lambda p: raw_file(
            p, {"t": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"\0"
        ),
        ["data_offsets [False, True] is not [begin, end]"],
    ),
    (
        "three-offsets",
        lambda p: raw_file(
            p, {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, b"\0"
        ),
        ["is not [begin, end]"],
    ),
    (
        "string-offsets",
        lambda p: raw_file(p, {"t": {"dtype": "U8", "shape": [1], "data_offsets": "0-1"}}, b"\0"),
        ["is not [begin, end]"],
    ),
    (
        "overlap",
        lambda p: raw_file(p, {"a": F32_8, "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
        ["tensor 'b' overlaps tensor 'a'"],
    ),
    (
        "same-range-twice",
        lambda p: raw_file(p, {"a": F32_8, "b": F32_8}, b"\0" * 8),
        ["overlaps tensor"],
    ),
    (
        "hole",
        lambda p: raw_file(p, {"t": entry("F32", [2], 8, 16)}, b"\0" * 16),
        ["data buffer has a hole of 8 bytes before tensor 't'"],
    ),
    (
        "trailing-bytes",
        lambda p: raw_file(p, {"t": F32_8}, b"\0" * 12),
        ["4 bytes after the last tensor are not described by the header"],
    ),
    (
        "dtype-shape-mismatch",
        lambda p: raw_file(p, {"t": entry("F32", [3], 0, 8)}, b"\0" * 8),
        ["tensor 't': holds 8 bytes but dtype F32 x shape [3] needs 12"],
    ),
    (
        "unknown-dtype",
        lambda p: raw_file(p, {"t": entry("F128", [1], 0, 16)}, b"\0" * 16),
        ["tensor 't': unknown dtype 'F128'", "known dtypes: F64, F32"],
    ),
    (
        "dtype-not-string",
        lambda p: raw_file(p, {"t": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        ["unknown dtype 4"],
    ),
    (
        "duplicate-tensor",
        lambda p: raw_file(
            p,
            '{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
            '"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
            b"\0",
        ),
        ["header names key 't' twice in one object"],
    ),
    (
        "duplicate-field",
        lambda p: raw_file(
            p, '{"t": {"dtype": "U8", "dtype": "F32", "shape": [1], "data_offsets": [0, 1]}}', b"\0"
        ),
        ["names key 'dtype' twice"],
    ),
    (
        "duplicate-metadata",
        lambda p: raw_file(p, '{"__metadata__": {}, "__metadata__": {}}'),
        ["names key '__metadata__' twice"],
    ),
    (
        "shape-overflows-int64",
        lambda p: raw_file(p, {"t": entry("F32", [2**40, 2**40], 0, 0)}),
        ["tensor 't': shape [1099511627776, 1099511627776] is too large"],
    ),
    (
        "dim-beyond-int64",
        lambda p: raw_file(p, {"t": entry("U8", [0, 2**70], 0, 0)}),
        ["is too large"],
    ),
    (
        "product-wraps-to-small",
        lambda p: raw_file(p, {"t": entry("U8", [2**32, 2**32, 1], 0, 0)}),
        ["is too large"],
    ),
    (
        "negative-dim",
        lambda p: raw_file(p, {"t": entry("F32", [-1, 2], 0, 8)}, b"\0" * 8),
        ["shape [-1, 2] is not a list of non-negative integers"],
    ),
    (
        "bool-dim",
        lambda p: raw_file(
            p, {"t": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"\0"
        ),
        ["shape [True] is not a list"],
    ),
    (
        "float-dim",
        lambda p: raw_file(
            p, {"t": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}, b"\0"
        ),
        ["shape [1.0] is not a list"],
    ),
    (
        "shape-not-list",
        lambda p: raw_file(p, {"t": {"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}}, b"\0"),
        ["shape 1 is not a list"],
    ),
    (
        "65-dims",
        lambda p: raw_file(p, {"t": entry("U8", [1] * 65, 0, 1)}, b"\0"),
        ["65 dimensions, at most 64"],
    ),
    (
        "metadata-list",
        lambda p: raw_file(p, {"__metadata__": ["a"]}),
        ["__metadata__ is a JSON list, expected an object"],
    ),
    (
        "metadata-int-value",
        lambda p: raw_file(p, {"__metadata__": {"k": 1}}),
        ["__metadata__['k'] is a JSON int, expected a string"],
    ),
    (
        "metadata-nested",
        lambda p: raw_file(p, {"__metadata__": {"k": {"x": "y"}}}),
        ["__metadata__['k'] is a JSON dict"],
    ),
    (
        "metadata-surrogate",
        lambda p: raw_file(p, '{"__metadata__": {"k": "\\udc80"}}'),
        ["not valid Unicode"],
    ),
    (
        "name-lone-surrogate",
        lambda p: raw_file(
            p, '{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"
        ),
        ["is not valid Unicode (a lone surrogate escape)"],
    ),
    (
        "entry-not-object",
        lambda p: raw_file(p, {"t": 5}),
        ["tensor 't': entry is a int, expected an object"],
    ),
    (
        "entry-missing-key",
        lambda p: raw_file(p, {"t": {"dtype": "U8", "data_offsets": [0, 1]}}, b"\0"),
        ["missing ['shape']"],
    ),
    (
        "entry-extra-key",
        lambda p: raw_file(p, {"t": {**entry("U8", [1], 0, 1), "x": 1}}, b"\0"),
        ["unexpected ['x']"],
    ),
]


@pytest.mark.parametrize("name,build,parts", CASES, ids=[c[0] for c in CASES])
def test_malformed_header(tmp_path: Path, name: str, build: Builder, parts: list[str]) -> None:
    path = build(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointFormatError) as ei:
        read_safetensors_header(path)
    assert type(ei.value) is CheckpointFormatError
    msg = str(ei.value)
    assert msg.startswith(f"{path}: "), msg
    for part in parts:
        assert part in msg, (part, msg)


@pytest.mark.parametrize(
    "name,build,parts",
    [
        c
        for c in CASES
        if c[0] in {"truncated-data", "nan-token", "overlap", "shape-overflows-int64"}
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_cli_reports_malformed_file_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, build: Builder, parts: list[str]
) -> None:
    from soupkit.cli import main

    path = build(tmp_path / "bad.safetensors")
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: CheckpointFormatError: {path}: ") and parts[0] in err


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path: Path) -> None:
    path = raw_file(tmp_path / "bad.safetensors", {"t": entry("F32", [3], 0, 8)}, b"\0" * 8)
    r = run_cli("inspect", str(path))
    assert r.returncode == 1, r.stderr
    assert r.stderr == (
        f"error: CheckpointFormatError: {path}: tensor 't': holds 8 bytes but dtype F32 x "
        "shape [3] needs 12\n"
    )


def test_error_names_the_model_in_a_recipe(tmp_path: Path) -> None:
    good = good_file(tmp_path / "good.safetensors")
    bad = raw_file(tmp_path / "bad.safetensors", {"t0": entry("F32", [4, 3], 0, 48)}, b"\0" * 20)
    with pytest.raises(soupkit.PlanError) as ei:
        soupkit.plan(
            {"merge_method": "linear", "models": [{"model": str(good)}, {"model": str(bad)}]}
        )
    assert (
        f"models[1]: {bad}: tensor 't0': data_offsets [0, 48] outside the data buffer of 20 bytes"
        in str(ei.value)
    )


def test_hundreds_of_thousands_of_entries_parse_in_bounded_time(tmp_path: Path) -> None:
    n = 200_000

    def text(last_size: int) -> str:
        body = ",".join(
            f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}'
            for i in range(n - 1)
        )
        return (
            "{"
            + body
            + f',"t{n - 1}":{{"dtype":"U8","shape":[{last_size}],"data_offsets":[{n - 1},{n - 1 + last_size}]}}}}'
        )

    good = raw_file(tmp_path / "many.safetensors", text(1), b"\0" * n)
    bad = raw_file(
        tmp_path / "many-bad.safetensors", text(2), b"\0" * n
    )  # only the very last entry is wrong
    t0 = time.process_time()  # CPU time: waiting for a core on a loaded machine does not count
    assert len(read_safetensors_header(good).tensors) == n
    with pytest.raises(
        CheckpointFormatError,
        match=rf"tensor 't{n - 1}': data_offsets \[{n - 1}, {n + 1}\] outside",
    ):
        read_safetensors_header(bad)
    # ~1 s on an idle core; a check that is quadratic in the entry count would take hours
    assert time.process_time() - t0 < 30


def test_valid_edge_cases_still_parse(tmp_path: Path) -> None:
    # no tensors at all, null metadata, zero-size tensors, a scalar: all legal in the format
    h = read_safetensors_header(raw_file(tmp_path / "empty.safetensors", {}))
    assert h.tensors == {}
    h = read_safetensors_header(
        raw_file(
            tmp_path / "nullmeta.safetensors",
            {"__metadata__": None, "s": entry("F32", [], 0, 4), "z": entry("F32", [0, 3], 4, 4)},
            b"\0" * 4,
        )
    )
    assert h.tensors["s"].shape == () and h.tensors["z"].nbytes == 0


@pytest.fixture
def alarm() -> object:
    """Fail instead of hanging forever if a test blocks."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError("blocked: soupkit hung on a hostile file")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(20)
    yield None
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_fifo_does_not_hang(tmp_path: Path, alarm: object) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(
        CheckpointFormatError, match="is a FIFO, expected a regular .safetensors file"
    ):
        read_safetensors_header(fifo)
    with pytest.raises(CheckpointFormatError, match="is not a regular file or a folder"):
        soupkit.open_checkpoint(fifo)
    # inside a folder: `model.safetensors` is a FIFO -> refused, not read
    with pytest.raises(CheckpointFormatError):
        soupkit.open_checkpoint(tmp_path)


def test_device_file_is_refused(alarm: object) -> None:
    with pytest.raises(CheckpointFormatError, match="/dev/zero: is a device"):
        read_safetensors_header("/dev/zero")


def test_directory_and_missing_and_nul_paths(tmp_path: Path) -> None:
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointFormatError, match="is a directory"):
        read_safetensors_header(tmp_path / "d.safetensors")
    with pytest.raises(CheckpointFormatError, match="no such file"):
        read_safetensors_header(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointFormatError, match="cannot contain a NUL byte"):
        soupkit.open_checkpoint(str(tmp_path / "a\x00b"))


def without_stamps(p: Any) -> Any:
    """The plan with its inputs' file identities forgotten (so only the reader's checks remain)."""
    return dataclasses.replace(p, models=tuple(dataclasses.replace(c, stamps={}) for c in p.models))


def test_file_that_shrinks_after_the_header_was_read(tmp_path: Path) -> None:
    a = good_file(tmp_path / "a.safetensors", 0)
    b = good_file(tmp_path / "b.safetensors", 1)
    p = soupkit.plan({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]})
    size = b.stat().st_size
    with open(b, "r+b") as f:
        f.truncate(size - 20)
    from soupkit.api.merging import run_merge_plan

    with pytest.raises(CheckpointFormatError, match="changed after it was planned"):
        run_merge_plan(p, tmp_path / "out")
    # without the plan's file identities (as for a plan built by hand), the reader still
    # notices when the data runs out
    with pytest.raises(CheckpointFormatError) as ei:
        run_merge_plan(without_stamps(p), tmp_path / "out")
    msg = str(ei.value)
    assert str(b) in msg and "truncated or changed while soupkit was reading it" in msg
    assert not (tmp_path / "out").exists()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".soupkit-")]


def test_file_replaced_by_fifo_after_planning(tmp_path: Path, alarm: object) -> None:
    a = good_file(tmp_path / "a.safetensors", 0)
    b = good_file(tmp_path / "b.safetensors", 1)
    p = soupkit.plan({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]})
    b.unlink()
    os.mkfifo(b)
    from soupkit.api.merging import run_merge_plan

    with pytest.raises(CheckpointFormatError, match="changed after it was planned"):
        run_merge_plan(p, tmp_path / "out", hash_inputs=False)
    with pytest.raises(CheckpointFormatError, match="is a FIFO"):
        run_merge_plan(without_stamps(p), tmp_path / "out", hash_inputs=False)
    assert not (tmp_path / "out").exists()


def test_a_valid_file_round_trips(tmp_path: Path) -> None:
    # the strict checks above accept what the reference writer produces
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.zeros(0, 2, dtype=torch.bfloat16),
        "c": torch.tensor(3, dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "k": "v"})
    h = read_safetensors_header(tmp_path / "x.safetensors")
    assert h.metadata == {"format": "pt", "k": "v"} and set(h.tensors) == {"a", "b", "c"}
    (n,) = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])
    assert h.data_start == 8 + n
