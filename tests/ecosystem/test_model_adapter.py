"""mergekit's ``model+adapter`` paths: the adapter is folded in (cached), equal to
``soupkit lora fold`` and, in exact mode, to mergekit 0.1.5's own fold."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import soupkit
from soupkit.adapters.lora import fold_lora

from .eco_helpers import MERGEKIT_PY, run_mergekit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model_adapter")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    for name in ("base", "other"):
        model.to(torch.bfloat16).save_pretrained(root / name)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(root / "base"),
            peft.LoraConfig(
                init_lora_weights=False,
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "down_proj"],
            ),
        )
        pm.save_pretrained(root / "lora")
    return root


def _recipe() -> dict[str, object]:
    return {
        "merge_method": "linear",
        "dtype": "bfloat16",
        "models": [
            {"model": "./base+./lora", "parameters": {"weight": 0.5}},
            {"model": "./other", "parameters": {"weight": 0.5}},
        ],
    }


def test_model_plus_adapter_equals_soupkit_lora_fold(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(models)
    monkeypatch.setenv("SOUPKIT_LORA_CACHE", str(tmp_path / "cache"))
    p = soupkit.plan(_recipe())
    assert any(n.startswith("./base+./lora: the adapter is folded into the model") for n in p.notes)
    got = load_file(
        str(
            soupkit.merge(_recipe(), tmp_path / "out", progress=False, hash_inputs=False).out
            / "model.safetensors"
        )
    )
    fold_lora(models / "lora", models / "base", tmp_path / "folded", progress=False)
    ref = soupkit.merge(
        {
            **_recipe(),
            "models": [
                {"model": str(tmp_path / "folded"), "parameters": {"weight": 0.5}},
                {"model": "./other", "parameters": {"weight": 0.5}},
            ],
        },
        tmp_path / "ref",
        progress=False,
        hash_inputs=False,
    )
    want = load_file(str(ref.out / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    # the fold is cached: the second plan reads it from there
    assert any("taken from the cache" in n for n in soupkit.plan(_recipe()).notes)
    # a missing side is named
    with pytest.raises(soupkit.PlanError, match=r"the adapter '.*nope' does not exist"):
        soupkit.plan({**_recipe(), "models": [{"model": "./base+./nope"}, {"model": "./other"}]})


def test_an_adapter_rewritten_with_its_size_and_time_is_folded_again(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retrained adapter has the same size; `cp -p`, `rsync -t` or a file system with coarse
    times can give it the old modification time too. The cached fold must not be reused."""
    import os
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(models / "lora", tmp_path / "lora")
    monkeypatch.chdir(models)
    monkeypatch.setenv("SOUPKIT_LORA_CACHE", str(tmp_path / "cache"))
    recipe = {"merge_method": "linear", "models": [{"model": f"./base+{tmp_path / 'lora'}"}]}
    first = soupkit.merge(recipe, tmp_path / "a", progress=False, hash_inputs=False)
    f = tmp_path / "lora" / "adapter_model.safetensors"
    st = f.stat()
    state = load_file(str(f))
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    save_file({k: v * 2 if "lora_B" in k else v for k, v in state.items()}, str(f), metadata=meta)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert any(
        "adapter is folded into the model" in n and ", folded:" in n
        for n in soupkit.plan(recipe).notes
    )
    second = soupkit.merge(recipe, tmp_path / "b", progress=False, hash_inputs=False, force=True)
    a = load_file(str(first.out / "model.safetensors"))
    b = load_file(str(second.out / "model.safetensors"))
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(any(m in k for m in ("q_proj", "v_proj", "down_proj")) for k in changed)


@pytest.mark.skipif(not MERGEKIT_PY.is_file(), reason="the mergekit reference venv is absent")
def test_model_plus_adapter_exact_mode_equals_mergekit(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(_recipe()))
    run_mergekit([(models, tmp_path / "r.yaml", tmp_path / "mk", tmp_path / "mk-cache")])
    monkeypatch.chdir(models)
    monkeypatch.setenv("SOUPKIT_LORA_CACHE", str(tmp_path / "cache"))
    sk = soupkit.merge(
        {**_recipe(), "compute": "exact"}, tmp_path / "sk", progress=False, hash_inputs=False
    )
    got, want = (
        load_file(str(sk.out / "model.safetensors")),
        load_file(str(tmp_path / "mk" / "model.safetensors")),
    )
    assert got.keys() == want.keys()
    assert [
        k for k in got if not torch.equal(got[k].view(torch.int16), want[k].view(torch.int16))
    ] == []
