"""Hostile inputs, round two (issue 15): the recipe, the carried files, messages and links.

Each test builds its hostile input from the issue's description and asserts a clear one-line
error (exit 1 or 2) in bounded time and memory, or a correct result.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile_helpers import entry, raw_file, run_cli, sharded_folder
from safetensors.torch import save_file

import soupkit
from soupkit.api.merging import run_merge_plan
from soupkit.cli import main
from soupkit.errors import MAX_SHOWN_CHARS, CheckpointFormatError, shown
from soupkit.io.checkpoint import MAX_CARRY_BYTES, carried_files
from soupkit.io.links import resolve_model_file, snapshot_blobs
from soupkit.recipe import schema as config


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``soupkit ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


# --- 6: terminal and log injection ----------------------------------------------------------

NASTY = ["w\x1b[2J\x1b]0;T\x07", "b\nerror: fake", "bidi\u202eexe.txt"]


def _no_control_bytes(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert not any(line.startswith("error: fake") for line in text.splitlines())


def test_shown_escapes_and_cuts() -> None:
    assert shown("w\x1b[2J") == "w\\x1b[2J"
    assert shown("b\nerror: fake", quote=True) == "'b\\nerror: fake'"
    assert shown("plain/path.safetensors") == "plain/path.safetensors"
    long = shown("x" * 5_000_000)
    assert len(long) < MAX_SHOWN_CHARS + 40 and long.endswith(
        f"({5_000_000 - MAX_SHOWN_CHARS} more characters)"
    )
    assert shown(Path("/tmp/a\x1bb")) == "/tmp/a\\x1bb"
    assert shown(b"bad\xff") == "bad\\udcff"  # an undecodable file name byte


def test_inspect_escapes_tensor_names(tmp_path: Path) -> None:
    save_file({n: torch.zeros(2) for n in NASTY}, str(tmp_path / "m.safetensors"))
    r = cli("inspect", str(tmp_path / "m.safetensors"))
    assert r.returncode == 0, r.stderr
    _no_control_bytes(r.stdout)
    assert "w\\x1b[2J\\x1b]0;T\\x07" in r.stdout and "b\\nerror: fake" in r.stdout
    r = cli("inspect", "--json", str(tmp_path / "m.safetensors"))
    _no_control_bytes(r.stdout)
    assert set(json.loads(r.stdout)["tensors"]) == set(NASTY)  # JSON keeps the exact names


def test_errors_escape_names_and_paths(tmp_path: Path) -> None:
    bad = raw_file(tmp_path / "m.safetensors", {NASTY[1]: entry("F99", [2], 0, 8)}, b"\0" * 8)
    r = cli("inspect", str(bad))
    assert r.returncode == 1
    _no_control_bytes(r.stderr)
    assert "unknown dtype" in r.stderr and "'b\\nerror: fake'" in r.stderr
    folder = tmp_path / "m\x1b]0;T\x07"
    folder.mkdir()
    r = cli("inspect", str(folder))
    assert r.returncode == 1 and "folder holds no checkpoint" in r.stderr
    _no_control_bytes(r.stderr)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps({"merge_method": "linear", "models": [{"model": str(tmp_path / "gone\x1b[2J")}]})
    )
    r = cli("validate", str(recipe))
    assert r.returncode in (1, 2) and "no such file" in r.stderr
    _no_control_bytes(r.stderr)


def test_a_5mb_tensor_name_gives_a_short_line(tmp_path: Path) -> None:
    name = "n" * 5_000_000
    bad = raw_file(tmp_path / "m.safetensors", {name: entry("F99", [2], 0, 8)}, b"\0" * 8)
    r = cli("inspect", str(bad))
    assert r.returncode == 1 and "unknown dtype" in r.stderr
    assert max(len(line) for line in r.stderr.splitlines()) < 1000
    save_file({name: torch.zeros(1)}, str(tmp_path / "ok.safetensors"))
    r = cli("inspect", str(tmp_path / "ok.safetensors"))
    assert r.returncode == 0 and max(len(line) for line in r.stdout.splitlines()) < 1000


# --- 7: bytes of unrelated files never leak into errors ----------------------------------------


def test_unrelated_file_reported_without_echoing_its_bytes(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    m = tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors").write_bytes(passwd.read_bytes())
    for given in (m, passwd):  # inside a model folder, and named directly
        with pytest.raises(CheckpointFormatError) as ei:
            soupkit.open_checkpoint(given)
        msg = str(ei.value)
        assert (
            "not a safetensors file: the first 8 bytes are not a plausible header length (file is 32 bytes)"
            in msg
        )
        assert str(int.from_bytes(b"root:x:0", "little")) not in msg and "root" not in msg.replace(
            str(tmp_path), ""
        )
    # the issue's `ln -s /etc/passwd m/model.safetensors`: the link rule refuses it unread
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").symlink_to(passwd)
    with pytest.raises(CheckpointFormatError, match="leads outside the model folder") as ei:
        soupkit.open_checkpoint(m)
    assert "header length" not in str(ei.value)


# --- 1: YAML alias and merge-key bombs ----------------------------------------------------------


def merge_key_bomb(levels: int = 8) -> str:
    """The issue's recipe: each level merges nine copies of the one before (9^8 pairs)."""
    y = "a0: &a0 {k0: 1, k1: 2}\n" + "".join(
        f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}\n" for i in range(1, levels + 1)
    )
    return y + "merge_method: linear\nmodels: [{model: m1}]\n"


