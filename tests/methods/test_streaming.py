"""Every method: streamed file merge (tiny chunks) == in-memory merge == the pure function, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import soupkit
from soupkit import methods

from .helpers import base_state, bits_equal, direct, finetunes, write

CASES: dict[str, tuple[int, dict[str, Any], list[dict[str, Any]]]] = {
    # method: (number of models, global parameters, per-model parameters)
    "linear": (3, {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}]),
    "wise_ft": (1, {"alpha": [0.2, 0.9]}, [{}]),
    "task_arithmetic": (3, {"lambda": 0.7}, [{"weight": 1.0}, {"weight": -0.5}, {"weight": 0.25}]),
    "ties": (
        3,
        {"density": 0.4, "trim_scope": "per_tensor", "lambda": 1.3},
        [
            {"weight": 1.0},
            {"weight": 0.6},
            {"weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]},
        ],
    ),
    "dare_linear": (3, {"density": 0.6}, [{}, {"weight": 0.5}, {"density": 0.3}]),
    "dare_ties": (3, {"density": 0.6, "convention": "mergekit"}, [{}, {"weight": 0.5}, {}]),
    "breadcrumbs": (3, {"density": 0.7, "gamma": 0.05}, [{}, {}, {"gamma": 0.2}]),
    "breadcrumbs_ties": (3, {"density": 0.7, "gamma": 0.05}, [{}, {}, {}]),
    "della": (3, {"density": 0.6, "epsilon": 0.2}, [{}, {}, {}]),
    "della_linear": (3, {"density": 0.6, "epsilon": 0.2, "rescale": "l1"}, [{}, {}, {}]),
    "slerp": (1, {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.4}]}, [{}]),
    "model_stock": (3, {"filter_wise": True}, [{}, {}, {}]),
    "nuslerp": (
        2,
        {"nuslerp_flatten": [{"filter": "mlp", "value": False}, {"value": True}]},
        [{"weight": 0.3}, {"weight": 0.7}],
    ),
    "multislerp": (3, {}, [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}]),
    "karcher": (2, {"max_iter": 5}, [{}, {}]),
    "sce": (3, {"select_topk": 0.5}, [{}, {}, {}]),
    "arcee_fusion": (1, {}, [{}]),
    "nearswap": (1, {"t": 0.3}, [{}]),
    "ram": (3, {"epsilon": 0.2}, [{}, {}, {}]),
    "passthrough": (1, {}, [{"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}]),
    "ramplus_tl": (3, {"epsilon": 0.2, "r": 0.5}, [{}, {}, {}]),
}


def case(
    method: str,
    tmp_path: Path,
    base: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, Any]]:
    """The base, the fine-tunes (written under tmp_path) and the recipe of ``CASES[method]``."""
    n, parameters, per_model = CASES[method]
    fts = finetunes(base, n, scale=0.5)
    base_dir = write(tmp_path / "base", base)
    dirs = [write(tmp_path / f"ft{i}", s) for i, s in enumerate(fts)]
    recipe: dict[str, Any] = {
        "merge_method": method,
        "seed": 5,
        "parameters": parameters,
        "models": [{"model": str(d), "parameters": p} for d, p in zip(dirs, per_model)],
    }
    spec = methods.get(method)
    if spec.needs_base or spec.optional_base or spec.base_as_input:  # a base whenever one is taken
        recipe["base_model"] = str(base_dir)
    return base, fts, recipe


def test_every_registered_method_is_covered() -> None:
    assert {s.name for s in methods.all_methods()} == set(CASES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(CASES))
def test_stream_equals_memory_equals_pure_function(
    method: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    _, parameters, per_model = CASES[method]
    base, fts, recipe = case(method, tmp_path, base_state(1, dtype))
    streamed = soupkit.merge(
        recipe, tmp_path / "out", progress=False, chunk_elems=7, hash_inputs=False
    )
    from_file = load_file(str(streamed.out / "model.safetensors"))
    memory = soupkit.merge_state_dicts(
        fts,
        method,
        base=base if "base_model" in recipe else None,
        parameters=parameters,
        model_parameters=per_model,
        seed=5,
    )
    assert from_file.keys() == memory.keys()
    for name in memory:
        assert bits_equal(from_file[name], memory[name]), name
    for job in streamed.plan.jobs:
        if job.is_copy:
            assert torch.equal(from_file[job.name], base[job.name])
            continue
        want = direct(method, fts, base, job.params, job.name, seed=5).to(dtype)
        assert bits_equal(from_file[job.name], want), job.name


def test_global_ties_streams_like_memory(tmp_path: Path) -> None:
    base = base_state(2, torch.bfloat16)
    fts = finetunes(base, 3, scale=0.5)
    base_dir = write(tmp_path / "base", base)
    dirs = [write(tmp_path / f"ft{i}", s) for i, s in enumerate(fts)]
    recipe = {
        "merge_method": "ties",
        "base_model": str(base_dir),
        "parameters": {"density": 0.2},
        "models": [{"model": str(d)} for d in dirs],
    }
    streamed = soupkit.merge(
        recipe, tmp_path / "out", progress=False, chunk_elems=7, hash_inputs=False
    )
    from_file = load_file(str(streamed.out / "model.safetensors"))
    memory = soupkit.merge_state_dicts(fts, "ties", base=base, parameters={"density": 0.2})
    assert all(bits_equal(from_file[k], memory[k]) for k in memory)


ELEMENTWISE = ["linear", "wise_ft", "task_arithmetic", "dare_linear", "dare_ties", "ties"]


@pytest.mark.parametrize("method", ELEMENTWISE)
def test_bytes_do_not_depend_on_compute_threads(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny pieces and RNG blocks, so that every unit is shared between the compute threads."""
    from soupkit.engine import execute

    monkeypatch.setattr(execute, "COMPUTE_ELEMS", 5)
    monkeypatch.setattr(execute, "RNG_BLOCK", 8)
    spec = methods.get(method)
    base, fts, recipe = case(method, tmp_path, base_state(3, torch.bfloat16))
    p = soupkit.plan(recipe, chunk_elems=40)
    runs = {}
    for threads in (1, 2, 3):
        sink = execute.MemorySink(p)
        execute.run_plan(p, sink, compute_threads=threads)
        runs[threads] = sink.tensors
    for name in runs[1]:
        assert bits_equal(runs[2][name], runs[1][name]) and bits_equal(
            runs[3][name], runs[1][name]
        ), name
    if not spec.stochastic:  # the block size does not matter to these: the pure function decides
        for job in p.jobs:
            if not job.is_copy:
                want = direct(method, fts, base, job.params, job.name, seed=5).to(torch.bfloat16)
                assert bits_equal(runs[2][job.name], want), job.name


