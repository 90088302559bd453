"""PEFT LoRA adapters: folding equals PEFT's merge_and_unload bit for bit; several adapters merge
exactly in weight space (the deltas, never the factors); rank-k re-factoring reports its error."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import soupkit
from soupkit.adapters.lora import read_adapter
from soupkit.cli import main
from soupkit.errors import CheckpointFormatError, PlanError, UsageError

from .lora_helpers import peft_adapter as make_adapter
from .lora_helpers import states_equal as _equal_states
from .lora_helpers import tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
# PEFT warns about its own choices while saving (e.g. saving adapted embedding layers)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base Llama and three adapters: different targets, ranks and alphas."""
    root = tmp_path_factory.mktemp("lora")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    specs = [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=2, lora_alpha=3, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True),
        dict(r=4, lora_alpha=4, target_modules=["v_proj", "embed_tokens"]),
    ]
    for i, spec in enumerate(specs):
        pm = make_adapter(model, root / f"ad{i}", 10 + i, **spec)
        model = pm.unload()  # the untouched base again, for the next adapter
    return {"root": root, "base": root / "base", **{f"ad{i}": root / f"ad{i}" for i in range(3)}}


def _peft_fold(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    m = transformers.AutoModelForCausalLM.from_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(m, adapter).merge_and_unload().state_dict()


def test_fold_equals_peft_merge_and_unload(tmp_path: Path) -> None:
    """rank_pattern, alpha_pattern, an adapted embedding and a modules_to_save head: bit-identical."""
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    pm = make_adapter(
        model,
        tmp_path / "ad",
        3,
        r=4,
        lora_alpha=8,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        modules_to_save=["lm_head"],
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
    )
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path / "ad")
    ref = pm.merge_and_unload().state_dict()
    r = soupkit.fold_lora(tmp_path / "ad", tmp_path / "base", tmp_path / "out", progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert _equal_states(got, ref) == []
    assert "lm_head.weight" in r.changed and "model.layers.1.self_attn.v_proj.weight" in r.changed
    ad = read_adapter(tmp_path / "ad")
    assert ad.modules["model.layers.0.self_attn.v_proj"].r == 2
    assert ad.modules["model.layers.0.mlp.down_proj"].scale == 3 / 4
    assert ad.modules["model.embed_tokens"].kind == "embedding"


def test_fold_gpt2_fan_in_fan_out_rslora_in_bfloat16(tmp_path: Path) -> None:
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16).eval()
    gm.save_pretrained(tmp_path / "base")
    pm = make_adapter(
        gm,
        tmp_path / "ad",
        4,
        r=2,
        lora_alpha=4,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        use_rslora=True,
    )
    ref = pm.merge_and_unload().state_dict()
    soupkit.fold_lora(
        tmp_path / "ad", tmp_path / "base", tmp_path / "peft", rounding="peft", progress=False
    )
    assert _equal_states(load_file(str(tmp_path / "peft" / "model.safetensors")), ref) == []
    soupkit.fold_lora(tmp_path / "ad", tmp_path / "base", tmp_path / "fp32", progress=False)
    fp32 = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"
    assert fp32[name].dtype == torch.bfloat16
    torch.testing.assert_close(fp32[name].float(), ref[name].float(), rtol=1e-2, atol=1e-3)