def _bounded(fn: Callable[[], object]) -> tuple[float, int]:
    """CPU seconds and peak bytes Python allocated while ``fn`` ran.

    CPU time of this process, not wall time: on a loaded CI machine the test may wait for a core
    for longer than the bound, while the work an expanding bomb would do is counted either way.
    """
    tracemalloc.start()
    t = time.process_time()
    try:
        fn()
    finally:
        elapsed = time.process_time() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return elapsed, peak


@pytest.mark.parametrize(
    "text",
    [
        merge_key_bomb(8),
        merge_key_bomb(9),
        # the billion laughs with lists, used where the schema wants a list
        "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n"
            for i in range(8)
        )
        + "merge_method: linear\nmodels: [{model: m1, parameters: {weight: *i}}]\n",
    ],
)
def test_alias_and_merge_key_bombs_are_refused_fast(tmp_path: Path, text: str) -> None:
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(text)
    assert len(text.encode()) < 700

    def load() -> None:
        with pytest.raises(
            soupkit.ConfigError,
            match="more than 1,000,000 values once its aliases and merge keys are expanded",
        ):
            soupkit.load_recipe(recipe)

    elapsed, peak = _bounded(load)
    assert elapsed < 1.0 and peak < 5_000_000
    r = cli("validate", str(recipe))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "recipe refused" in r.stderr


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(soupkit.ConfigError, match="refers to the mapping or list that contains it"):
        soupkit.load_recipe("merge_method: linear\nmodels: &m [{model: a}, *m]\n")


def test_aliases_and_merge_keys_within_the_limit_still_work() -> None:
    text = (
        "merge_method: linear\n"
        "models:\n"
        "  - {model: a, parameters: &p {weight: 0.5}}\n"
        "  - {model: b, parameters: {<<: *p}}\n"
    )
    cfg = soupkit.load_recipe(text)
    assert [m.parameters["weight"] for m in cfg.models] == [0.5, 0.5]
    assert config.MAX_RECIPE_NODES == 1_000_000 and config.MAX_RECIPE_BYTES == 10_000_000


# --- 2: a recipe that is not a regular file --------------------------------------------------------


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _dev_zero(p: Path) -> Path:
    p.symlink_to("/dev/zero")
    return p


def _folder(p: Path) -> Path:
    p.mkdir()
    return p


