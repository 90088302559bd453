"""`soupkit lora extract`: a PEFT adapter from a full fine-tune by truncated SVD per module. Full
rank folds back to the fine-tune; PEFT loads the adapter; at equal rank the fold is at least as
close to the fine-tune as mergekit-extract-lora's."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.cli import main
from soupkit.errors import NonFiniteError, PlanError, UsageError

from .eco_helpers import MERGEKIT_PY, llama_state, write_llama

LAYERS = 2


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama and a full fine-tune of it (every tensor moved, norms and embeddings too)."""
    root = tmp_path_factory.mktemp("extract")
    base = llama_state(0, layers=LAYERS)
    ft = llama_state(1, layers=LAYERS, base=base, scale=0.05)
    write_llama(root / "base", base)
    write_llama(root / "ft", ft)
    return {"root": root, "base": root / "base", "ft": root / "ft"}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def test_full_rank_round_trip_gives_the_fine_tune_back(
    pair: dict[str, Path], tmp_path: Path
) -> None:
    r = soupkit.extract_lora(pair["ft"], pair["base"], tmp_path / "ad", rank=32, progress=False)
    assert r.kind == "adapter" and r.max_svd_error < 1e-6
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and cfg["lora_alpha"] == 32
    # 16x16 and 32x16 weights: stored at rank 16 with scale 1 through rank_pattern / alpha_pattern
    assert cfg["rank_pattern"]["model.layers.0.self_attn.q_proj"] == 16
    assert cfg["alpha_pattern"]["model.layers.0.self_attn.q_proj"] == 16
    assert "model.embed_tokens" in cfg["modules_to_save"] and "model.norm" in cfg["modules_to_save"]
    assert "lm_head" in cfg["target_modules"]
    soupkit.fold_lora(tmp_path / "ad", pair["base"], tmp_path / "folded", progress=False)
    got = load_file(str(tmp_path / "folded" / "model.safetensors"))
    ft = load_file(str(pair["ft"] / "model.safetensors"))
    assert got.keys() == ft.keys()
    for name, w in ft.items():
        # float32 rounding: a few ulps of the largest element
        tol = 8 * torch.finfo(torch.float32).eps * float(w.abs().max())
        assert float((got[name] - w).abs().max()) <= tol, name
    report = json.loads((tmp_path / "ad" / "soupkit-report.json").read_text())
    assert report["lora"]["operation"] == "extract" and report["nonfinite_tensors"] == []
    assert set(report["lora"]["svd"]["relative_frobenius_error"]) == set(r.changed)


