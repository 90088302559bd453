"""The same recipe, run by the real mergekit 0.1.5 and by soupkit, gives the same model.

mergekit runs in its own venv (``benchmarks/.venv-mergekit``, made by
``benchmarks/setup_mergekit.sh``) through a subprocess, never inside soupkit's environment;
every recipe is merged in one mergekit process to pay its import time once. The tests are
skipped when that venv is absent.

soupkit's ``linear`` accumulates with mergekit's fused multiply-add (``Tensor.addcmul_``) and
resolves gradients outside the layers at ``t = 0`` as mergekit 0.1.5 does, so both are pinned
bit for bit here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

import soupkit

from .eco_helpers import MERGEKIT_PY, llama_state, write_llama

pytestmark = pytest.mark.skipif(
    not MERGEKIT_PY.is_file(),
    reason="the mergekit reference venv benchmarks/.venv-mergekit is absent "
    "(create it with `bash benchmarks/setup_mergekit.sh`)",
)

RUNNER = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out, tok in json.loads(sys.argv[1]):
    c = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(c, out, MergeOptions(copy_tokenizer=tok, lazy_unpickle=False, out_shard_size=10**12, quiet=True))
"""

POST = ("model.norm.weight", "lm_head.weight")


def _recipes() -> dict[str, dict[str, Any]]:
    three = ["./m0", "./m1", "./m2"]
    return {
        "linear_exact": {
            "merge_method": "linear",
            "dtype": "float32",
            "tokenizer_source": "./m0",
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in zip(three, [1.0, 2.0, 0.5])
            ],
        },
        "linear": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in zip(three, [0.3, 0.5, 0.2])
            ],
        },
        "linear_gradient": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": "./m0", "parameters": {"weight": [1.0, 4.0]}},
                {
                    "model": "./m1",
                    "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]},
                },
                {"model": "./m2"},
            ],
            "parameters": {"weight": 2.0},
        },
        "passthrough_slices": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": "./m0", "layer_range": [0, 3]}]},
                {
                    "sources": [
                        {
                            "model": "./m1",
                            "layer_range": [1, 4],
                            "parameters": {
                                "scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]
                            },
                        }
                    ]
                },
            ],
        },
        "linear_slices": {
            "merge_method": "linear",
            "dtype": "float32",
            "parameters": {"weight": 1.0},
            "slices": [
                {
                    "sources": [
                        {"model": "./m0", "layer_range": [0, 2], "parameters": {"weight": 2.0}},
                        {"model": "./m1", "layer_range": [0, 2]},
                    ]
                },
                {
                    "sources": [
                        {"model": "./m1", "layer_range": [2, 4]},
                        {
                            "model": "./m2",
                            "layer_range": [1, 3],
                            "parameters": {"weight": [1.0, 4.0]},
                        },
                    ]
                },
            ],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": "./m0",
            "dtype": "float32",
            "tokenizer_source": "base",
            "models": [
                {"model": "./m1", "parameters": {"weight": 0.5}},
                {"model": "./m2", "parameters": {"weight": 0.3}},
            ],
        },
        "ties": {
            "merge_method": "ties",
            "base_model": "./m0",
            "dtype": "float32",
            "parameters": {"normalize": True},
            "models": [
                {"model": "./m1", "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": "./m2", "parameters": {"weight": 0.3, "density": 0.7}},
            ],
        },
    }


# soupkit-only switches that make a recipe mean what it means in mergekit (docs/mergekit.md)
SOUPKIT_EXTRA = {"ties": {"convention": "mergekit"}}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("mk")
    base = llama_state(0)
    write_llama(root / "m0", base, tokenizer=True)
    for i in (1, 2):  # fine-tunes of m0, so that the task-vector methods are meaningful
        # mergekit's tokenizer_source loads every input's tokenizer to align the vocabularies
        write_llama(root / f"m{i}", llama_state(i, base=base), tokenizer=True)
    jobs = []
    for name, recipe in _recipes().items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        jobs.append(
            [str(root / f"{name}.yaml"), str(root / f"mk_{name}"), "tokenizer_source" in recipe]
        )
    proc = subprocess.run(
        [str(MERGEKIT_PY), "-c", RUNNER, json.dumps(jobs)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {}
    for name, recipe in _recipes().items():
        mine = dict(recipe)
        if name in SOUPKIT_EXTRA:
            mine["parameters"] = {**mine.get("parameters", {}), **SOUPKIT_EXTRA[name]}
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)  # recipes name models relative to the current directory, as in mergekit
            soupkit.merge(mine, root / f"sk_{name}", progress=False)
        out[name] = (root / f"sk_{name}", root / f"mk_{name}")
    return out


def _states(pair: tuple[Path, Path]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    sk, mk = pair
    return load_file(str(sk / "model.safetensors")), load_file(str(mk / "model.safetensors"))


def _bit_equal(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: tuple[str, ...] = ()
) -> list[str]:
    assert set(a) == set(b)
    return [
        k for k in a if k not in skip and not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]))
    ]


@pytest.mark.parametrize(
    "name", ["linear_exact", "passthrough_slices", "linear_slices", "task_arithmetic", "ties"]
)
def test_bit_identical_to_mergekit(outputs: dict[str, tuple[Path, Path]], name: str) -> None:
    a, b = _states(outputs[name])
    assert _bit_equal(a, b) == []


def test_sliced_config_and_tokenizer_match_mergekit(outputs: dict[str, tuple[Path, Path]]) -> None:
    sk, mk = outputs["passthrough_slices"]
    for d in (sk, mk):
        assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 6
    a, _ = _states(outputs["passthrough_slices"])
    assert not a[
        "model.layers.3.self_attn.o_proj.weight"
    ].any()  # scale 0 by filter, as in mergekit
    for name in ("linear_exact", "task_arithmetic"):  # tokenizer_source: a path / base
        sk, mk = outputs[name]
        vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (sk, mk)]
        assert vocab[0] == vocab[1] and len(vocab[0]) == 64


def test_gradients_and_filters_match_mergekit_inside_the_layers(
    outputs: dict[str, tuple[Path, Path]],
) -> None:
    a, b = _states(outputs["linear_gradient"])
    assert _bit_equal(a, b, skip=POST) == []


def test_gradients_after_the_last_layer_match_mergekit(
    outputs: dict[str, tuple[Path, Path]],
) -> None:
    a, b = _states(outputs["linear_gradient"])
    assert _bit_equal(a, b) == []


def test_linear_with_arbitrary_weights_is_within_one_rounding(
    outputs: dict[str, tuple[Path, Path]],
) -> None:
    a, b = _states(outputs["linear"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=3e-7, atol=1e-9)


def test_linear_with_arbitrary_weights_is_bit_identical(
    outputs: dict[str, tuple[Path, Path]],
) -> None:
    a, b = _states(outputs["linear"])
    assert _bit_equal(a, b) == []
