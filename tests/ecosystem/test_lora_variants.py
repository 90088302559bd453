"""Every LoRA PEFT writes is folded exactly or refused by its PEFT name; adapter_config.json is an
input like any other (types, ranges, regular expressions that cannot hang soupkit)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.adapters.lora import read_adapter
from soupkit.adapters.lora_config import LORA_FIELDS, validate_adapter_config
from soupkit.cli import main
from soupkit.errors import ConfigError, NonFiniteError, UsageError

from .lora_helpers import peft_adapter, peft_load_problems, states_equal, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")


# --------------------------------------------------------------------------------- the field table
def test_every_lora_config_field_of_the_installed_peft_is_classified() -> None:
    """A field added by a newer PEFT fails here until soupkit decides what it means for a fold."""
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - set(LORA_FIELDS) == set(), (
        "classify these in soupkit.adapters.lora_config.LORA_FIELDS"
    )
    assert set(LORA_FIELDS) - fields == set(), "fields PEFT no longer has"
    for name, rule in LORA_FIELDS.items():
        assert rule.handling in ("supported", "no_effect", "refused") and rule.why, name
        assert (rule.handling == "refused") == bool(rule.feature), name
    # every field PEFT declares a LoRA variant (a layer soupkit does not implement) is refused
    variants = {
        f.name for f in dataclasses.fields(peft.LoraConfig) if f.metadata.get("is_lora_variant")
    }
    assert variants and all(LORA_FIELDS[v].handling == "refused" for v in variants)


def test_a_default_peft_config_is_accepted_as_written() -> None:
    cfg = peft.LoraConfig(target_modules=["q_proj"]).to_dict()
    settings = validate_adapter_config(
        json.loads(json.dumps(cfg, default=list)), "adapter_config.json"
    )
    assert settings.r == 8 and settings.lora_alpha == 8 and not settings.lora_bias


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'use_future_thing': not a field of PEFT's LoraConfig"):
        validate_adapter_config({"r": 2, "use_future_thing": True}, "x/adapter_config.json")


# ------------------------------------------------------------------------------------ lora_bias
def test_lora_bias_fold_and_merge_equal_peft_bit_for_bit(tmp_path: Path) -> None:
    model = tiny_llama(bias=True)
    model.save_pretrained(tmp_path / "base")
    pm = peft_adapter(
        model,
        tmp_path / "ad",
        7,
        r=4,
        lora_alpha=8,
        lora_bias=True,
        target_modules=["q_proj", "v_proj", "o_proj"],
    )
    ref = pm.merge_and_unload().state_dict()
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.bias") for k in saved)
    ad = read_adapter(tmp_path / "ad")
    assert all(m.bias is not None for m in ad.modules.values()) and len(ad.modules) == 6
    soupkit.fold_lora(tmp_path / "ad", tmp_path / "base", tmp_path / "fold", progress=False)
    got = load_file(str(tmp_path / "fold" / "model.safetensors"))
    assert states_equal(got, ref) == []
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(got[bias], load_file(str(tmp_path / "base" / "model.safetensors"))[bias])
    soupkit.merge_loras(
        [tmp_path / "ad"],
        tmp_path / "base",
        tmp_path / "merge",
        method="task_arithmetic",
        progress=False,
    )
    assert states_equal(load_file(str(tmp_path / "merge" / "model.safetensors")), ref) == []


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_base_biases_fold_like_peft(tmp_path: Path, bias: str) -> None:
    model = tiny_llama(bias=True)
    model.save_pretrained(tmp_path / "base")
    pm = peft_adapter(
        model, tmp_path / "ad", 8, r=2, lora_alpha=4, bias=bias, target_modules=["k_proj"]
    )
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith(".bias") and p.requires_grad:
                p.add_(1.0)
    pm.save_pretrained(tmp_path / "ad")
    ref = pm.merge_and_unload().state_dict()
    r = soupkit.fold_lora(tmp_path / "ad", tmp_path / "base", tmp_path / "fold", progress=False)
    assert states_equal(load_file(str(tmp_path / "fold" / "model.safetensors")), ref) == []
    assert "model.layers.0.self_attn.k_proj.bias" in r.changed


# ------------------------------------------------------------------------------------- refusals
def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    peft_adapter(model, root / "ad", 3, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return {"base": root / "base", "ad": root / "ad", "root": root}


REFUSED = [(k, r.feature) for k, r in LORA_FIELDS.items() if r.handling == "refused"]


@pytest.mark.parametrize(("field", "feature"), REFUSED)
def test_each_refused_field_is_refused_with_the_peft_feature_name(
    plain: dict[str, Path], tmp_path: Path, field: str, feature: str
) -> None:
    value: Any = {
        "use_dora": True,
        "use_qalora": True,
        "ensure_weight_tying": True,
        "use_bdlora": True,
        "alora_invocation_tokens": [5, 6],
        "trainable_token_indices": [1, 2],
        "layer_replication": [[0, 2]],
        "target_parameters": ["experts.w1"],
    }.get(field, {"x": 1})
    ad = _with_config(plain["ad"], tmp_path / "ad", **{field: value})
    with pytest.raises(UsageError, match=rf"  - {re.escape(feature)} \({field}: ") as e:
        read_adapter(ad)
    assert "modules_to_save" not in str(e.value)
    code = main(
        [
            "lora",
            "fold",
            str(ad),
            "--base",
            str(plain["base"]),
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("init", "name"),
    [
        ("pissa", "PiSSA"),
        ("pissa_niter_4", "PiSSA"),
        ("olora", "OLoRA"),
        ("corda", "CorDA"),
        ("loftq", "LoftQ"),
        ("lora_ga", "LoRA-GA"),
        ("mica", "MiCA"),
    ],
)
def test_initialisations_that_change_the_base_are_refused(
    plain: dict[str, Path], tmp_path: Path, init: str, name: str
) -> None:
    ad = _with_config(plain["ad"], tmp_path / "ad", init_lora_weights=init)
    with pytest.raises(UsageError, match=rf"{name} \(init_lora_weights: '{init}'\)"):
        read_adapter(ad)


def test_real_peft_variants_are_refused_by_name(tmp_path: Path) -> None:
    """Adapters written by PEFT itself: DoRA, aLoRA (PEFT refuses to merge it), trainable tokens, KaSA."""
    made = {
        "DoRA": dict(use_dora=True),
        "aLoRA": dict(alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM"),
        "trainable tokens": dict(trainable_token_indices=[1, 5]),
        "KaSA": dict(kasa_config=peft.tuners.lora.config.KasaConfig()),
    }
    for feature, extra in made.items():
        folder = tmp_path / feature.replace(" ", "_")
        peft_adapter(tiny_llama(), folder, 1, r=2, lora_alpha=2, target_modules=["q_proj"], **extra)
        with pytest.raises(UsageError, match=rf"  - {feature} \("):
            read_adapter(folder)


# --------------------------------------------------------------------------------- config types
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"r": "4"}, r"r: expected a whole number 1\.\.1048576, got '4'"),
        ({"r": 0}, r"r: expected a whole number"),
        ({"r": True}, r"r: expected a whole number"),
        ({"lora_alpha": "8"}, r"lora_alpha: expected a finite number, got '8'"),
        ({"lora_alpha": float("nan")}, r"lora_alpha: expected a finite number, got nan"),
        ({"lora_alpha": float("inf")}, r"lora_alpha: expected a finite number, got inf"),
        ({"fan_in_fan_out": "no"}, r"fan_in_fan_out: expected true or false, got 'no'"),
        ({"use_rslora": 1}, r"use_rslora: expected true or false, got 1"),
        ({"rank_pattern": ["q_proj"]}, r"rank_pattern: expected an object"),
        ({"rank_pattern": {"q_proj": 2.5}}, r"rank_pattern\['q_proj'\]: expected a whole number"),
        (
            {"alpha_pattern": {"q_proj": None}},
            r"alpha_pattern\['q_proj'\]: expected a finite number, got None",
        ),
        (
            {"rank_pattern": {"(a)\\1": 2}},
            r"rank_pattern\[.*\]: PEFT matches the key as a regular expression, "
            r"and soupkit refuses this one: groupref",
        ),
        (
            {"rank_pattern": {"x" * 1001: 2}},
            r"a key of 1,001 characters, more than the limit of 1000",
        ),
        ({"bias": "some"}, r"bias: expected 'none', 'all' or 'lora_only'"),
        ({"init_lora_weights": ["x"]}, r"init_lora_weights: expected true, false or one of PEFT's"),
    ],
)
def test_wrong_types_are_config_errors_naming_file_and_field(
    plain: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    message: str,
) -> None:
    ad = _with_config(plain["ad"], tmp_path / "ad", **changes)
    with pytest.raises(ConfigError, match=message) as e:
        read_adapter(ad)
    assert str(ad / "adapter_config.json") in str(e.value)
    code = main(
        [
            "lora",
            "fold",
            str(ad),
            "--base",
            str(plain["base"]),
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 2 and "internal error" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_error_from_the_command_line_is_one_clear_message(
    plain: dict[str, Path], tmp_path: Path
) -> None:
    ad = _with_config(plain["ad"], tmp_path / "ad", fan_in_fan_out="no", lora_alpha=float("nan"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "soupkit.cli",
            "lora",
            "fold",
            str(ad),
            "--base",
            str(plain["base"]),
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2
        and "Traceback" not in proc.stderr
        and "internal error" not in proc.stderr
    )
    assert (
        "2 problem(s) in" in proc.stderr
        and "fan_in_fan_out: expected true or false, got 'no'" in proc.stderr
    )
    assert not (tmp_path / "out").exists()


def _aaa_adapter(tmp_path: Path, key: str) -> tuple[Path, Path]:
    """A base with one Linear named 'a' * 42 and an adapter on it whose rank_pattern has ``key``."""
    name = "a" * 42
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file(
        {f"{name}.weight": torch.randn(4, 4, generator=g)},
        str(tmp_path / "base" / "model.safetensors"),
    )
    (tmp_path / "ad").mkdir()
    save_file(
        {
            f"base_model.model.{name}.lora_A.weight": torch.randn(2, 4, generator=g),
            f"base_model.model.{name}.lora_B.weight": torch.randn(4, 2, generator=g),
        },
        str(tmp_path / "ad" / "adapter_model.safetensors"),
    )
    (tmp_path / "ad" / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 2,
                "target_modules": [name],
                "rank_pattern": {key: 3},
            }
        )
    )
    return tmp_path / "ad", tmp_path / "base"


def test_rank_pattern_key_cannot_backtrack_exponentially(tmp_path: Path) -> None:
    """PEFT's re.match takes ~42 s on this key and name (exponential in the name's length)."""
    ad, base = _aaa_adapter(tmp_path, "(a|aa)+$X")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "soupkit.cli",
            "lora",
            "fold",
            str(ad),
            "--base",
            str(base),
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr  # the key matches nothing, as in PEFT: r stays 2
    assert read_adapter(ad).modules["a" * 42].r == 2


def test_rank_pattern_regex_keys_match_as_peft_matches_them(tmp_path: Path) -> None:
    ad, _ = _aaa_adapter(tmp_path, "a+")  # matches: the key's rank 3 disagrees with the factors' 2
    with pytest.raises(
        soupkit.CheckpointFormatError, match=r"the config says r = 3 but A is \[2, 4\]"
    ):
        read_adapter(ad)
    from peft.utils.other import get_pattern_key

    assert get_pattern_key(["a+"], "a" * 42) == "a+"


# -------------------------------------------------------------------------------------- non-finite
def test_nan_in_a_factor_stops_fold_and_merge(plain: dict[str, Path], tmp_path: Path) -> None:
    ad = _with_config(plain["ad"], tmp_path / "ad")
    sd = load_file(str(ad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key][0, 0] = float("nan")
    save_file(sd, str(ad / "adapter_model.safetensors"))
    with pytest.raises(
        NonFiniteError,
        match=r"v_proj\.weight': 16 NaN in the output, from the inputs:\n"
        r"  - .*/ad holds 1 NaN and 0 Inf in '.*v_proj\.lora_B\.weight'",
    ):
        soupkit.fold_lora(ad, plain["base"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(NonFiniteError, match=r"v_proj"):
        soupkit.merge_loras([ad, plain["ad"]], plain["base"], tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    code = main(
        [
            "lora",
            "fold",
            str(ad),
            "--base",
            str(plain["base"]),
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 1 and not (tmp_path / "out").exists()
    # the opt-in writes it and lists it in the report, as a merge does
    r = soupkit.fold_lora(ad, plain["base"], tmp_path / "out", progress=False, allow_nonfinite=True)
    assert r.report["nonfinite_tensors"] == ["model.layers.1.self_attn.v_proj.weight"]
    report = json.loads((tmp_path / "out" / "soupkit-report.json").read_text())
    assert report["nonfinite_tensors"] == ["model.layers.1.self_attn.v_proj.weight"]


# ---------------------------------------------------------------------------------- merge modes
@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters of equal rank (PEFT's linear needs it), different alphas, one with rslora."""
    root = tmp_path_factory.mktemp("two")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    pm = peft_adapter(
        model,
        root / "a",
        21,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
    )
    model = pm.unload()
    peft_adapter(
        model,
        root / "b",
        22,
        r=4,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "down_proj"],
    )
    return {"base": root / "base", "a": root / "a", "b": root / "b"}


