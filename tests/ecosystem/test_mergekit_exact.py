"""Exact mode (``compute: exact``) against the real mergekit 0.1.5, on bf16 and fp16 recipes.

Every deterministic method mergekit defines and soupkit has is run by both tools on the same
bfloat16 stand-in models (a base and fine-tunes 0.02 away, so that many trimmed magnitudes are
equal in bf16 and the choice among equal magnitudes matters), with ``dtype: bfloat16``,
``float16`` and ``float32`` and an ``out_dtype`` that differs; every output tensor must have the
same dtype and the same bytes. The stochastic methods (DARE, DELLA) cannot share mergekit's
masks (it draws from torch's global generator): their fraction kept and L1 rescale are compared.
Skipped when the mergekit venv is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import soupkit

from .eco_helpers import MERGEKIT_PY, llama_state, run_mergekit, write_llama

pytestmark = pytest.mark.skipif(
    not MERGEKIT_PY.is_file(),
    reason="the mergekit reference venv benchmarks/.venv-mergekit is absent",
)

FT = ["./ft0", "./ft1", "./ft2"]


def _models(params: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"model": m, "parameters": p} for m, p in zip(FT, params)]


def _recipes(dtype: str) -> dict[str, dict[str, Any]]:
    b = {"base_model": "./base", "dtype": dtype}
    return {
        "linear": {
            "merge_method": "linear",
            "dtype": dtype,
            "models": _models([{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}]),
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            **b,
            "parameters": {"lambda": 1.3},
            "models": _models([{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.7}]),
        },
        "ties": {
            "merge_method": "ties",
            **b,
            "models": _models(
                [
                    {"weight": 0.5, "density": 0.5},
                    {"weight": 0.3, "density": 0.7},
                    {"weight": 1.0, "density": 0.3},
                ]
            ),
        },
        "ties_sum_int8": {
            "merge_method": "ties",
            **b,
            "parameters": {"normalize": False, "int8_mask": True, "lambda": 0.8},
            "models": _models([{"weight": 1.0, "density": 0.2}, {"weight": 1.0, "density": 0.4}]),
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            **b,
            "parameters": {"lambda": 1.5},
            "models": _models(
                [
                    {"weight": 0.6, "density": 0.5, "gamma": 0.1},
                    {"weight": 0.4, "density": 0.7, "gamma": 0.05},
                ]
            ),
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            **b,
            "parameters": {"normalize": True},
            "models": _models(
                [
                    {"weight": 0.6, "density": 0.5, "gamma": 0.1},
                    {"weight": 0.4, "density": 0.7},
                    {"weight": 0.5, "density": 0.6},
                ]
            ),
        },
        "model_stock": {"merge_method": "model_stock", **b, "models": _models([{}, {}, {}])},
        "model_stock_rows": {
            "merge_method": "model_stock",
            **b,
            "parameters": {"filter_wise": True},
            "models": _models([{}, {}]),
        },
        "slerp": {
            "merge_method": "slerp",
            **b,
            "models": [{"model": "./base"}, {"model": "./other"}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.3}]},
        },
    }


def _all_recipes() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dt in ("bfloat16", "float16", "float32"):
        for name, r in _recipes(dt).items():
            out[f"{name}-{dt}"] = r
    # the output cast after the computation, as mergekit does it
    out["ties-bfloat16-out-float16"] = {**_recipes("bfloat16")["ties"], "out_dtype": "float16"}
    out["linear-float16-out-float32"] = {**_recipes("float16")["linear"], "out_dtype": "float32"}
    return out


STOCHASTIC = {
    "dare_linear": {
        "merge_method": "dare_linear",
        "base_model": "./base",
        "dtype": "bfloat16",
        "models": _models([{"weight": 1.0, "density": 0.3}]),
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "./base",
        "dtype": "float16",
        "models": _models([{"weight": 1.0, "density": 0.4}]),
    },
    "della": {
        "merge_method": "della",
        "base_model": "./base",
        "dtype": "bfloat16",
        "models": _models([{"weight": 1.0, "density": 0.5, "epsilon": 0.2}]),
    },
    "della_linear": {
        "merge_method": "della_linear",
        "base_model": "./base",
        "dtype": "float16",
        "models": _models([{"weight": 1.0, "density": 0.5, "epsilon": 0.2}]),
    },
}


def _run_both(
    root: Path, recipes: dict[str, dict[str, Any]]
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_mergekit([(root, root / f"{name}.yaml", root / f"mk_{name}", None) for name in recipes])
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, recipe in recipes.items():
            soupkit.merge(
                {**recipe, "compute": "exact"},
                root / f"sk_{name}",
                progress=False,
                hash_inputs=False,
            )
            out[name] = (
                load_file(str(root / f"sk_{name}" / "model.safetensors")),
                load_file(str(root / f"mk_{name}" / "model.safetensors")),
            )
    return out


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exact")
    base = llama_state(0, dtype=torch.bfloat16)
    write_llama(root / "base", base)
    for i in range(3):
        write_llama(root / f"ft{i}", llama_state(10 + i, base=base, dtype=torch.bfloat16))
    write_llama(root / "other", llama_state(20, dtype=torch.bfloat16))
    return root


@pytest.fixture(scope="module")
def outputs(stand_ins: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    return _run_both(stand_ins, _all_recipes())


@pytest.mark.parametrize("name", list(_all_recipes()))
def test_exact_mode_is_bit_identical_to_mergekit(
    outputs: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], name: str
) -> None:
    sk, mk = outputs[name]
    assert sk.keys() == mk.keys()
    assert {k: sk[k].dtype for k in sk} == {k: mk[k].dtype for k in mk}
    assert [
        k for k in sk if not torch.equal(sk[k].view(torch.uint8), mk[k].view(torch.uint8))
    ] == []


def test_bf16_trims_do_hit_equal_magnitudes(stand_ins: Path) -> None:
    # the premise of the tie test above: at the TIES threshold, several bf16 magnitudes are equal
    base = load_file(str(stand_ins / "base" / "model.safetensors"))
    ft = load_file(str(stand_ins / "ft0" / "model.safetensors"))
    d = (
        (ft["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"])
        .abs()
        .reshape(-1)
    )
    k = int(0.5 * d.numel())
    kth = d.float().sort(descending=True).values[k - 1]
    assert int((d.float() == kth).sum()) > 1


def test_stochastic_methods_match_mergekit_distribution(stand_ins: Path) -> None:
    out = _run_both(stand_ins, STOCHASTIC)
    base = load_file(str(stand_ins / "base" / "model.safetensors"))
    ft = load_file(str(stand_ins / "ft0" / "model.safetensors"))
    for name, recipe in STOCHASTIC.items():
        dt = getattr(torch, recipe["dtype"])
        density = recipe["models"][0]["parameters"]["density"]
        stats = []
        for state in out[name]:
            kept = total = 0
            l1_ratio = []
            for k in base:
                orig = ft[k].to(dt) - base[k].to(dt)
                merged = state[k].float() - base[k].to(dt).float()
                kept += int((merged != 0).sum())
                total += merged.numel()
                l1_ratio.append(float(merged.abs().sum() / orig.float().abs().sum()))
            stats.append((kept / total, sum(l1_ratio) / len(l1_ratio)))
        (sk_frac, sk_l1), (mk_frac, mk_l1) = stats
        # about 12 000 entries: 4 standard deviations of the kept fraction is under 0.02
        assert abs(sk_frac - density) < 0.02 and abs(mk_frac - density) < 0.02, (name, stats)
        # rescale: true (mergekit's default for these methods) restores the L1 norm per tensor
        assert abs(sk_l1 - 1) < 0.02 and abs(mk_l1 - 1) < 0.02, (name, stats)


def test_exact_mode_refuses_what_mergekit_has_no_counterpart_for(
    stand_ins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(stand_ins)
    recipe = {
        **_recipes("bfloat16")["ties"],
        "compute": "exact",
        "parameters": {"convention": "paper"},
    }
    with pytest.raises(
        soupkit.ConfigError,
        match=r"compute: exact: ties: mergekit has no sign_source=unweighted, "
        r"sign_tie=zero, aggregation=mean, trim_scope=global",
    ):
        soupkit.plan(recipe)
    # the same recipe without the key plans fine, and --compute exact overrides a recipe
    assert soupkit.plan(_recipes("bfloat16")["ties"], compute="exact").whole_tensors