def test_fold_convolutions(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.fc = (
                torch.nn.Conv2d(3, 8, 3),
                torch.nn.Conv2d(8, 4, 1),
                torch.nn.Linear(4, 2),
            )

    torch.manual_seed(2)
    net = Net()
    (tmp_path / "base").mkdir()
    save_file(net.state_dict(), str(tmp_path / "base" / "model.safetensors"))
    pm = make_adapter(net, tmp_path / "ad", 5, r=2, lora_alpha=3, target_modules=["c1", "c2", "fc"])
    ref = pm.merge_and_unload().state_dict()
    soupkit.fold_lora(tmp_path / "ad", tmp_path / "base", tmp_path / "out", progress=False)
    assert _equal_states(load_file(str(tmp_path / "out" / "model.safetensors")), ref) == []


def test_folded_folder_is_a_transformers_model_with_card_and_report(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "folded"
    code = main(
        ["lora", "fold", str(llama["ad0"]), "--base", str(llama["base"]), str(out), "--no-progress"]
    )
    assert code == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref = _peft_fold(llama["base"], llama["ad0"])
    assert _equal_states(merged.state_dict(), ref) == []
    report = json.loads((out / "soupkit-report.json").read_text())
    assert report["lora"]["operation"] == "fold" and report["inputs"]["adapters"][0]["r"] == 4
    assert all(len(f["sha256"]) == 64 for a in report["inputs"]["adapters"] for f in a["files"])
    assert len(report["outputs"][0]["sha256"]) == 64
    assert "tags:\n- merge\n- soupkit\n- lora" in (out / "README.md").read_text()


def _delta(adapter: Path, module: str) -> torch.Tensor:
    """scale * B @ A of one module, computed here from the files."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    if f"{key}.lora_A.weight" not in sd:
        return torch.zeros(())
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
    return sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"] * scale


def test_merge_is_exact_in_weight_space(llama: dict[str, Path], tmp_path: Path) -> None:
    ads = [llama["ad0"], llama["ad1"]]
    r = soupkit.merge_loras(
        ads,
        llama["base"],
        tmp_path / "ta",
        method="task_arithmetic",
        model_parameters=[{"weight": 0.7}, {"weight": 0.3}],
        progress=False,
    )
    got = load_file(str(tmp_path / "ta" / "model.safetensors"))
    base = load_file(str(llama["base"] / "model.safetensors"))
    for name in got:
        mod = name.removesuffix(".weight")
        expected = base[name] + 0.7 * _delta(ads[0], mod) + 0.3 * _delta(ads[1], mod)
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)
    assert "model.layers.0.self_attn.o_proj.weight" in r.changed  # only the second adapter has it
    # merging the factors instead (mean of the Bs times mean of the As) is a different model
    mod = "model.layers.0.self_attn.q_proj"
    sds = [load_file(str(a / "adapter_model.safetensors")) for a in ads]
    key = f"base_model.model.{mod}"
    bmix = 0.7 * sds[0][key + ".lora_B.weight"] + 0.3 * sds[1][key + ".lora_B.weight"][
        :, :2
    ].repeat(1, 2)
    amix = 0.7 * sds[0][key + ".lora_A.weight"] + 0.3 * sds[1][key + ".lora_A.weight"].repeat(2, 1)
    assert (got[mod + ".weight"] - (base[mod + ".weight"] + bmix @ amix * 2)).abs().max() > 1e-3


def test_merge_to_adapter_reports_the_svd_error(llama: dict[str, Path], tmp_path: Path) -> None:
    ads = [llama["ad0"], llama["ad1"]]
    full = tmp_path / "full"
    soupkit.merge_loras(ads, llama["base"], full, method="delta_linear", progress=False)
    merged = load_file(str(full / "model.safetensors"))
    base = load_file(str(llama["base"] / "model.safetensors"))
    # rank 6 >= 4 + 2: the merged deltas are represented exactly
    exact = soupkit.merge_loras(
        ads, llama["base"], tmp_path / "r6", method="delta_linear", rank=6, progress=False
    )
    assert exact.kind == "adapter" and exact.max_svd_error < 1e-5
    # rank 1: the reported error is the tail of the singular values
    r1 = soupkit.merge_loras(
        ads, llama["base"], tmp_path / "r1", method="delta_linear", rank=1, progress=False
    )
    for mod, err in r1.svd_errors.items():
        d = (merged[mod + ".weight"] - base[mod + ".weight"]).double()
        s = torch.linalg.svdvals(d)
        assert err == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-4, abs=1e-6), mod
    assert r1.report["lora"]["svd"]["relative_frobenius_error"].keys() == r1.svd_errors.keys()
    cfg = json.loads((tmp_path / "r1" / "adapter_config.json").read_text())
    assert (
        cfg["r"] == 1
        and cfg["lora_alpha"] == 1
        and sorted(cfg["target_modules"]) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    )
    # PEFT loads the written adapter, and folding it gives W + B'A'
    ref = _peft_fold(llama["base"], tmp_path / "r6")
    for name, w in merged.items():
        torch.testing.assert_close(ref[name], w, rtol=0, atol=2e-6)


def test_merge_ties_to_adapter_matches_peft_add_weighted_adapter(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    ads = [llama["ad0"], llama["ad2"]]  # both adapt v_proj
    soupkit.merge_loras(
        ads,
        llama["base"],
        tmp_path / "out",
        method="ties",
        parameters={"density": 0.5},
        model_parameters=[{"weight": 1.0}, {"weight": 0.5}],
        rank=4,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(llama["base"]),
            ads[0],
            adapter_name="a",
        )
        pm.load_adapter(ads[1], adapter_name="b")
        pm.add_weighted_adapter(
            ["a", "b"], [1.0, 0.5], "m", combination_type="ties_svd", svd_rank=4, density=0.5
        )
    mine = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj"
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    theirs = layer.lora_B["m"].weight @ layer.lora_A["m"].weight
    torch.testing.assert_close(
        mine[key + ".lora_B.weight"] @ mine[key + ".lora_A.weight"],
        theirs.detach(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_cli_merge_prints_the_error_summary(
    llama: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "lora",
            "merge",
            str(llama["ad0"]),
            str(llama["ad1"]),
            "--base",
            str(llama["base"]),
            "--method",
            "ties",
            "--param",
            "density=0.5",
            "--weights",
            "1,0.5",
            "--rank",
            "2",
            str(tmp_path / "m"),
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert (
        code == 0 and "into a rank-2 adapter" in out and "relative Frobenius error: overall" in out
    )
    assert "using convention 'peft'" in out
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()


def test_refusals(llama: dict[str, Path], tmp_path: Path) -> None:
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((llama["ad0"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UsageError, match="DoRA"):
        read_adapter(dora)
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(
        UsageError, match="a IA3 adapter; soupkit folds and merges LoRA adapters only"
    ):
        read_adapter(dora)
    with pytest.raises(CheckpointFormatError, match="no adapter_config.json"):
        read_adapter(llama["base"])
    other = tmp_path / "other"
    cfg2 = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    transformers.LlamaForCausalLM(cfg2).save_pretrained(other)
    with pytest.raises(
        PlanError, match="adapted module 'model.layers.1.self_attn.q_proj' has no weight"
    ):
        soupkit.fold_lora(llama["ad0"], other, tmp_path / "x", progress=False)
    with pytest.raises(UsageError, match="trim_scope: global"):
        soupkit.merge_loras(
            [llama["ad0"], llama["ad1"]],
            llama["base"],
            tmp_path / "y",
            method="ties",
            parameters={"convention": "paper", "density": 0.5},
            progress=False,
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("method", ["karcher", "nuslerp"])
def test_merge_loras_treats_the_base_as_a_recipe_does(
    llama: dict[str, Path], tmp_path: Path, method: str
) -> None:
    # karcher averages the base as one more input, nuslerp interpolates task vectors around it:
    # merging the adapters equals the recipe over the folded models with `base_model:` the base
    ads = [llama["ad0"], llama["ad2"]]
    soupkit.merge_loras(ads, llama["base"], tmp_path / "lora", method=method, progress=False)
    folded = [
        soupkit.fold_lora(a, llama["base"], tmp_path / f"f{i}", progress=False).out
        for i, a in enumerate(ads)
    ]
    soupkit.merge(
        {
            "merge_method": method,
            "base_model": str(llama["base"]),
            "dtype": "float32",
            "models": [{"model": str(f)} for f in folded],
        },
        tmp_path / "recipe",
        progress=False,
    )
    got = load_file(str(tmp_path / "lora" / "model.safetensors"))
    want = load_file(str(tmp_path / "recipe" / "model.safetensors"))
    base = load_file(str(llama["base"] / "model.safetensors"))
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert changed
    for k in changed:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_stochastic_lora_merge_draws_what_a_file_merge_draws(
    llama: dict[str, Path], tmp_path: Path, method: str
) -> None:
    """A seeded DARE merge of adapters drops exactly the entries a file merge of the folded
    models drops with the same seed (counter-based draws keyed by (seed, tensor name), element
    by element); the kept values differ only by the conventions (LoRA merges default to PEFT's)."""
    ads = [llama["ad0"], llama["ad1"]]
    folded = []
    for i, ad in enumerate(ads):
        soupkit.fold_lora(ad, llama["base"], tmp_path / f"f{i}", progress=False)
        folded.append(tmp_path / f"f{i}")
    soupkit.merge_loras(
        ads, llama["base"], tmp_path / "lora", method=method, parameters={"density": 0.5},
        seed=7, progress=False,
    )  # fmt: skip
    recipe = {
        "merge_method": method,
        "base_model": str(llama["base"]),
        "models": [
            {"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in folded
        ],
        "dtype": "float32",
        "seed": 7,
    }
    soupkit.merge(recipe, tmp_path / "file", progress=False)
    base = load_file(llama["base"] / "model.safetensors")
    got = load_file(tmp_path / "lora" / "model.safetensors")
    ref = load_file(tmp_path / "file" / "model.safetensors")
    checked = 0
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
    ):
        a, b = got[name].float() - base[name].float(), ref[name].float() - base[name].float()
        kept = a != 0
        assert torch.equal(kept, b != 0), name
        assert 0.2 < kept.float().mean() < 0.8  # some dropped, some kept: the draws matter
        checked += 1
    assert checked == 2
