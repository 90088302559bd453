"""mergekit 0.1.5's other methods against mergekit itself, bit for bit.

Function level: the same tensors in float32, bfloat16 and float16 go through soupkit's method
function (`MethodSpec.call`, in the dtype given, as the exact mode runs it) and through
mergekit's own ``merge_tensors`` (in the mergekit venv, in a subprocess); the results must have
the same dtype and the same bytes. Recipe level: whole float32 merges of small stand-in models
through both tools (`soupkit.merge` and mergekit's ``run_merge``) give identical tensors.
Skipped when the mergekit venv (benchmarks/.venv-mergekit) is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupkit
from soupkit import methods

from .helpers import bits_equal
from .test_mergekit_methods import MERGEKIT_PY, _shapes, _write, merge_both

pytestmark = pytest.mark.skipif(
    not MERGEKIT_PY.is_file(),
    reason="the mergekit reference venv benchmarks/.venv-mergekit is absent",
)

FUNCTION_RUNNER = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from mergekit.merge_methods.api import merge_tensors
inputs = load_file(sys.argv[1])
out = {}
for case in json.loads(sys.argv[2]):
    tensors = [inputs[k] for k in case["inputs"]]
    out[case["id"]] = merge_tensors(tensors, case["method"], parameters=case["parameters"],
                                    base_index=case["base_index"]).contiguous()
save_file(out, sys.argv[3])
"""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {
    "mat": (24, 16),
    "vec": (40,),
    "steps": (16, 12),
}  # steps: updates of a few sizes, many ties

# (case name, method, number of models, with base, global parameters, per-model parameters)
CASES: list[tuple[str, str, int, bool, dict[str, Any], dict[str, list[Any]]]] = [
    ("nuslerp", "nuslerp", 2, False, {}, {"weight": [0.3, 0.7]}),
    ("nuslerp_base", "nuslerp", 2, True, {}, {"weight": [0.6, 0.4]}),
    ("nuslerp_rows", "nuslerp", 2, True, {"nuslerp_flatten": False}, {"weight": [0.5, 0.5]}),
    (
        "nuslerp_cols",
        "nuslerp",
        2,
        False,
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        {"weight": [1.0, 3.0]},
    ),
    ("nuslerp_zero_total", "nuslerp", 2, True, {}, {"weight": [1.0, -1.0]}),
    ("multislerp", "multislerp", 3, False, {}, {"weight": [1.0, 0.5, 0.8]}),
    ("multislerp_base", "multislerp", 3, True, {}, {"weight": [0.2, 0.3, 0.5]}),
    (
        "multislerp_raw",
        "multislerp",
        2,
        True,
        {"normalize_weights": False, "eps": 1e-6},
        {"weight": [0.7, 0.6]},
    ),
    ("multislerp_one", "multislerp", 1, True, {}, {"weight": [2.0]}),
    ("karcher", "karcher", 3, False, {}, {}),
    ("karcher_base", "karcher", 3, True, {"max_iter": 4, "tol": 1e-4}, {}),
    ("sce", "sce", 3, True, {}, {}),
    ("sce_topk", "sce", 3, True, {"select_topk": 0.4}, {}),
    ("sce_topk_int8", "sce", 2, True, {"select_topk": 0.7, "int8_mask": True}, {}),
    ("arcee_fusion", "arcee_fusion", 1, True, {}, {}),
    ("nearswap", "nearswap", 1, True, {"t": 0.02}, {}),
    ("nearswap_wide", "nearswap", 1, True, {"t": 0.5}, {}),
    ("ram", "ram", 3, True, {}, {}),
    ("ram_eps", "ram", 2, True, {"epsilon": 0.01}, {}),
    ("ramplus_tl", "ramplus_tl", 3, True, {}, {}),
    ("ramplus_tl_strong", "ramplus_tl", 3, True, {"r": 0.5, "alpha": 1.0, "epsilon": 0.005}, {}),
]


def _stand_ins() -> dict[str, torch.Tensor]:
    """A base and three fine-tunes per shape, float32: sparse, partly overlapping updates (so
    RAM's unique / shared split and SCE's sign vote both matter) of mixed size (so NearSwap
    takes some entries whole and damps others)."""
    g = torch.Generator().manual_seed(13)
    out: dict[str, torch.Tensor] = {}
    for s, shape in SHAPES.items():
        base = torch.randn(shape, generator=g) * 0.2
        if s == "steps":  # exact in every dtype, so the ties survive the cast
            base = 0.25 * torch.randint(-4, 5, shape, generator=g).float()
        out[f"{s}.base"] = base
        for i in range(3):
            if (
                s == "steps"
            ):  # multiples of 1/8: equal variances across many entries (SCE's top-k ties)
                out[f"{s}.ft{i}"] = base + 0.125 * torch.randint(-2, 3, shape, generator=g)
                continue
            keep = torch.rand(shape, generator=g) < 0.6
            step = torch.randn(shape, generator=g) * torch.where(
                torch.rand(shape, generator=g) < 0.5, 0.01, 0.1
            )
            out[f"{s}.ft{i}"] = base + 0.3 * step.sign() * step.abs() * keep + 0.02 * (i - 1) * keep
    return out


