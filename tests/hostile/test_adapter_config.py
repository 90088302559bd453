"""adapter_config.json fuzzing: what `validate_adapter_config` accepts is valid (types, ranges, no
refused feature), what it refuses is a ConfigError / UsageError, never an internal error; the
linear-time matcher of rank_pattern keys answers exactly as ``re.match`` does."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_fuzz import LONG, budget, json_value

from soupkit._util.safe_regex import UnsafePatternError, safe_match
from soupkit.adapters.lora import read_adapter
from soupkit.adapters.lora_config import LORA_FIELDS, MAX_RANK, validate_adapter_config
from soupkit.errors import CheckpointFormatError, ConfigError, SoupError, UsageError

field_name = st.sampled_from(sorted(LORA_FIELDS))
typed_value = st.one_of(
    json_value,
    st.sampled_from(
        [
            True,
            False,
            0,
            1,
            4,
            -1,
            2**40,
            0.5,
            math.nan,
            math.inf,
            "none",
            "all",
            "gaussian",
            "pissa",
            "no",
            "LORA",
        ]
    ),
    st.dictionaries(
        st.sampled_from(["q_proj", "v_proj", "(a|aa)+$X", "(a)\\1", "[", "x" * 1001]),
        json_value,
        max_size=3,
    ),
)
config_like = st.dictionaries(st.one_of(field_name, st.text(max_size=8)), typed_value, max_size=8)
near_valid = st.fixed_dictionaries(
    {
        "peft_type": st.sampled_from(["LORA", "lora", "IA3", 3]),
        "r": st.one_of(st.integers(-2, 2**21), json_value),
        "lora_alpha": st.one_of(
            st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), json_value
        ),
    },
    optional={
        k: typed_value
        for k in (
            "fan_in_fan_out",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "lora_bias",
            "bias",
            "init_lora_weights",
            "use_dora",
            "modules_to_save",
        )
    },
)


def check(cfg: dict[str, Any]) -> None:
    try:
        s = validate_adapter_config(cfg, "fuzz/adapter_config.json")
    except (ConfigError, UsageError) as e:
        assert "fuzz/adapter_config.json" in str(e)
        return
    # accepted: every field it uses is valid, no refused feature is set, no unknown key
    assert set(cfg) <= set(LORA_FIELDS)
    assert type(s.r) is int and 1 <= s.r <= MAX_RANK
    assert isinstance(s.lora_alpha, float) and math.isfinite(s.lora_alpha)
    for key in ("fan_in_fan_out", "use_rslora", "lora_bias", "use_dora"):
        assert key not in cfg or isinstance(cfg[key], bool)
    assert all(type(v) is int and 1 <= v <= MAX_RANK for v in s.rank_pattern.values())
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.alpha_pattern.values())
    for k, rule in LORA_FIELDS.items():
        if rule.handling == "refused":
            assert cfg.get(k) in (None, False, "", [], {}), k
    assert str(cfg.get("peft_type", "LORA")).upper() == "LORA"


@budget(150)
@given(config_like)
def test_fuzz_config_like(cfg: dict[str, Any]) -> None:
    check(cfg)


@budget(150)
@given(near_valid)
def test_fuzz_near_valid(cfg: dict[str, Any]) -> None:
    check(cfg)


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fz")
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "base_model.model.l.q_proj.lora_A.weight": torch.randn(2, 4, generator=g),
            "base_model.model.l.q_proj.lora_B.weight": torch.randn(4, 2, generator=g),
        },
        str(root / "adapter_model.safetensors"),
    )
    return root


@settings(
    max_examples=60 * (20 if LONG else 1),
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.one_of(config_like, near_valid, json_value))
def test_fuzz_read_adapter_only_raises_soup_errors(adapter_files: Path, cfg: Any) -> None:
    try:
        text = json.dumps(cfg)
    except (ValueError, TypeError):
        return
    (adapter_files / "adapter_config.json").write_text(text)
    try:
        ad = read_adapter(adapter_files)
    except SoupError:
        return
    assert isinstance(ad.config, dict) and ad.modules["l.q_proj"].r == 2
    assert math.isfinite(ad.modules["l.q_proj"].scale)


# ---------------------------------------------------------------------------------- the matcher
atom = st.sampled_from(
    ["a", "b", ".", "\\.", "[ab]", "[^a]", "\\d", "\\w", "$", "^", "\\b", "(?:a|b)", ""]
)


def _combine(kids: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(kids, kids).map("".join),
        st.tuples(kids, kids).map(lambda t: f"({t[0]}|{t[1]})"),
        st.tuples(kids, st.sampled_from(["*", "+", "?", "{2}", "{1,3}", "*?", "+?"])).map(
            lambda t: f"({t[0]}){t[1]}"
        ),
    )


pattern = st.recursive(atom, _combine, max_leaves=8)


@budget(500)
@given(pattern, st.text(alphabet="ab.1_\n", max_size=10))
def test_safe_match_equals_re_match(key: str, name: str) -> None:
    full = rf"(.*\.)?({key})$"
    try:
        expected = re.match(full, name) is not None
    except re.error:
        return
    try:
        got = safe_match(full, name)
    except UnsafePatternError:
        return
    assert got == expected, (key, name)


@pytest.mark.parametrize(
    "key", [r"(a|aa)+$X", r"(a+)+$X", r"(a*)*$X", r"(.*a){20}$X", r"(a|a?)+$X"]
)
def test_catastrophic_keys_take_linear_time(key: str) -> None:
    t = time.process_time()  # CPU time: waiting for a core on a loaded machine does not count
    assert safe_match(rf"(.*\.)?({key})$", "a" * 2000) is False
    assert time.process_time() - t < 5


@pytest.mark.parametrize(
    "key", [r"(a)\1", r"(?=a)", r"(?<!a)b", r"(?i)a", r"(?>a)", r"a++", r"a{101}", "x" * 1001]
)
def test_unsupported_constructs_are_refused(key: str) -> None:
    with pytest.raises(UnsafePatternError):
        safe_match(rf"(.*\.)?({key})$", "a")


def test_docs_table_is_the_field_table() -> None:
    """docs/lora.md lists every field of LORA_FIELDS with its handling and reason."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "lora.md").read_text(encoding="utf-8")
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in doc.splitlines()
        if line.startswith("| `")
    }
    assert set(LORA_FIELDS) <= set(rows)
    for name, rule in LORA_FIELDS.items():
        assert rule.why in rows[name] and rule.feature in rows[name], name
        assert ("**refused** when set" in rows[name]) == (rule.handling == "refused"), name