def _peft_weighted(two: dict[str, Path], weights: list[float], combination: str, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(two["base"]),
            two["a"],
            adapter_name="a",
        )
        pm.load_adapter(two["b"], adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], weights, "m", combination_type=combination, **kw)
        pm.set_adapter("m")
    return pm


def test_linear_is_refused_as_ambiguous(
    two: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(
        UsageError,
        match=r"method 'linear' is ambiguous for LoRA adapters: PEFT's.*"
        r"\nhint: use 'delta_linear'.* or 'peft_linear'",
    ):
        soupkit.merge_loras(
            [two["a"], two["b"]], two["base"], tmp_path / "x", method="linear", progress=False
        )
    code = main(
        [
            "lora",
            "merge",
            str(two["a"]),
            str(two["b"]),
            "--base",
            str(two["base"]),
            "--method",
            "linear",
            str(tmp_path / "x"),
            "--no-progress",
        ]
    )
    assert code == 2 and "ambiguous" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_peft_linear_equals_add_weighted_adapter_linear(
    two: dict[str, Path], tmp_path: Path
) -> None:
    """Bit for bit: the factors of PEFT's combination_type='linear' (negative weight too), and the fold."""
    weights = [0.7, -0.4]
    pm = _peft_weighted(two, weights, "linear")
    r = soupkit.merge_loras(
        [two["a"], two["b"]],
        two["base"],
        tmp_path / "ad",
        method="peft_linear",
        model_parameters=[{"weight": w} for w in weights],
        rank=4,
        progress=False,
    )
    assert r.kind == "adapter"
    mine = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    assert torch.equal(mine[key + ".lora_A.weight"], layer.lora_A["m"].weight.detach())
    assert torch.equal(mine[key + ".lora_B.weight"], layer.lora_B["m"].weight.detach())
    emb = pm.base_model.model.model.embed_tokens
    assert torch.equal(
        mine["base_model.model.model.embed_tokens.lora_embedding_A"],
        emb.lora_embedding_A["m"].detach(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pm.merge_and_unload(adapter_names=["m"]).state_dict()
    soupkit.merge_loras(
        [two["a"], two["b"]],
        two["base"],
        tmp_path / "full",
        method="peft_linear",
        model_parameters=[{"weight": w} for w in weights],
        progress=False,
    )
    assert states_equal(load_file(str(tmp_path / "full" / "model.safetensors")), ref) == []
    # PEFT loads the adapter soupkit wrote, and folds it to the same model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = (
            peft.PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(two["base"]), tmp_path / "ad"
            )
            .merge_and_unload()
            .state_dict()
        )
    assert states_equal(back, ref) == []


def test_delta_linear_differs_from_peft_linear_and_is_the_average_of_the_deltas(
    two: dict[str, Path], tmp_path: Path
) -> None:
    soupkit.merge_loras(
        [two["a"], two["b"]], two["base"], tmp_path / "d", method="delta_linear", progress=False
    )
    soupkit.merge_loras(
        [two["a"], two["b"]], two["base"], tmp_path / "p", method="peft_linear", progress=False
    )
    d = load_file(str(tmp_path / "d" / "model.safetensors"))
    p = load_file(str(tmp_path / "p" / "model.safetensors"))
    w = load_file(str(two["base"] / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    deltas = []
    for ad in (two["a"], two["b"]):
        cfg = json.loads((ad / "adapter_config.json").read_text())
        sd = load_file(str(ad / "adapter_model.safetensors"))
        scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
        k = "base_model.model." + q[: -len(".weight")]
        deltas.append(sd[k + ".lora_B.weight"] @ sd[k + ".lora_A.weight"] * scale)
    torch.testing.assert_close(d[q], w[q] + (deltas[0] + deltas[1]) / 2, rtol=0, atol=1e-6)
    assert (d[q] - p[q]).abs().max() > 1e-3  # PEFT's linear adds the cross terms B_a A_b + B_b A_a


def test_peft_linear_refuses_what_peft_cannot_combine(
    two: dict[str, Path], plain: dict[str, Path], tmp_path: Path
) -> None:
    from soupkit.errors import PlanError

    with pytest.raises(UsageError, match=r"keeps the adapters' rank \[4\], got rank 2"):
        soupkit.merge_loras(
            [two["a"], two["b"]],
            two["base"],
            tmp_path / "x",
            method="peft_linear",
            rank=2,
            progress=False,
        )
    with pytest.raises(
        PlanError, match=r"ranks \[4, 2\]; PEFT.s linear combination needs equal ranks"
    ):
        soupkit.merge_loras(
            [two["a"], plain["ad"]],
            two["base"],
            tmp_path / "x",
            method="peft_linear",
            progress=False,
        )
    assert not (tmp_path / "x").exists()


def test_lora_bias_adapters_merge_to_an_adapter_peft_reads(tmp_path: Path) -> None:
    """--rank with lora_bias: the merged bias update is lora_B.bias, and PEFT's fold of it is the merge."""
    model = tiny_llama(bias=True)
    model.save_pretrained(tmp_path / "base")
    pm = peft_adapter(
        model,
        tmp_path / "a",
        31,
        r=2,
        lora_alpha=4,
        lora_bias=True,
        target_modules=["q_proj", "k_proj"],
    )
    model = pm.unload()
    peft_adapter(model, tmp_path / "b", 32, r=2, lora_alpha=2, target_modules=["k_proj"])
    ads = [tmp_path / "a", tmp_path / "b"]
    soupkit.merge_loras(
        ads, tmp_path / "base", tmp_path / "full", method="task_arithmetic", progress=False
    )
    soupkit.merge_loras(
        ads, tmp_path / "base", tmp_path / "ad", method="task_arithmetic", rank=4, progress=False
    )
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is True
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias" in sd
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert peft_load_problems(tmp_path / "base", tmp_path / "ad") == ([], [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = (
            peft.PeftModel.from_pretrained(
                transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                tmp_path / "ad",
            )
            .merge_and_unload()
            .state_dict()
        )
    bias = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(
        full[bias], load_file(str(tmp_path / "base" / "model.safetensors"))[bias]
    )
    for name, w in full.items():
        torch.testing.assert_close(back[name], w, rtol=0, atol=2e-6)


def test_cli_peft_linear_to_an_adapter(
    two: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "lora",
            "merge",
            str(two["a"]),
            str(two["b"]),
            "--base",
            str(two["base"]),
            "--method",
            "peft_linear",
            "--weights",
            "0.5,0.5",
            "--rank",
            "4",
            str(tmp_path / "m"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "with peft_linear into a rank-4 adapter" in out and "SVD" not in out
    report = json.loads((tmp_path / "m" / "soupkit-report.json").read_text())
    assert report["lora"]["method"] == "peft_linear" and report["lora"]["weights"] == [0.5, 0.5]


def test_task_arithmetic_to_an_adapter_equals_peft_svd_combination(
    two: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT's combination_type='svd' is task arithmetic on the deltas, then a truncated SVD: the same
    math as soupkit's task_arithmetic with --rank (exact here: rank 8 >= 4 + 4)."""
    weights = [0.7, -0.4]
    pm = _peft_weighted(two, weights, "svd", svd_rank=8)
    soupkit.merge_loras(
        [two["a"], two["b"]],
        two["base"],
        tmp_path / "ad",
        method="task_arithmetic",
        model_parameters=[{"weight": w} for w in weights],
        rank=8,
        progress=False,
    )
    mine = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = pm.base_model.model.get_submodule(path)
        theirs = (layer.lora_B["m"].weight @ layer.lora_A["m"].weight).detach()
        key = f"base_model.model.{path}"
        torch.testing.assert_close(
            mine[key + ".lora_B.weight"] @ mine[key + ".lora_A.weight"],
            theirs,
            rtol=1e-4,
            atol=1e-6,
        )