def test_peft_loads_the_extracted_adapter(pair: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    soupkit.extract_lora(pair["ft"], pair["base"], tmp_path / "ad", rank=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(pair["base"]), tmp_path / "ad"
        )
        loaded = pm.load_adapter(
            tmp_path / "ad", adapter_name="check"
        )  # every key used, none missing
    assert loaded.unexpected_keys == [] and [k for k in loaded.missing_keys if ".check." in k] == []
    pm.set_adapter("default")
    pm.delete_adapter("check")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pm.merge_and_unload().state_dict()
    soupkit.fold_lora(tmp_path / "ad", pair["base"], tmp_path / "folded", progress=False)
    got = load_file(str(tmp_path / "folded" / "model.safetensors"))
    for name, w in got.items():
        torch.testing.assert_close(w, ref[name], rtol=0, atol=1e-6)


def test_low_rank_error_is_the_tail_of_the_singular_values(
    pair: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "lora",
            "extract",
            str(pair["ft"]),
            "--base",
            str(pair["base"]),
            "--rank",
            "3",
            str(tmp_path / "ad"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert (
        code == 0
        and "extracted a rank-3 LoRA" in out
        and "relative Frobenius error: overall" in out
    )
    report = json.loads((tmp_path / "ad" / "soupkit-report.json").read_text())
    errs = report["lora"]["svd"]["relative_frobenius_error"]
    ft, base = (
        load_file(str(pair["ft"] / "model.safetensors")),
        load_file(str(pair["base"] / "model.safetensors")),
    )
    for mod, err in errs.items():
        s = torch.linalg.svdvals((ft[mod + ".weight"] - base[mod + ".weight"]).double())
        assert err == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-4), mod
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (3, 16)
    assert sd["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (32, 3)


def test_identical_models_give_a_zero_adapter(pair: dict[str, Path], tmp_path: Path) -> None:
    r = soupkit.extract_lora(pair["base"], pair["base"], tmp_path / "ad", rank=2, progress=False)
    assert r.max_svd_error == 0.0 and r.report["lora"]["stored_whole"] == []
    soupkit.fold_lora(tmp_path / "ad", pair["base"], tmp_path / "folded", progress=False)
    base = load_file(str(pair["base"] / "model.safetensors"))
    assert all(
        torch.equal(t, base[n])
        for n, t in load_file(str(tmp_path / "folded" / "model.safetensors")).items()
    )


def test_only_changed_tensors_are_stored_whole(pair: dict[str, Path], tmp_path: Path) -> None:
    base = load_file(str(pair["base"] / "model.safetensors"))
    ft = dict(base)
    ft["model.layers.1.mlp.down_proj.weight"] = base["model.layers.1.mlp.down_proj.weight"] + 0.1
    ft["model.norm.weight"] = base["model.norm.weight"] * 1.5
    (tmp_path / "ft").mkdir()
    save_file(ft, str(tmp_path / "ft" / "model.safetensors"))
    r = soupkit.extract_lora(tmp_path / "ft", pair["base"], tmp_path / "ad", rank=1, progress=False)
    assert r.report["lora"]["stored_whole"] == ["model.norm.weight"]
    assert r.svd_errors["model.layers.1.mlp.down_proj"] < 1e-6  # + 0.1 everywhere is rank 1
    assert r.svd_errors["model.layers.0.mlp.down_proj"] == 0.0  # unchanged: zero delta


def test_refusals(pair: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_llama(other, llama_state(0, layers=1))
    with pytest.raises(
        PlanError, match=r"model\.layers\.1\.mlp\.up_proj\.weight' is in .* but not in"
    ):
        soupkit.extract_lora(pair["ft"], other, tmp_path / "x", rank=2, progress=False)
    assert (
        main(
            [
                "lora",
                "extract",
                str(pair["ft"]),
                "--base",
                str(pair["base"]),
                "--rank",
                "0",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    ft = load_file(str(pair["ft"] / "model.safetensors"))
    ft["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("nan")
    (tmp_path / "nan").mkdir()
    save_file(ft, str(tmp_path / "nan" / "model.safetensors"))
    with pytest.raises(
        NonFiniteError,
        match=r"k_proj\.lora_A\.weight'.*NaN in the output, from the inputs:\n"
        r"  - fine-tune .*/nan holds 1 NaN and 0 Inf",
    ):
        soupkit.extract_lora(tmp_path / "nan", pair["base"], tmp_path / "x", rank=2, progress=False)
    assert not (tmp_path / "x").exists()
    r = soupkit.extract_lora(
        tmp_path / "nan", pair["base"], tmp_path / "x", rank=2, progress=False, allow_nonfinite=True
    )
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    assert r.report["nonfinite_tensors"] == [k + ".lora_A.weight", k + ".lora_B.weight"]
    assert "model.layers.0.self_attn.k_proj" not in r.svd_errors


MERGEKIT_EXTRACT = MERGEKIT_PY.parent / "mergekit-extract-lora"


@pytest.mark.skipif(not MERGEKIT_EXTRACT.is_file(), reason="the mergekit reference venv is absent")
def test_at_least_as_close_to_the_fine_tune_as_mergekit_extract_lora(
    pair: dict[str, Path], tmp_path: Path
) -> None:
    """Same inputs, same rank: the folded weights of both adapters compared with the fine-tune."""
    rank = 4
    proc = subprocess.run(
        [
            str(MERGEKIT_EXTRACT),
            "--model",
            str(pair["ft"]),
            "--base-model",
            str(pair["base"]),
            "--out-path",
            str(tmp_path / "mk"),
            "--max-rank",
            str(rank),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    soupkit.extract_lora(pair["ft"], pair["base"], tmp_path / "ours", rank=rank, progress=False)
    ft = load_file(str(pair["ft"] / "model.safetensors"))
    base = load_file(str(pair["base"] / "model.safetensors"))
    folded = {}
    for name in ("mk", "ours"):
        soupkit.fold_lora(tmp_path / name, pair["base"], tmp_path / f"fold-{name}", progress=False)
        folded[name] = load_file(str(tmp_path / f"fold-{name}" / "model.safetensors"))
    linear = [
        n for n, t in ft.items() if t.dim() == 2 and "embed" not in n and n != "lm_head.weight"
    ]
    assert len(linear) == 7 * LAYERS
    for n in linear:
        ours, theirs = (
            _rel(folded["ours"][n] - base[n], ft[n] - base[n]),
            _rel(folded["mk"][n] - base[n], ft[n] - base[n]),
        )
        assert 0 < ours <= theirs * (1 + 1e-5) + 1e-7, (n, ours, theirs)
    total = {
        k: sum(float((f[n] - ft[n]).double().norm() ** 2) for n in linear) ** 0.5
        for k, f in folded.items()
    }
    assert total["ours"] <= total["mk"] * (1 + 1e-5)
    # the rest: soupkit stores every other changed tensor whole (exact) and factors lm_head like any
    # Linear; mergekit stores lm_head whole as an output embedding
    assert all(
        torch.equal(folded["ours"][n], ft[n])
        for n in ft
        if n not in linear and n != "lm_head.weight"
    )


def test_gpt2_style_conv1d_models_are_refused(pair: dict[str, Path], tmp_path: Path) -> None:
    """GPT-2's Conv1D stores weights [in, out]; Linear factors would load transposed in PEFT."""
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(
            (pair[name] / "model.safetensors").read_bytes()
        )
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UsageError, match=r"a 'gpt2' model, whose layers are GPT-2's Conv1D"):
        soupkit.extract_lora(
            tmp_path / "ft", tmp_path / "base", tmp_path / "ad", rank=4, progress=False
        )
    assert not (tmp_path / "ad").exists()


def test_only_modules_whose_bias_changed_too_is_refused_not_an_unloadable_adapter(
    tmp_path: Path,
) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"l.q.weight": torch.randn(4, 4, generator=g), "l.q.bias": torch.randn(4, generator=g)}
    ft = {k: v + 0.1 for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(ft, str(tmp_path / "ft.safetensors"))
    with pytest.raises(
        PlanError,
        match="no 2-D module can be factored: every changed weight's module changed its bias too",
    ):
        soupkit.extract_lora(
            tmp_path / "ft.safetensors",
            tmp_path / "base.safetensors",
            tmp_path / "ad",
            rank=2,
            progress=False,
        )
    assert not (tmp_path / "ad").exists()
