"""The rest of mergekit's recipe schema: config.json naming the dtype written, the convention
key on every method with switches, what ``soupkit plan`` says about conventions and exact mode,
and exact mode's streaming output against the in-memory reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import soupkit
from soupkit import methods
from soupkit.cli import main
from soupkit.methods._conventions import PresetParams

from .eco_helpers import llama_config, llama_state, write_llama


@pytest.fixture
def bf16_models(tmp_path: Path) -> Path:
    base = llama_state(0, layers=2, dtype=torch.bfloat16)
    write_llama(tmp_path / "base", base, config=llama_config(2, torch_dtype="bfloat16"))
    for i in range(2):
        write_llama(
            tmp_path / f"ft{i}",
            llama_state(5 + i, layers=2, base=base, dtype=torch.bfloat16),
            config=llama_config(2, torch_dtype="bfloat16"),
        )
    return tmp_path


def _recipe(method: str = "ties", **extra: object) -> dict[str, object]:
    return {
        "merge_method": method,
        "base_model": "./base",
        "models": [
            {"model": "./ft0", "parameters": {"density": 0.5}},
            {"model": "./ft1", "parameters": {"density": 0.5}},
        ],
        **extra,
    }


@pytest.mark.parametrize(
    ("extra", "want"),
    [({}, "bfloat16"), ({"out_dtype": "float16"}, "float16"), ({"dtype": "float32"}, "float32")],
)
def test_config_json_names_the_dtype_written(
    bf16_models: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str], want: str
) -> None:
    monkeypatch.chdir(bf16_models)
    r = soupkit.merge(_recipe(**extra), bf16_models / "out", progress=False, hash_inputs=False)
    cfg = json.loads((r.out / "config.json").read_text())
    assert cfg["torch_dtype"] == want
    assert {str(t.dtype) for t in load_file(str(r.out / "model.safetensors")).values()} == {
        f"torch.{want}"
    }
    assert cfg["num_hidden_layers"] == 2  # the rest of the file is carried


def test_config_json_newer_dtype_key_is_updated_too(
    bf16_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (bf16_models / "base" / "config.json").write_text(json.dumps(llama_config(2, dtype="bfloat16")))
    monkeypatch.chdir(bf16_models)
    r = soupkit.merge(
        _recipe(out_dtype="float16"), bf16_models / "out", progress=False, hash_inputs=False
    )
    cfg = json.loads((r.out / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["torch_dtype"] == "float16"


@pytest.mark.parametrize(
    "spec",
    [s for s in methods.all_methods() if issubclass(s.params, PresetParams)],
    ids=lambda s: s.name,
)
def test_every_method_with_switches_accepts_the_convention_key(spec: methods.MethodSpec) -> None:
    n = 2
    values = {k: (v,) * n for k, v in spec.params.per_model.items()}
    for conv in ("paper", "mergekit"):
        assert spec.params.model_validate({**values, "convention": conv}).convention == conv  # type: ignore[attr-defined]


def test_plan_says_which_convention_and_compute(
    bf16_models: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(bf16_models)
    (bf16_models / "r.yaml").write_text(json.dumps(_recipe(dtype="bfloat16")))
    assert main(["plan", "r.yaml"]) == 0
    out = capsys.readouterr().out
    assert (
        "convention  mergekit (the default); `convention: paper` would set trim_scope=global, "
        "sign_source=unweighted, sign_tie=zero, aggregation=mean"
    ) in out
    assert "compute     float32 accumulation" in out
    assert main(["plan", "r.yaml", "--compute", "exact"]) == 0
    out = capsys.readouterr().out
    assert (
        "compute     exact: in the recipe's dtype (bfloat16)" in out
        and "whole tensors: exact mode" in out
    )
    (bf16_models / "p.yaml").write_text(
        json.dumps(_recipe(dtype="bfloat16", parameters={"convention": "paper"}))
    )
    assert main(["plan", "p.yaml", "--compute", "exact"]) == 2
    assert "mergekit has no sign_source=unweighted" in capsys.readouterr().err
    assert (
        main(["validate", "p.yaml", "--compute", "exact"]) == 2
        and main(["validate", "p.yaml"]) == 0
    )


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "slerp", "model_stock"]
)
def test_exact_mode_streamed_equals_in_memory(
    bf16_models: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    monkeypatch.chdir(bf16_models)
    params = {
        "ties": {"density": 0.5},
        "dare_ties": {"density": 0.5},
        "breadcrumbs_ties": {"density": 0.5},
        "della": {"density": 0.5, "epsilon": 0.1},
        "slerp": {"t": 0.3},
        "model_stock": {},
    }[method]
    fts = ["./ft0"] if method == "slerp" else ["./ft0", "./ft1"]
    recipe = {
        "merge_method": method,
        "base_model": "./base",
        "dtype": "bfloat16",
        "compute": "exact",
        "models": [{"model": m} for m in fts],
        "parameters": params,
        "seed": 7,
    }
    r = soupkit.merge(recipe, bf16_models / "out", progress=False, hash_inputs=False)
    on_disk = load_file(str(r.out / "model.safetensors"))
    states = [load_file(str(bf16_models / m / "model.safetensors")) for m in fts]
    base = load_file(str(bf16_models / "base" / "model.safetensors"))
    mem = soupkit.merge_state_dicts(
        states, method, base=base, parameters=params, dtype="bfloat16", seed=7, compute="exact"
    )
    assert on_disk.keys() == mem.keys()
    assert all(torch.equal(on_disk[k].view(torch.int16), mem[k].view(torch.int16)) for k in mem)
    # and the same recipe again gives the same bytes
    again = soupkit.merge(recipe, bf16_models / "again", progress=False, hash_inputs=False)
    assert (again.out / "model.safetensors").read_bytes() == (
        r.out / "model.safetensors"
    ).read_bytes()


def test_parameters_mergekit_ignores_are_accepted_with_a_note(
    bf16_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(bf16_models)
    recipe = {
        "merge_method": "model_stock",
        "base_model": "./base",
        "parameters": {"density": 0.5},
        "models": [
            {"model": "./ft0", "parameters": {"weight": 0.5}},
            {"model": "./ft1", "parameters": {"weight": 0.5}},
        ],
    }
    p = soupkit.plan(recipe)
    assert [n for n in p.notes if "ignored" in n] == [
        "parameter 'density' is ignored: 'model_stock' does not use it (mergekit accepts and ignores it too)",
        "parameter 'weight' is ignored: 'model_stock' does not use it (mergekit accepts and ignores it too)",
    ]
    # the merge equals the one without those keys
    a = soupkit.merge(recipe, bf16_models / "a", progress=False, hash_inputs=False)
    b = soupkit.merge(
        {**recipe, "parameters": {}, "models": [{"model": "./ft0"}, {"model": "./ft1"}]},
        bf16_models / "b",
        progress=False,
        hash_inputs=False,
    )
    assert (a.out / "model.safetensors").read_bytes() == (b.out / "model.safetensors").read_bytes()
    # a typo is still an error, and so is a mergekit key that would change mergekit's result
    with pytest.raises(soupkit.ConfigError, match="unknown parameter 'wieght'"):
        soupkit.plan({**recipe, "parameters": {"wieght": 1.0}})
    with pytest.raises(soupkit.ConfigError, match="unknown parameter 'rescale' for method 'ties'"):
        soupkit.plan(_recipe(parameters={"rescale": True}))
    assert "ignored" in " ".join(soupkit.plan(_recipe(parameters={"rescale": False})).notes)


def test_chat_template_and_global_parameters_under_a_model(
    bf16_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(bf16_models)
    recipe = {
        **_recipe("della", chat_template="auto", parameters={"lambda": 0.9, "epsilon": 0.1}),
        "models": [
            {"model": "./ft0", "parameters": {"density": 0.5, "lambda": 0.9}},
            {"model": "./ft1", "parameters": {"density": 0.5}},
        ],
    }
    notes = soupkit.plan(recipe).notes
    assert "chat_template: 'auto' is not applied" in " ".join(notes)
    assert (
        "parameter 'lambda' under a model is ignored: it is global (its top-level value applies, as in "
        "mergekit)"
    ) in notes
    # a different value under a model would be ignored by mergekit: an error, not a silent change
    recipe["models"][0]["parameters"]["lambda"] = 0.5  # type: ignore[index]
    with pytest.raises(soupkit.ConfigError, match="'lambda' is a global parameter of 'della'"):
        soupkit.plan(recipe)


def test_slices_recipes_get_the_same_checks(
    bf16_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(bf16_models)
    recipe = {
        "merge_method": "ties",
        "base_model": "./base",
        "compute": "exact",
        "parameters": {"convention": "paper"},
        "slices": [
            {
                "sources": [
                    {"model": m, "layer_range": [0, 2], "parameters": {"density": 0.5}}
                    for m in ("./base", "./ft0", "./ft1")
                ]
            }
        ],
    }
    with pytest.raises(
        soupkit.PlanError, match="compute: exact: ties: mergekit has no sign_source=unweighted"
    ):
        soupkit.plan(recipe)
    stock = {
        "merge_method": "model_stock",
        "base_model": "./base",
        "slices": [
            {
                "sources": [
                    {"model": m, "layer_range": [0, 2], "parameters": {"weight": 0.5}}
                    for m in ("./base", "./ft0", "./ft1")
                ]
            }
        ],
    }
    assert (
        "parameter 'weight' is ignored: 'model_stock' does not use it (mergekit accepts and ignores it too)"
        in soupkit.plan(stock).notes
    )