def _inputs(
    case: tuple[str, str, int, bool, dict[str, Any], dict[str, list[Any]]], shape: str
) -> tuple[list[str], int | None]:
    """mergekit's input list (the base after the models, as mergekit's planner appends it)."""
    _, _, n, with_base, _, _ = case
    keys = [f"{shape}.ft{i}" for i in range(n)]
    if with_base:
        return keys + [f"{shape}.base"], n
    return keys, None


@pytest.fixture(scope="module")
def mergekit_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("mk_more")
    data = _stand_ins()
    inputs = {f"{dt}/{k}": v.to(d) for dt, d in DTYPES.items() for k, v in data.items()}
    save_file(inputs, str(root / "inputs.safetensors"))
    jobs = []
    for case in CASES:
        for dt in DTYPES:
            for shape in SHAPES:
                keys, base_index = _inputs(case, shape)
                params: dict[str, Any] = {**case[4], **case[5]}
                jobs.append(
                    {
                        "id": f"{case[0]}/{dt}/{shape}",
                        "method": case[1],
                        "parameters": params,
                        "inputs": [f"{dt}/{k}" for k in keys],
                        "base_index": base_index,
                    }
                )
    proc = subprocess.run(
        [
            str(MERGEKIT_PY),
            "-c",
            FUNCTION_RUNNER,
            str(root / "inputs.safetensors"),
            json.dumps(jobs),
            str(root / "out.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inputs, load_file(str(root / "out.safetensors"))


def _soupkit(
    case: tuple[str, str, int, bool, dict[str, Any], dict[str, list[Any]]],
    inputs: dict[str, torch.Tensor],
    dt: str,
    shape: str,
) -> torch.Tensor:
    _, method, _, _, glob, per_model = case
    spec = methods.get(method)
    keys, base_index = _inputs(case, shape)
    xs = [inputs[f"{dt}/{k}"].clone() for k in keys]
    p = spec.params.model_validate({**glob, **{k: tuple(v) for k, v in per_model.items()}})
    if spec.base_as_input:  # karcher: the base is one more input, in mergekit's order
        return spec.call(xs, p)
    base = xs.pop() if base_index is not None else None
    rng = torch.Generator().manual_seed(0) if spec.stochastic else None
    return spec.call(xs, p, base=base, rng=rng)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dt", sorted(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_function_bit_identical_to_mergekit(
    case: tuple[str, str, int, bool, dict[str, Any], dict[str, list[Any]]],
    dt: str,
    shape: str,
    mergekit_results: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
) -> None:
    inputs, theirs = mergekit_results
    want = theirs[f"{case[0]}/{dt}/{shape}"]
    got = _soupkit(case, inputs, dt, shape)
    assert got.dtype == want.dtype
    assert bits_equal(got.contiguous(), want), (got - want).abs().max()


def test_stand_ins_exercise_the_branches() -> None:
    """The inputs above are not degenerate: RAM sees unique and shared entries, SCE's top-k
    sees equal bfloat16 variances, NearSwap both takes and damps."""
    data = _stand_ins()
    tv = torch.stack([data[f"mat.ft{i}"] - data["mat.base"] for i in range(3)])
    counts = (tv.abs() > 1e-5).sum(0)
    assert (counts == 1).any() and (counts > 1).any() and (counts == 0).any()
    var = torch.var(tv.bfloat16(), dim=0, unbiased=False).abs().flatten()
    assert var.unique().numel() < var.numel()
    d = tv[0].abs()
    assert (d <= 0.02).any() and (d > 0.02).any()
    # in "steps", the 40 % cut of SCE's variance ranking falls inside a run of equal variances
    for dtype in DTYPES.values():
        steps = torch.stack(
            [(data[f"steps.ft{i}"] - data["steps.base"]).to(dtype) for i in range(3)]
        )
        var = torch.var(steps, dim=0, unbiased=False).flatten()
        k = int(torch.count_nonzero(var) * 0.4)
        kth = var.sort(descending=True).values[k - 1]
        assert int((var > kth).sum()) < k < int((var >= kth).sum())


# Whole recipes, float32, through both tools.
RECIPES: dict[str, dict[str, Any]] = {
    "nuslerp": {
        "merge_method": "nuslerp",
        "base_model": "./base",
        "dtype": "float32",
        "models": [
            {"model": "./ft0", "parameters": {"weight": 0.4}},
            {"model": "./ft1", "parameters": {"weight": 0.6}},
        ],
        "parameters": {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}]},
    },
    "nuslerp_nobase": {
        "merge_method": "nuslerp",
        "dtype": "float32",
        "models": [
            {"model": "./ft0", "parameters": {"weight": [0.2, 0.8]}},
            {"model": "./ft2", "parameters": {"weight": 1.0}},
        ],
    },
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": "./base",
        "dtype": "float32",
        "models": [
            {"model": "./ft0", "parameters": {"weight": 1.0}},
            {"model": "./ft1", "parameters": {"weight": 0.5}},
            {"model": "./ft2", "parameters": {"weight": 0.7}},
        ],
    },
    "nuslerp_slices": {
        "merge_method": "nuslerp",
        "base_model": "./base",
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": "./ft0", "layer_range": [0, 3], "parameters": {"weight": 0.3}},
                    {"model": "./base", "layer_range": [0, 3]},
                    {"model": "./ft1", "layer_range": [0, 3], "parameters": {"weight": 0.7}},
                ]
            }
        ],
    },
    "karcher_slices": {
        "merge_method": "karcher",
        "base_model": "./base",
        "dtype": "float32",
        "slices": [
            {
                "sources": [
                    {"model": "./ft0", "layer_range": [0, 2]},
                    {"model": "./ft2", "layer_range": [0, 2]},
                    {"model": "./base", "layer_range": [0, 2]},
                ]
            },
            {
                "sources": [
                    {"model": "./ft1", "layer_range": [2, 3]},
                    {"model": "./base", "layer_range": [2, 3]},
                ]
            },
        ],
    },
    "karcher": {
        "merge_method": "karcher",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./ft0"}, {"model": "./ft1"}, {"model": "./ft2"}],
    },
    "karcher_listed": {
        "merge_method": "karcher",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./ft0"}, {"model": "./base"}, {"model": "./ft2"}],
        "parameters": {"max_iter": 20},
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./ft0"}, {"model": "./ft1"}, {"model": "./ft2"}],
        "parameters": {"select_topk": [{"filter": "self_attn", "value": 0.3}, {"value": 0.8}]},
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./base"}, {"model": "./ft1"}],
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./base"}, {"model": "./ft0"}],
        "parameters": {"t": 0.03},
    },
    "ram": {
        "merge_method": "ram",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./ft0"}, {"model": "./ft1"}, {"model": "./ft2"}],
        "parameters": {"epsilon": 0.02},
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "./base",
        "dtype": "float32",
        "models": [{"model": "./ft0"}, {"model": "./ft1"}, {"model": "./ft2"}],
        "parameters": {"epsilon": 0.02, "r": 0.3},
    },
}