def test_error_in_a_helper_thread_reaches_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from soupkit.engine import execute
    from soupkit.errors import NonFiniteError

    monkeypatch.setattr(execute, "COMPUTE_ELEMS", 5)
    base = base_state(4)
    fts = finetunes(base, 2)
    fts[1]["model.embed_tokens.weight"][-1, -1] = float("nan")  # last piece: a helper's share
    dirs = [write(tmp_path / f"ft{i}", s) for i, s in enumerate(fts)]
    p = soupkit.plan(
        {"merge_method": "linear", "models": [{"model": str(d)} for d in dirs]}, chunk_elems=1000
    )
    before = threading.active_count()
    with pytest.raises(
        NonFiniteError, match=r"(?s)model\.embed_tokens\.weight.*elements 65\.\.66.*ft1 holds 1 NaN"
    ):
        execute.run_plan(p, execute.MemorySink(p), compute_threads=2)
    assert threading.active_count() == before


@pytest.mark.parametrize("method", ["linear", "wise_ft", "task_arithmetic"])
def test_pieces_read_by_the_compute_threads_give_the_same_bytes(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cheap elementwise methods read their pieces on the compute threads (lazy units); the
    bytes equal those of units read ahead by the reader thread, at any thread count, and a
    run of several plans still reads each unit once, for all of them."""
    from soupkit.engine import execute

    monkeypatch.setattr(execute, "COMPUTE_ELEMS", 5)
    _, _, recipe = case(method, tmp_path, base_state(5, torch.bfloat16))
    p = soupkit.plan(recipe, chunk_elems=40)
    pieces = {"n": 0}
    real_read_piece = execute._Engine._read_piece

    def counting(self: Any, *a: Any) -> Any:
        pieces["n"] += 1
        return real_read_piece(self, *a)

    monkeypatch.setattr(execute._Engine, "_read_piece", counting)
    runs = {}
    for threads in (1, 2):
        sink = execute.MemorySink(p)
        execute.run_plan(p, sink, compute_threads=threads)
        runs[threads] = sink.tensors
    assert pieces["n"] > 0
    pieces["n"] = 0
    two = [execute.MemorySink(p), execute.MemorySink(p)]
    execute.run_plans([p, p], two)
    assert pieces["n"] == 0  # shared units, read by the reader thread
    monkeypatch.setattr(execute._Engine, "_lazy", lambda self, infos, active: False)
    ahead = execute.MemorySink(p)
    execute.run_plan(p, ahead)
    for name, want in ahead.tensors.items():
        assert all(
            bits_equal(r[name], want) for r in (runs[1], runs[2], two[0].tensors, two[1].tensors)
        ), name
