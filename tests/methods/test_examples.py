"""Every examples/*.yaml: documents its command, validates against the registry, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import soupkit
from soupkit import methods

from .helpers import base_state, finetunes, write

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_are_examples_for_the_methods() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"ties", "dare_ties", "task_arithmetic", "slerp", "model_stock", "wise_ft"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_opens_with_its_command_and_validates(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# soupkit "), f"{path.name} must open with the exact command"
    assert f"examples/{path.name}" in first
    cfg = soupkit.load_recipe(path)
    if cfg.merge_method not in methods.REGISTRY:
        return  # handled outside the registry (e.g. mergekit passthrough slices)
    spec = methods.get(cfg.merge_method)
    known = set(spec.per_model_names) | set(spec.global_names)
    assert set(cfg.parameters) <= known, f"{path.name}: unknown {set(cfg.parameters) - known}"
    for m in cfg.models or []:
        assert set(m.parameters) <= set(spec.per_model_names), f"{path.name}: {m.model}"
    if spec.needs_base:
        assert cfg.base_model, f"{path.name}: {spec.name} needs base_model"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_on_tiny_models(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = soupkit.load_recipe(path)
    if cfg.merge_method not in methods.REGISTRY or not cfg.models:
        pytest.skip("not a registry method over `models:`")
    monkeypatch.chdir(tmp_path)
    base = base_state(3, torch.bfloat16)
    refs = list(
        dict.fromkeys(([cfg.base_model] if cfg.base_model else []) + [m.model for m in cfg.models])
    )
    states = [base] + finetunes(base, len(refs) - 1, scale=0.3)
    for ref, state in zip(refs, states):
        write(tmp_path / ref, state)
    r = soupkit.merge(path, tmp_path / "out", progress=False, hash_inputs=False)
    out = load_file(str(r.out / "model.safetensors"))
    assert out.keys() == base.keys()
    assert all(torch.isfinite(v.float()).all() for v in out.values())
    assert (r.out / "config.json").is_file()
