"""Fuzzing: recipes, safetensors headers and sharded indexes only ever fail with a SoupError.

The budget is small in ``make test`` (a few seconds). For a long run::

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/hostile/test_fuzz.py -q

(20x the examples, no deadline). Any failure prints the minimal input that reproduces it.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import soupkit
from soupkit.errors import SoupError
from soupkit.io.header import DTYPES, read_safetensors_header

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def budget(n: int) -> settings:
    return settings(max_examples=n * (20 if LONG else 1), deadline=None, derandomize=not LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


# --- recipes ------------------------------------------------------------------------------------

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                             st.dictionaries(st.text(max_size=10), kids, max_size=4)),
                          max_leaves=20)
recipe_key = st.sampled_from(["merge_method", "models", "base_model", "parameters", "dtype", "out_dtype",
                              "seed", "tokenizer_source", "name", "slices", "modules", "model", "weight"])
recipe_like = st.dictionaries(st.one_of(recipe_key, st.text(max_size=8)), json_value, max_size=6)
model_entry = st.fixed_dictionaries({"model": st.one_of(st.text(max_size=10), json_value)},
                                    optional={"parameters": st.dictionaries(st.text(max_size=8), json_value, max_size=3)})
structured = st.fixed_dictionaries({"merge_method": st.one_of(st.sampled_from(["linear", "ties", "nope"]), json_value),
                                    "models": st.one_of(st.lists(model_entry, max_size=3), json_value)},
                                   optional={"parameters": st.dictionaries(st.text(max_size=8), json_value, max_size=3),
                                             "dtype": json_value, "seed": json_value})


def load_or_soup_error(source: Any) -> None:
    try:
        soupkit.load_recipe(source)
    except SoupError:
        pass


@budget(100)
@given(st.one_of(recipe_like, structured))
def test_recipe_mappings(data: dict[str, Any]) -> None:
    load_or_soup_error(data)


yaml_tokens = st.sampled_from(list("abc: -[]{}\n\t'\"&*!|>%@`#,?012.eE+~") + [
    "\x00", "\ufeff", "é", "!!python/object:os.system ", "!!binary ", "<<: ", "models:\n  - model: ",
    "merge_method: linear\n", "parameters:\n  weight: ", ".nan", ".inf", "---\n", "&x ", "*x", "1e999"])


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


def test_yaml_billion_laughs_is_bounded() -> None:
    lol = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
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


def write(path: Path, header: bytes, data_len: int, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + b"\0" * data_len)


mutation_value = st.one_of(json_value, st.sampled_from(list(DTYPES)), st.lists(st.integers(-2, 2**65), max_size=4),
                           st.integers(-(2**64), 2**64))


@budget(200)
@given(n=st.integers(0, 4), key=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
       which=st.integers(0, 5), value=mutation_value, extra_data=st.integers(-20, 20))
def test_mutated_headers(tmp_path: Path, n: int, key: str, which: int, value: Any, extra_data: int) -> None:
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
        read_safetensors_header(p)
    except SoupError:
        pass


@budget(200)
@given(header=st.binary(max_size=120), data_len=st.integers(0, 64), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_header_bytes(tmp_path: Path, header: bytes, data_len: int, length: int | None) -> None:
    p = tmp_path / "x.safetensors"
    write(p, header, data_len, length)
    try:
        read_safetensors_header(p)
    except SoupError:
        pass


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
    except SoupError:
        return
    # whatever parsed is internally consistent: every tensor lies inside the file
    size = p.stat().st_size
    assert all(0 <= t.start <= t.end <= size for t in ck.tensors.values())


# --- sharded indexes ----------------------------------------------------------------------------

@budget(100)
@given(wm=st.one_of(json_value, st.dictionaries(st.sampled_from(["a", "b", "c", "zz"]),
                                                st.one_of(st.sampled_from(["s1.safetensors", "s2.safetensors", "../s1.safetensors",
                                                                           "/etc/passwd", "", ".", "s1.safetensors/..", "\x00"]),
                                                          st.text(max_size=12)), max_size=4)))
def test_fuzzed_index(tmp_path_factory: pytest.TempPathFactory, wm: Any) -> None:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("idx")
    save_file({"a": torch.zeros(2), "b": torch.zeros(3)}, str(folder / "s1.safetensors"))
    save_file({"c": torch.zeros(1)}, str(folder / "s2.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    try:
        ck = soupkit.open_checkpoint(folder)
    except SoupError:
        return
    assert all(f.resolve().parent == folder.resolve() for f in ck.files)


@pytest.mark.parametrize("data,part", [
    ({"merge_method": "linear", "models": [{"model": "a"}], "strength": 1}, "strength: unknown key"),
    ({"merge_method": "linear", "models": [{"model": "a", "integer": 1}]}, "models[0].integer: unknown key"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "int": 2}, "int: unknown key"),
])
def test_unknown_keys_that_look_like_type_names(data: dict[str, Any], part: str) -> None:
    # found by test_recipe_mappings: keys starting with "str"/"int"/... were mistaken for
    # pydantic's union-branch tags and crashed the message builder with an IndexError
    with pytest.raises(soupkit.ConfigError) as ei:
        soupkit.load_recipe(data)
    assert part in str(ei.value)
