"""passthrough is a registered method (`soupkit methods` lists it) that recipes still plan as
mergekit does: ``models:`` are stacked like one slice each. Bit-identity with mergekit on
slices is in test_mergekit_reference.py and the recipe corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import soupkit
from soupkit import methods
from soupkit.cli import main
from soupkit.errors import ConfigError
from soupkit.methods.passthrough import PassthroughParams, passthrough
from soupkit.planning import slices

from .eco_helpers import llama_state, write_llama


def test_hand_examples_in_the_dtype_given() -> None:
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)
    assert torch.equal(passthrough([x], PassthroughParams(scale=(None,))), x)
    half = passthrough([x], PassthroughParams(scale=(0.5,)))
    assert half.dtype == torch.bfloat16
    assert half.tolist() == [0.5, -1.0, 0.25]
    assert passthrough([x], PassthroughParams(scale=(0.0,))).tolist() == [0.0, -0.0, 0.0]


def test_registered_listed_and_the_one_slices_use(capsys: pytest.CaptureFixture[str]) -> None:
    spec = methods.get("passthrough")
    assert spec is slices.PASSTHROUGH and spec.fn is passthrough
    assert (spec.kind, spec.min_models, spec.max_models) == ("tensors", 1, 1)
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert any(line.startswith("passthrough") for line in listing.splitlines())


def test_a_models_recipe_is_planned_as_one_slice(tmp_path: Path) -> None:
    # as before registration: the slice planner, which keeps mergekit's tensor order
    a = write_llama(tmp_path / "a", llama_state(1, layers=2))
    p = soupkit.plan({"merge_method": "passthrough", "models": [{"model": str(a)}]})
    assert f"slice 0: output layers 0..1 <- {a} layers 0..1" in p.notes
    names = [j.name for j in p.jobs]
    assert names[0] == "model.embed_tokens.weight"
    assert names.index("lm_head.weight") > names.index("model.layers.1.mlp.up_proj.weight")


def test_parameters_are_checked_against_passthrough(tmp_path: Path) -> None:
    a = write_llama(tmp_path / "a", llama_state(1, layers=1))
    recipe = {"merge_method": "passthrough", "models": [{"model": str(a)}]}
    p = soupkit.plan({**recipe, "parameters": {"density": 0.5}})
    assert "parameter 'density' is ignored: 'passthrough' does not use it" in " ".join(p.notes)
    with pytest.raises(ConfigError, match="scal"):
        soupkit.plan({**recipe, "parameters": {"scal": 0.5}})
