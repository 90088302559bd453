"""The best recipe `soupkit optimize` writes runs unchanged in the real mergekit 0.1.5 (per-layer
weight gradients of a ``linear`` merge), and gives soupkit's model up to float rounding (as any
``linear`` recipe with arbitrary weights does, see test_mergekit_reference.py)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .eco_helpers import MERGEKIT_PY, llama_state, write_llama
from .test_mergekit_reference import RUNNER

pytestmark = pytest.mark.skipif(
    not MERGEKIT_PY.is_file(), reason="the mergekit reference venv is absent"
)
pytest.importorskip("optuna", reason="needs the optimize extra")

TARGET = llama_state(9)


def closeness(state: Mapping[str, torch.Tensor]) -> float:
    """Higher when the merge is nearer a fixed target (a plain evaluator)."""
    return -sum(float((state[k].float() - TARGET[k]).pow(2).sum()) for k in TARGET)


def test_best_recipe_runs_in_mergekit(tmp_path: Path) -> None:
    from soupkit.search.recipe_search import optimize

    paths = [write_llama(tmp_path / f"m{i}", llama_state(i), tokenizer=(i == 0)) for i in range(3)]
    space = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": str(p), "parameters": {"weight": {"min": 0.1, "max": 1, "points": 4}}}
            for p in paths
        ],
    }
    r = optimize(space, closeness, tmp_path / "opt", trials=4, progress=False, plot=False)
    assert r.model is not None
    proc = subprocess.run(
        [
            str(MERGEKIT_PY),
            "-c",
            RUNNER,
            json.dumps([[str(tmp_path / "opt" / "best-recipe.yaml"), str(tmp_path / "mk"), False]]),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine, theirs = (
        load_file(str(r.model / "model.safetensors")),
        load_file(str(tmp_path / "mk" / "model.safetensors")),
    )
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.allclose(mine[k], theirs[k], rtol=1e-6, atol=1e-7), k