dims = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


@settings(
    max_examples=60 * (20 if LONG else 1),
    deadline=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    a=dims,
    b=dims,
    bias=st.one_of(st.none(), dims),
    w=dims,
    r=st.integers(1, 3),
    fit=st.booleans(),
    nan=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.int8]),
)
def test_fuzz_factor_shapes_fold_or_soup_error(
    tmp_path_factory: pytest.TempPathFactory,
    a: tuple[int, ...],
    b: tuple[int, ...],
    bias: tuple[int, ...] | None,
    w: tuple[int, ...],
    r: int,
    fit: bool,
    nan: bool,
    dtype: torch.dtype,
) -> None:
    """Hostile factor shapes, dtypes and values: a fold either writes finite W + delta or raises a SoupError."""
    if fit:  # shapes that compose, so accepted folds are exercised too
        a, b, w = (r, 3), (4, r), (4, 3)
    root = tmp_path_factory.mktemp("shapes")
    (root / "base").mkdir()
    save_file(
        {"m.weight": torch.ones(w), "m.bias": torch.ones(4)},
        str(root / "base" / "model.safetensors"),
    )
    tensors = {
        "base_model.model.m.lora_A.weight": torch.ones(a, dtype=dtype),
        "base_model.model.m.lora_B.weight": torch.full(b, math.nan if nan else 1.0).to(dtype),
    }
    if bias is not None:
        tensors["base_model.model.m.lora_B.bias"] = torch.ones(bias)
    (root / "ad").mkdir()
    save_file(tensors, str(root / "ad" / "adapter_model.safetensors"))
    (root / "ad" / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": 2, "lora_bias": bias is not None})
    )
    from soupkit.adapters.lora import fold_lora

    try:
        res = fold_lora(root / "ad", root / "base", root / "out", progress=False)
    except SoupError:
        assert not (root / "out").exists()
        return
    from safetensors.torch import load_file

    out = load_file(str(root / "out" / "model.safetensors"))
    assert out["m.weight"].shape == w and bool(torch.isfinite(out["m.weight"]).all())
    assert res.report["nonfinite_tensors"] == []


# --- adapter files are inputs like any model folder's (review of 2026-12-05) ----------------------


def _adapter_folder(root: Path, adapter_files: Path, cfg: dict[str, Any]) -> Path:
    ad = root / "ad"
    ad.mkdir()
    (ad / "adapter_model.safetensors").write_bytes(
        (adapter_files / "adapter_model.safetensors").read_bytes()
    )
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


VALID = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def test_a_fifo_adapter_config_is_refused_unread(tmp_path: Path, adapter_files: Path) -> None:
    ad = _adapter_folder(tmp_path, adapter_files, VALID)
    (ad / "adapter_config.json").unlink()
    os.mkfifo(ad / "adapter_config.json")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointFormatError, match=r"adapter_config.json: is not a regular file"):
        read_adapter(ad)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_files_follow_the_link_rule(tmp_path: Path, adapter_files: Path, name: str) -> None:
    ad = _adapter_folder(tmp_path, adapter_files, VALID)
    outside = tmp_path / f"elsewhere-{name}"
    (ad / name).rename(outside)
    (ad / name).symlink_to(outside)
    with pytest.raises(
        CheckpointFormatError, match=rf"{name}: adapter file is a symbolic link that leads outside"
    ):
        read_adapter(ad)
    (ad / name).unlink()
    (ad / name).symlink_to(os.path.relpath(outside, ad))  # a relative link out: the same rule
    with pytest.raises(CheckpointFormatError, match="leads outside the model folder"):
        read_adapter(ad)


def test_deeply_nested_adapter_config_is_a_clear_error(tmp_path: Path, adapter_files: Path) -> None:
    ad = _adapter_folder(tmp_path, adapter_files, VALID)
    (ad / "adapter_config.json").write_text('{"eva_config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(
        CheckpointFormatError,
        match=r"adapter_config.json: cannot read it as JSON \(nested too deeply\)",
    ):
        read_adapter(ad)