@pytest.mark.parametrize(
    "build,kind", [(_fifo, "a FIFO"), (_dev_zero, "a device"), (_folder, "a folder")]
)
def test_recipe_that_is_not_a_regular_file(
    tmp_path: Path, build: Callable[[Path], Path], kind: str
) -> None:
    recipe = build(tmp_path / "r.yaml")
    with pytest.raises(
        soupkit.ConfigError,
        match=f"the recipe is {kind}, expected a regular YAML file; it was not read",
    ):
        soupkit.load_recipe(recipe)
    # a FIFO in a separate process: if it ever blocked again, the timeout ends it
    r = (
        run_cli("validate", str(recipe), timeout=60)
        if kind == "a FIFO"
        else cli("validate", str(recipe))
    )
    assert r.returncode == 2 and f"the recipe is {kind}" in r.stderr and "Traceback" not in r.stderr


def test_recipe_path_without_yaml_suffix(tmp_path: Path, models: list[Path]) -> None:
    recipe = tmp_path / "recipe"
    recipe.write_text(
        json.dumps({"merge_method": "linear", "models": [{"model": str(m)} for m in models]})
    )
    # the CLI's argument is always a file, whatever its name
    r = cli("validate", str(recipe))
    assert r.returncode == 0, r.stderr
    # the Python API: a Path is a file; a one-line str is a file only with a recipe suffix
    assert len(soupkit.load_recipe(recipe).models) == 3
    with pytest.raises(
        soupkit.ConfigError, match="is neither a recipe file .* nor the YAML text of a recipe"
    ):
        soupkit.load_recipe(str(recipe))
    with pytest.raises(soupkit.ConfigError, match="does not exist"):
        soupkit.load_recipe(str(tmp_path / "missing.yml"))


