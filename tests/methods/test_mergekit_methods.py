"""The deterministic methods against the real mergekit 0.1.5, recipe for recipe.

mergekit runs in its own venv (``benchmarks/.venv-mergekit``, see tests/ecosystem) through a
subprocess; skipped when that venv is absent. ``task_arithmetic`` and ``ties`` are compared in
tests/ecosystem/test_mergekit_reference.py; here: Breadcrumbs (with and without TIES), Model
Stock and SLERP, with soupkit's ``convention: mergekit`` where a method has conventions.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import soupkit

MERGEKIT_PY = (
    Path(__file__).resolve().parents[2] / "benchmarks" / ".venv-mergekit" / "bin" / "python"
)
pytestmark = pytest.mark.skipif(
    not MERGEKIT_PY.is_file(),
    reason="the mergekit reference venv benchmarks/.venv-mergekit is absent",
)

RUNNER = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in json.loads(sys.argv[1]):
    c = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(c, out, MergeOptions(copy_tokenizer=False, lazy_unpickle=False, out_shard_size=10**12, quiet=True))
"""

HIDDEN, INTER, VOCAB, LAYERS = 16, 32, 64, 3


def _config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": HIDDEN // 2,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes |= {
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def _write(folder: Path, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_config()))


RECIPES: dict[str, dict[str, Any]] = {
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "./base",
        "dtype": "float32",
        "models": [
            {"model": "./ft0", "parameters": {"weight": 0.6, "density": 0.5, "gamma": 0.1}},
            {"model": "./ft1", "parameters": {"weight": 0.4, "density": 0.7, "gamma": 0.05}},
        ],
        "parameters": {"lambda": 1.5},
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "./base",
        "dtype": "float32",
        "models": [
            {"model": "./ft0", "parameters": {"weight": 0.6, "density": 0.5, "gamma": 0.1}},
            {"model": "./ft1", "parameters": {"weight": 0.4, "density": 0.7, "gamma": 0.05}},
            {"model": "./ft2", "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "parameters": {"normalize": True},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./base"}, {"model": "./ft0"}, {"model": "./ft1"}, {"model": "./ft2"}],
    },
    "model_stock_rows": {
        "merge_method": "model_stock",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./ft0"}, {"model": "./ft1"}],
        "parameters": {"filter_wise": True},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./base"}, {"model": "./other"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.3}]},
    },
}
SOUPKIT_EXTRA = {"breadcrumbs_ties": {"convention": "mergekit"}}


@pytest.fixture(scope="module")
def outputs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("mk_methods")
    g = torch.Generator().manual_seed(0)
    shapes = _shapes()
    base = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    shared = {
        k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()
    }  # a common direction: cos > 0
    _write(root / "base", base)
    for i in range(3):
        _write(
            root / f"ft{i}",
            {
                k: base[k] + shared[k] + 0.03 * torch.randn(s, generator=g)
                for k, s in shapes.items()
            },
        )
    _write(root / "other", {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()})
    return merge_both(root, RECIPES, SOUPKIT_EXTRA)


def merge_both(
    root: Path,
    recipes: dict[str, dict[str, Any]],
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Write each recipe to ``root/NAME.yaml``, merge it with mergekit (one subprocess) and with
    soupkit (plus ``extra[NAME]`` parameters), from ``root``; (soupkit's, mergekit's) tensors."""
    jobs = []
    for name, recipe in recipes.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        jobs.append([str(root / f"{name}.yaml"), str(root / f"mk_{name}")])
    proc = subprocess.run(
        [str(MERGEKIT_PY), "-c", RUNNER, json.dumps(jobs)],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for name, recipe in recipes.items():
        mine = dict(recipe)
        mine["parameters"] = {**recipe.get("parameters", {}), **(extra or {}).get(name, {})}
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            soupkit.merge(mine, root / f"sk_{name}", progress=False, hash_inputs=False)
        out[name] = (
            load_file(str(root / f"sk_{name}" / "model.safetensors")),
            load_file(str(root / f"mk_{name}" / "model.safetensors")),
        )
    return out


@pytest.mark.parametrize(
    "name", ["breadcrumbs", "breadcrumbs_ties", "model_stock", "model_stock_rows"]
)
def test_bit_identical_to_mergekit(
    outputs: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], name: str
) -> None:
    sk, mk = outputs[name]
    assert sk.keys() == mk.keys()
    assert [k for k in sk if not torch.equal(sk[k], mk[k])] == []


def test_slerp_agrees_with_mergekit_to_float32_rounding(
    outputs: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
) -> None:
    # soupkit accumulates the dot product in float64, mergekit in float32
    sk, mk = outputs["slerp"]
    for k in sk:
        torch.testing.assert_close(sk[k], mk[k], rtol=2e-6, atol=1e-7)