@pytest.fixture(scope="module")
def recipe_outputs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("mk_more_recipes")
    g = torch.Generator().manual_seed(1)
    shapes = _shapes()
    base = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    _write(root / "base", base)
    for i in range(3):
        # sparse updates of two sizes: RAM's epsilon and NearSwap's t fall between them
        _write(
            root / f"ft{i}",
            {
                k: base[k]
                + torch.randn(s, generator=g)
                * (torch.rand(s, generator=g) < 0.5)
                * torch.where(torch.rand(s, generator=g) < 0.5, 0.01, 0.05)
                for k, s in shapes.items()
            },
        )
    return merge_both(root, RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_bit_identical_to_mergekit(
    recipe_outputs: dict[str, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], name: str
) -> None:
    sk, mk = recipe_outputs[name]
    assert sk.keys() == mk.keys()
    assert [k for k in sk if not bits_equal(sk[k], mk[k])] == []


def test_mergekit_writes_float32_for_methods_that_promote(tmp_path: Path) -> None:
    """arcee_fusion and ramplus_tl return float32 for bfloat16 inputs (a float32 mask / scale);
    with no ``out_dtype`` mergekit 0.1.5 writes that float32 tensor while config.json says
    bfloat16. soupkit writes ``dtype``, and in exact mode mergekit's float32 (docs/mergekit.md,
    "Output dtype")."""
    g = torch.Generator().manual_seed(2)
    shapes = _shapes()
    base = {k: (torch.randn(s, generator=g) * 0.2).bfloat16() for k, s in shapes.items()}
    ft = {
        k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).bfloat16()
        for k, v in base.items()
    }
    _write(tmp_path / "base", base)
    _write(tmp_path / "ft", ft)
    recipes = {
        m: {
            "merge_method": m,
            "base_model": "./base",
            "dtype": "bfloat16",
            "models": [{"model": "./ft"}],
        }
        for m in ("arcee_fusion", "ramplus_tl")
    }
    for name, (ours, theirs) in merge_both(tmp_path, recipes).items():
        assert {v.dtype for v in theirs.values()} == {torch.float32}
        config = json.loads((tmp_path / f"mk_{name}" / "config.json").read_text())
        assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"
        assert {v.dtype for v in ours.values()} == {torch.bfloat16}
        # exact mode writes what mergekit writes: its float32 tensors, bit for bit, and says so
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            soupkit.merge(
                {**recipes[name], "compute": "exact"},
                tmp_path / f"exact_{name}",
                progress=False,
                hash_inputs=False,
            )
        exact = load_file(str(tmp_path / f"exact_{name}" / "model.safetensors"))
        assert exact.keys() == theirs.keys()
        assert all(
            exact[k].dtype == torch.float32 and bits_equal(exact[k], theirs[k]) for k in theirs
        )
        ours_config = json.loads((tmp_path / f"exact_{name}" / "config.json").read_text())
        assert ours_config["torch_dtype"] == "float32"