def test_recipe_over_the_size_limit(tmp_path: Path) -> None:
    recipe = tmp_path / "big.yaml"
    with open(recipe, "wb") as f:
        f.truncate(config.MAX_RECIPE_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(soupkit.ConfigError, match="recipes over 10,000,000 bytes are refused"):
        soupkit.load_recipe(recipe)


# --- 3: carried files have a size limit, and are copied streamed ---------------------------------


def _recipe(tmp_path: Path, models: list[Path]) -> Path:
    r = tmp_path / "r.yaml"
    r.write_text(
        json.dumps({"merge_method": "linear", "models": [{"model": str(m)} for m in models]})
    )
    return r


@pytest.mark.parametrize("size", [6 << 30, 1 << 30])
def test_oversized_carried_file_is_refused_before_reading(
    tmp_path: Path, models: list[Path], size: int
) -> None:
    with open(models[0] / "config.json", "wb") as f:
        f.truncate(size)  # sparse: no disk, and reading it would need `size` bytes of memory
    recipe = _recipe(tmp_path, models)

    def plan() -> None:
        with pytest.raises(CheckpointFormatError) as ei:
            soupkit.plan(recipe)
        msg = str(ei.value)
        assert (
            f"{models[0] / 'config.json'}: {size:,} bytes" in msg
            and "larger than 100,000,000 bytes" in msg
        )

    elapsed, peak = _bounded(plan)
    assert elapsed < 5 and peak < 20_000_000
    assert MAX_CARRY_BYTES == 100_000_000
    r = cli("merge", str(recipe), str(tmp_path / "out"))
    assert (
        r.returncode == 1
        and "larger than 100,000,000 bytes" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert not (tmp_path / "out").exists()


def test_carried_files_are_copied_streamed(
    tmp_path: Path, models: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = os.urandom(3_000_000)
    (models[0] / "tokenizer.json").write_bytes(tok)
    (models[0] / "config.json").write_text('{"model_type": "toy"}')

    real_read = Path.read_bytes

    def no_whole_reads(self: Path, *a: object, **k: object) -> bytes:
        if self.name == "config.json":  # parsed (at most MAX_CARRY_BYTES) to name the dtype written
            return real_read(self)
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", no_whole_reads)
    soupkit.merge(_recipe(tmp_path, models), tmp_path / "out", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tok
    report = json.loads((tmp_path / "out" / "soupkit-report.json").read_text())
    assert hashlib.sha256(tok).hexdigest() in json.dumps(report)


# --- 12: one rule for links ------------------------------------------------------------------------


def _model_with_link(tmp_path: Path, name: str, target: Path) -> Path:
    m = tmp_path / "m"
    m.mkdir()
    (m / name).symlink_to(target)
    return m


def test_model_file_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"a": torch.zeros(2)}, str(outside))
    m = _model_with_link(tmp_path, "model.safetensors", outside)
    with pytest.raises(
        CheckpointFormatError, match="symbolic link that leads outside the model folder"
    ):
        soupkit.open_checkpoint(m)
    r = cli("inspect", str(m))
    assert r.returncode == 1 and "leads outside the model folder" in r.stderr


def test_index_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    other = sharded_folder(tmp_path / "other")
    m = tmp_path / "m"
    m.mkdir()
    for f in other.iterdir():
        if f.suffix == ".safetensors":
            (m / f.name).write_bytes(f.read_bytes())
    (m / "model.safetensors.index.json").symlink_to(other / "model.safetensors.index.json")
    with pytest.raises(CheckpointFormatError, match="index is a symbolic link that leads outside"):
        soupkit.open_checkpoint(m)


def test_carried_file_symlink_out_of_the_folder_is_refused(
    tmp_path: Path, models: list[Path]
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (models[0] / "tokenizer.json").symlink_to(secret)
    with pytest.raises(
        CheckpointFormatError, match="carried file is a symbolic link that leads outside"
    ):
        soupkit.plan(_recipe(tmp_path, models))


def test_links_inside_the_folder_are_followed(tmp_path: Path) -> None:
    m = tmp_path / "m"
    (m / "real").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(m / "real" / "w.safetensors"))
    (m / "model.safetensors").symlink_to("real/w.safetensors")
    (m / "real" / "config.json").write_text("{}")
    (m / "config.json").symlink_to("real/config.json")
    ck = soupkit.open_checkpoint(m)
    assert ck.files == ((m / "real" / "w.safetensors").resolve(),)
    assert carried_files(m) == {"config.json": (m / "real" / "config.json").resolve()}


def hf_cache_snapshot(root: Path, sharded: bool) -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out: snapshot files link to blobs."""
    repo = root / "hub" / "models--org--toy"
    blobs = repo / "blobs"
    snap = repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    src = sharded_folder(root / "src") if sharded else None
    files: dict[str, bytes] = {}
    if src is not None:
        files = {f.name: f.read_bytes() for f in src.iterdir()}
    else:
        save_file({"a": torch.ones(3)}, str(root / "one.safetensors"))
        files = {"model.safetensors": (root / "one.safetensors").read_bytes()}
    files["config.json"] = b'{"model_type": "toy"}'
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snap / name).symlink_to(Path("..", "..", "blobs", digest))
    return snap


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_cache_snapshot_links_into_its_blobs_are_followed(tmp_path: Path, sharded: bool) -> None:
    snap = hf_cache_snapshot(tmp_path, sharded)
    ck = soupkit.open_checkpoint(snap)
    blobs = (snap.parent.parent / "blobs").resolve()
    assert all(f.parent == blobs for f in ck.files)
    assert set(ck.tensors) == ({"a", "b", "c"} if sharded else {"a"})
    assert list(carried_files(snap)) == ["config.json"]
    assert snapshot_blobs(snap) == (snap.parent.parent / "blobs").resolve()


def test_hf_cache_snapshot_link_outside_its_blobs_is_refused(tmp_path: Path) -> None:
    snap = hf_cache_snapshot(tmp_path, False)
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    save_file({"a": torch.ones(3)}, str(other / "x"))
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(other / "x")  # another repository's blob
    with pytest.raises(CheckpointFormatError, match="leads outside the model folder"):
        soupkit.open_checkpoint(snap)
    assert snapshot_blobs(tmp_path / "m-not-a-snapshot") is None


def test_broken_and_looping_links_are_errors(tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    (m / "model.safetensors").symlink_to("nowhere.safetensors")
    with pytest.raises(CheckpointFormatError, match="which does not exist"):
        soupkit.open_checkpoint(m)
    (m / "model.safetensors").unlink()
    (m / "model.safetensors").symlink_to("model.safetensors")
    with pytest.raises(CheckpointFormatError, match="cannot follow"):
        soupkit.open_checkpoint(m)
    for bad in ["", "../x", "/etc/passwd", "a\x00b"]:
        with pytest.raises(CheckpointFormatError, match="is not a plain name"):
            resolve_model_file(m, bad)


# --- 9: NaN weights and empty lists are errors -----------------------------------------------------


@pytest.mark.parametrize(
    "params,part",
    [
        ({"weight": float("nan")}, "weight: nan is not a usable value"),
        ({"weight": float("inf")}, "weight: inf is not a usable value"),
        ({"weight": [0.5, float("nan")]}, "weight: nan is not a usable value"),
        (
            {"weight": [{"filter": "mlp", "value": float("-inf")}, {"value": 1.0}]},
            "weight: -inf is not a usable value",
        ),
        ({"weight": []}, "weight: an empty list sets nothing"),
        ({"weight": [{"filter": "mlp", "value": []}]}, "weight: an entry's value is an empty list"),
    ],
)
def test_nonfinite_and_empty_parameter_values(
    tmp_path: Path, models: list[Path], params: dict[str, object], part: str
) -> None:
    data = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": params} for m in models],
    }
    with pytest.raises(
        soupkit.ConfigError, match="models\\[0\\].parameters: " + part.replace("[", "\\[")
    ):
        soupkit.load_recipe(data)
    data = {
        "merge_method": "linear",
        "parameters": params,
        "models": [{"model": str(m)} for m in models],
    }
    with pytest.raises(soupkit.ConfigError, match="parameters: "):
        soupkit.plan(data)


def test_nan_weight_in_yaml_fails_validate_on_the_cli(tmp_path: Path, models: list[Path]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(
            f"  - model: {m}\n    parameters: {{weight: {w}}}\n"
            for m, w in zip(models, [".nan", "1", "[]"])
        )
    )
    r = cli("validate", str(recipe))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "2 problem(s)" in r.stderr and "weight: nan is not a usable value" in r.stderr
    assert "weight: an empty list sets nothing" in r.stderr


# --- 10: an input rewritten between plan and run ---------------------------------------------------


@pytest.mark.parametrize("how", ["in-place", "replaced", "mtime-restored"])
def test_input_rewritten_after_plan_is_refused(
    tmp_path: Path, models: list[Path], how: str
) -> None:
    p = soupkit.plan(_recipe(tmp_path, models))
    f = models[1] / "model.safetensors"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # same size, same header: the last float becomes NaN
    if how == "replaced":
        tmp = f.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, f)
    else:
        with open(f, "r+b") as fh:
            fh.write(data)
        if how == "mtime-restored":
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    with pytest.raises(
        CheckpointFormatError, match="the input file changed after it was planned"
    ) as ei:
        run_merge_plan(p, tmp_path / "out", progress=False)
    assert str(f.resolve()) in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_reader_checks_the_stamp_when_it_opens_a_file(tmp_path: Path, models: list[Path]) -> None:
    from soupkit.engine import MemorySink, run_plan

    p = soupkit.plan(_recipe(tmp_path, models))
    f = models[2] / "model.safetensors"
    os.utime(f, ns=(0, 0))  # only the identity changes; the engine alone must notice
    with pytest.raises(CheckpointFormatError, match="changed after its header was read"):
        run_plan(p, MemorySink(p))


# --- 8: output names of every legal length ---------------------------------------------------------


@pytest.mark.parametrize("n", [240, 255])
def test_long_legal_output_names_work(tmp_path: Path, n: int) -> None:
    a = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(3)}, str(a))
    out = tmp_path / ("o" * n)
    soupkit.uniform_soup([a, a], out, progress=False)
    assert (out / "model.safetensors").is_file()
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".soupkit-")]


def test_output_name_over_name_max_is_a_usage_error(tmp_path: Path) -> None:
    a = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(3)}, str(a))
    out = tmp_path / ("o" * 256)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [{"model": str(a)}]}))
    r = cli("merge", str(recipe), str(out))
    assert r.returncode == 2, r.stderr
    assert "is 256 bytes; this file system allows at most 255 bytes per name" in r.stderr
    assert "internal error" not in r.stderr and len(r.stderr.splitlines()) == 2


@pytest.mark.slow
def test_ten_thousand_inputs_under_a_4g_address_space_limit(tmp_path: Path) -> None:
    """10,000 inputs under ``ulimit -v 4G``: each input's read buffer used to be a full compute
    piece (1 MiB of address space per input); it now grows with what is read."""
    import resource

    n = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 100:
        pytest.skip(f"needs {n + 100} open files, the hard limit is {hard}")
    src = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(4.0), "b": torch.ones(2, 2)}, str(src))
    for i in range(n):  # hard links: 10,000 separate input files that cost no disk
        os.link(src, tmp_path / f"m{i}.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {"merge_method": "linear", "models": [{"model": f"m{i}.safetensors"} for i in range(n)]}
        )
    )

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        resource.setrlimit(
            resource.RLIMIT_NOFILE,
            (
                max(soft, n + 100)
                if hard == resource.RLIM_INFINITY
                else max(soft, min(hard, n + 100)),
                hard,
            ),
        )

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("SOUPKIT_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "soupkit.cli", "merge", "--no-hash-inputs", str(recipe), "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limits,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(out["a"], torch.arange(4.0), rtol=1e-4, atol=1e-4)


# --- 11: the evaluator's import does not put the current directory on sys.path -----------------


def test_stray_module_in_cwd_does_not_run_with_an_evaluator_path(
    tmp_path: Path, models: list[Path]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "PWNED"
    for name in (
        "matplotlib",
        "transformers",
        "tqdm",
        "json5",
    ):  # what soupkit or a user imports later
        (work / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write('{name}\\n')\n")
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "helper_mod.py").write_text("FACTOR = 2.0\n")
    (evals / "my_eval.py").write_text(
        "import helper_mod\n"  # its own folder is searched while it is imported
        "def score(state):\n"
        "    import matplotlib  # the real one (or none): never the current directory's\n"
        "    return helper_mod.FACTOR * float(state['model.norm.weight'].sum())\n"
    )
    # the `soupkit` command (`python -m soupkit.cli` puts the current directory first on
    # sys.path before soupkit starts: Python's rule, see SECURITY.md)
    script = Path(sys.executable).parent / "soupkit"
    if not script.exists():
        pytest.skip("the soupkit console script is not installed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and p != str(work))}
    r = subprocess.run(
        [
            str(script),
            "greedy",
            *map(str, models),
            "--evaluator",
            f"{evals / 'my_eval.py'}:score",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists(), marker.read_text()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_evaluator_import_leaves_sys_path_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from soupkit.evaluate import load_evaluator

    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))]
    )
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    (tmp_path / "cwd_eval_mod_15.py").write_text("def score(state):\n    return 1.0\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "file_eval_15.py").write_text(
        "import sibling_15\ndef score(state):\n    return sibling_15.X\n"
    )
    (sub / "sibling_15.py").write_text("X = 3.0\n")
    assert load_evaluator("cwd_eval_mod_15:score")({}) == 1.0
    assert sys.path == before
    assert load_evaluator(f"{sub / 'file_eval_15.py'}:score")({}) == 3.0
    assert sys.path == before
    # the current directory is searched after the installed packages
    (tmp_path / "pytest.py").write_text(
        "raise SystemExit('the current directory shadowed pytest')\n"
    )
    (tmp_path / "shadow_eval_15.py").write_text(
        "import pytest\ndef score(state):\n    return 2.0\n"
    )
    assert load_evaluator("shadow_eval_15:score")({}) == 2.0


def test_deeply_nested_config_json_is_carried_not_an_internal_error(
    tmp_path: Path, models: list[Path]
) -> None:
    nested = '{"model_type": "toy", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (models[0] / "config.json").write_text(nested)
    soupkit.merge(_recipe(tmp_path, models), tmp_path / "out", progress=False)
    assert (
        tmp_path / "out" / "config.json"
    ).read_text() == nested  # not JSON we can edit: as it is
