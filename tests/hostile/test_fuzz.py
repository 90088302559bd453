"""Fuzzing: recipes, safetensors headers and sharded indexes.

What is refused is refused with the right error (ConfigError for recipes,
CheckpointFormatError for files), never an internal error; what is accepted is valid (a recipe
of the schema that round-trips through YAML; a header whose offsets lie in the file, cover the
buffer without hole or overlap, and hold dtype size x shape bytes each; an index that agrees
with its shards).

The budget is small in ``make test`` (a few seconds). For a long run::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/hostile/test_fuzz.py -q

(20x the examples, no deadline). Any failure prints the minimal input that reproduces it.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import soupkit
from soupkit.errors import CheckpointFormatError, ConfigError
from soupkit.io.header import DTYPES, SafetensorsHeader, read_safetensors_header
from soupkit.recipe import schema as config
from soupkit.recipe.schema import MergeConfig

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def budget(n: int) -> settings:
    return settings(
        max_examples=n * (20 if LONG else 1),
        deadline=None,
        derandomize=not LONG,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


# --- recipes ------------------------------------------------------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=10), kids, max_size=4)
    ),
    max_leaves=20,
)
recipe_key = st.sampled_from(
    [
        "merge_method",
        "models",
        "base_model",
        "parameters",
        "dtype",
        "out_dtype",
        "seed",
        "tokenizer_source",
        "name",
        "slices",
        "modules",
        "model",
        "weight",
    ]
)
recipe_like = st.dictionaries(st.one_of(recipe_key, st.text(max_size=8)), json_value, max_size=6)
model_entry = st.fixed_dictionaries(
    {"model": st.one_of(st.text(max_size=10), json_value)},
    optional={"parameters": st.dictionaries(st.text(max_size=8), json_value, max_size=3)},
)
structured = st.fixed_dictionaries(
    {
        "merge_method": st.one_of(st.sampled_from(["linear", "ties", "nope"]), json_value),
        "models": st.one_of(st.lists(model_entry, max_size=3), json_value),
    },
    optional={
        "parameters": st.dictionaries(st.text(max_size=8), json_value, max_size=3),
        "dtype": json_value,
        "seed": json_value,
    },
)


def load_or_soup_error(source: Any) -> None:
    """Load a recipe: what is refused is a ConfigError (never another error); what is accepted
    is a valid recipe of the schema, and survives a round trip through YAML unchanged."""
    try:
        cfg = soupkit.load_recipe(source)
    except ConfigError as e:
        assert e.errors and all(isinstance(m, str) and m for m in e.errors)
        return
    assert isinstance(cfg, MergeConfig)
    assert MergeConfig.model_validate(cfg.model_dump()) == cfg
    assert bool(cfg.models) != bool(cfg.slices)
    again = soupkit.load_recipe(cfg.to_yaml())
    assert again.model_dump() == cfg.model_dump()
    for params in [cfg.parameters, *(m.parameters for m in cfg.models)]:
        for value in params.values():  # no NaN, no infinity, no empty list
            assert value != [] and "nan" not in repr(value) and "inf" not in repr(value)


@budget(100)
@given(st.one_of(recipe_like, structured))
def test_recipe_mappings(data: dict[str, Any]) -> None:
    load_or_soup_error(data)


yaml_tokens = st.sampled_from(
    list("abc: -[]{}\n\t'\"&*!|>%@`#,?012.eE+~")
    + [
        "\x00",
        "\ufeff",
        "é",
        "!!python/object:os.system ",
        "!!binary ",
        "<<: ",
        "models:\n  - model: ",
        "merge_method: linear\n",
        "parameters:\n  weight: ",
        ".nan",
        ".inf",
        "---\n",
        "&x ",
        "*x",
        "1e999",
    ]
)


@budget(150)
@given(st.one_of(st.lists(yaml_tokens, max_size=40).map("".join), st.text(max_size=80)))
def test_recipe_yaml_text(text: str) -> None:
    load_or_soup_error(text + "\n")  # a newline makes it YAML text, never a path


@budget(40)
@given(st.binary(max_size=200))
def test_recipe_files_of_random_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_bytes(data)
        load_or_soup_error(p)


def test_yaml_tags_cannot_construct_objects(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    text = f"merge_method: !!python/object/apply:os.system ['touch {marker}']\nmodels: [{{model: a}}]\n"
    with pytest.raises(soupkit.ConfigError, match="not valid YAML"):
        soupkit.load_recipe(text)
    assert not marker.exists()


@budget(60)
@given(depth=st.integers(1, 12), fanout=st.integers(1, 12), merge_keys=st.booleans())
def test_alias_chains_are_refused_exactly_when_they_expand_past_the_limit(
    depth: int, fanout: int, merge_keys: bool
) -> None:
    if merge_keys:  # each level merges `fanout` copies of the level before
        y = "a0: &a0 {k0: 1, k1: 2}\n" + "".join(
            f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * fanout)}]}}\n"
            for i in range(1, depth + 1)
        )
    else:  # each level is a list of `fanout` copies of the level before
        y = "a0: &a0 [1, 2]\n" + "".join(
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]\n" for i in range(1, depth + 1)
        )
    text = y + "merge_method: linear\nmodels: [{model: m1}]\n"
    # expected count, as the loader counts: a node and everything it stands for
    size = 5 if merge_keys else 3  # {k0: 1, k1: 2} / [1, 2]
    total = 1 + 1 + size  # the document mapping, the key "a0", its value
    for _ in range(depth):
        size = (
            (2 + (1 + fanout * size)) if merge_keys else (1 + fanout * size)
        )  # {<<: [...]} / [...]
        total += 1 + size
    total += 2 + 5  # merge_method: linear / models: [{model: m1}]
    t = time.process_time()  # CPU time: waiting for a core on a loaded machine does not count
    try:
        soupkit.load_recipe(text)
    except ConfigError as e:
        assert ("more than 1,000,000 values" in str(e)) == (total > config.MAX_RECIPE_NODES), (
            total,
            str(e),
        )
    else:
        raise AssertionError("a0...: unknown keys are always refused")
    assert time.process_time() - t < 2.0


def test_yaml_billion_laughs_is_bounded() -> None:
    lol = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    with pytest.raises(soupkit.ConfigError):  # aliases are shared, not expanded; then unknown keys
        soupkit.load_recipe(lol)


# --- safetensors headers ------------------------------------------------------------------------


def valid_header(n: int) -> dict[str, Any]:
    h: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for i in range(n):
        h[f"t{i}"] = {"dtype": "F32", "shape": [2, i + 1], "data_offsets": [pos, pos + 8 * (i + 1)]}
        pos += 8 * (i + 1)
    return h


def assert_valid(h: SafetensorsHeader) -> None:
    """What a header that was accepted promises: known dtypes, byte counts that match dtype x
    shape, offsets inside the file, tensors in offset order covering the buffer exactly."""
    size = h.path.stat().st_size
    assert h.file_size == size and 8 <= h.data_start <= size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    cursor = h.data_start
    for name, t in h.tensors.items():
        assert t.name == name and t.file == h.path and t.dtype in DTYPES
        assert all(type(d) is int and d >= 0 for d in t.shape)
        assert t.start == cursor, "no hole and no overlap"
        assert t.end - t.start == math.prod(t.shape) * DTYPES[t.dtype][1]
        assert t.end <= size
        cursor = t.end
    assert cursor == size, "nothing after the last tensor"


def write(path: Path, header: bytes, data_len: int, length: int | None = None) -> None:
    path.write_bytes(
        struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * data_len
    )


mutation_value = st.one_of(
    json_value,
    st.sampled_from(list(DTYPES)),
    st.lists(st.integers(-2, 2**65), max_size=4),
    st.integers(-(2**64), 2**64),
)


@budget(200)
@given(
    n=st.integers(0, 4),
    key=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
    which=st.integers(0, 5),
    value=mutation_value,
    extra_data=st.integers(-20, 20),
)
def test_mutated_headers(
    tmp_path: Path, n: int, key: str, which: int, value: Any, extra_data: int
) -> None:
    h = valid_header(n)
    total = sum(8 * (i + 1) for i in range(n))
    names = [k for k in h if k != "__metadata__"]
    if names:
        h[names[which % len(names)]][key] = value
    else:
        h["__metadata__"] = value
    p = tmp_path / "x.safetensors"
    write(p, json.dumps(h).encode(), max(0, total + extra_data))
    try:
        header = read_safetensors_header(p)
    except CheckpointFormatError:
        return
    assert_valid(header)


@budget(200)
@given(
    header=st.binary(max_size=120),
    data_len=st.integers(0, 64),
    length=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_random_header_bytes(
    tmp_path: Path, header: bytes, data_len: int, length: int | None
) -> None:
    p = tmp_path / "x.safetensors"
    write(p, header, data_len, length)
    try:
        parsed = read_safetensors_header(p)
    except CheckpointFormatError:
        return
    assert_valid(parsed)


@budget(100)
@given(st.binary(max_size=300))
def test_truncated_or_bitflipped_real_file(tmp_path: Path, noise: bytes) -> None:
    from safetensors.torch import save_file

    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.bfloat16)}, str(p))
    raw = bytearray(p.read_bytes())
    for i in range(0, len(noise) - 1, 2):  # flip a byte or cut the file, as the noise says
        pos = noise[i] * len(raw) // 256
        if noise[i + 1] == 0:
            raw = raw[:pos]
            break
        if pos < len(raw):
            raw[pos] ^= noise[i + 1]
    p.write_bytes(bytes(raw))
    try:
        ck = soupkit.open_checkpoint(p)
    except CheckpointFormatError:
        return
    # whatever parsed is internally consistent
    assert_valid(read_safetensors_header(p))
    assert set(ck.tensors) == set(read_safetensors_header(p).tensors)


# --- sharded indexes ----------------------------------------------------------------------------


@budget(100)
@given(
    wm=st.one_of(
        json_value,
        st.dictionaries(
            st.sampled_from(["a", "b", "c", "zz"]),
            st.one_of(
                st.sampled_from(
                    [
                        "s1.safetensors",
                        "s2.safetensors",
                        "../s1.safetensors",
                        "/etc/passwd",
                        "",
                        ".",
                        "s1.safetensors/..",
                        "\x00",
                    ]
                ),
                st.text(max_size=12),
            ),
            max_size=4,
        ),
    )
)
def test_fuzzed_index(tmp_path_factory: pytest.TempPathFactory, wm: Any) -> None:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("idx")
    save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, str(folder / "s1.safetensors"))
    save_file({"c": torch.zeros(1)}, str(folder / "s2.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    try:
        ck = soupkit.open_checkpoint(folder)
    except CheckpointFormatError:
        return
    assert all(f.resolve().parent == folder.resolve() for f in ck.files)
    # an accepted index agrees exactly with the shards' own headers
    assert set(ck.tensors) == set(wm) and all(
        ck.tensors[n].file.resolve() == (folder / wm[n]).resolve() for n in wm
    )
    for f in ck.files:
        assert_valid(read_safetensors_header(f))


@pytest.mark.parametrize(
    "data,part",
    [
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "strength": 1},
            "strength: unknown key",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a", "integer": 1}]},
            "models[0].integer: unknown key",
        ),
        ({"merge_method": "linear", "models": [{"model": "a"}], "int": 2}, "int: unknown key"),
    ],
)
def test_unknown_keys_that_look_like_type_names(data: dict[str, Any], part: str) -> None:
    # found by test_recipe_mappings: keys starting with "str"/"int"/... were mistaken for
    # pydantic's union-branch tags and crashed the message builder with an IndexError
    with pytest.raises(soupkit.ConfigError) as ei:
        soupkit.load_recipe(data)
    assert part in str(ei.value)
