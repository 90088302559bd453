"""Per-tensor parameters: mergekit's filter / gradient semantics, plus soupkit's glob `match`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import soupkit
from soupkit.recipe.params import LayerIndex, first_match, resolve_chain, resolve_value
from soupkit.recipe.schema import Conditional, load_recipe

from .helpers import SHAPES, base_state, finetunes


def mergekit_evaluate_setting(tensor_name: str, setting: Any, t: float = 0) -> Any:
    """mergekit/config.py ``evaluate_setting`` (transcribed for numeric settings)."""
    if isinstance(setting, (float, int, bool, str)):
        return setting
    if isinstance(setting, list):
        if all(isinstance(e, (int, float)) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if (
                cond.filter is None
                or cond.filter == "*"
                or (tensor_name and cond.filter in tensor_name)
            ):
                return mergekit_evaluate_setting(tensor_name, cond.value, t)
    return None


numbers = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(numbers, min_size=1, max_size=9), t=st.floats(0, 1))
def test_gradients_interpolate_exactly_as_mergekit(values: list[float], t: float) -> None:
    assert resolve_value(values, "x", t) == mergekit_evaluate_setting("x", values, t)


@settings(max_examples=100, deadline=None)
@given(
    filters=st.lists(
        st.sampled_from(["mlp", "attn", "layers.1", "*", "", "nothere", None]),
        min_size=1,
        max_size=5,
    ),
    name=st.sampled_from(sorted(SHAPES)),
    t=st.floats(0, 1),
)
def test_conditionals_first_match_wins_as_mergekit(
    filters: list[str | None], name: str, t: float
) -> None:
    conds = [Conditional(filter=f, value=[float(i), float(i + 10)]) for i, f in enumerate(filters)]
    assert resolve_value(conds, name, t) == mergekit_evaluate_setting(name, conds, t)


def test_layer_positions_follow_mergekit_planner() -> None:
    idx = LayerIndex.from_names(SHAPES)
    assert idx.n_layers == 2
    assert idx.t("model.layers.0.mlp.up_proj.weight") == 0.0
    assert idx.t("model.layers.1.mlp.up_proj.weight") == 1.0
    assert idx.t("model.embed_tokens.weight") == 0.0  # "pre" weight
    # mergekit 0.1.5 reads "post" weights (final norm, head) with its t = 0 reader too
    assert idx.t("model.norm.weight") == 0.0
    assert idx.t("lm_head.weight") == 0.0
    assert idx.t("embed_out.weight") == 0.0
    assert idx.t("transformer.wte.weight") == 0.0
    five = LayerIndex.from_names([f"transformer.h.{i}.attn.c_attn.weight" for i in range(5)])
    assert [five.t(f"transformer.h.{i}.attn.c_attn.weight") for i in range(5)] == [
        0,
        0.25,
        0.5,
        0.75,
        1,
    ]
    # mergekit's plan_slice uses t = 1 when a slice has a single layer
    one = LayerIndex.from_names(["model.layers.0.mlp.weight", "model.norm.weight"])
    assert one.t("model.layers.0.mlp.weight") == 1.0


def test_resolution_order_model_then_global_then_default() -> None:
    model_level = {"weight": [Conditional(filter="mlp", value=2.0)]}
    global_level = {"weight": [Conditional(filter="attn", value=3.0)], "lambda": 0.5}
    chain = (model_level, global_level)
    assert resolve_chain("weight", chain, "layers.0.mlp.w", 0) == 2.0
    assert resolve_chain("weight", chain, "layers.0.attn.w", 0) == 3.0  # falls through
    assert resolve_chain("weight", chain, "norm.w", 0) is None  # -> the method's default
    assert resolve_chain("lambda", chain, "norm.w", 0) == 0.5


def test_match_is_a_glob_over_the_whole_name_and_combines_with_filter() -> None:
    conds = [
        Conditional(match="model.layers.*.mlp.*", value=1.0),
        Conditional(match="*.weight", filter="q_proj", value=2.0),
        Conditional(value=3.0),
    ]
    assert resolve_value(conds, "model.layers.1.mlp.up_proj.weight", 0) == 1.0
    assert resolve_value(conds, "model.layers.1.self_attn.q_proj.weight", 0) == 2.0
    assert resolve_value(conds, "model.layers.1.self_attn.q_proj.bias", 0) == 3.0
    assert resolve_value(conds, "mlp", 0) == 3.0  # a glob must match the whole name
    assert first_match(conds, "model.layers.1.self_attn.q_proj.bias") == 2
    assert first_match(2.0, "x") is None


def _states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = base_state()
    return base, finetunes(base, 2)


def test_gradient_and_filters_reach_each_tensor_through_the_planner() -> None:
    base, fts = _states()
    weight = [{"filter": "mlp", "value": [1.0, 3.0]}, {"value": 0.5}]
    out = soupkit.merge_state_dicts(
        fts[:1], "task_arithmetic", base=base, model_parameters=[{"weight": weight}]
    )
    expected = {
        "model.layers.0.mlp.up_proj.weight": 1.0,
        "model.layers.1.mlp.up_proj.weight": 3.0,
        "model.layers.0.self_attn.q_proj.weight": 0.5,
        "model.embed_tokens.weight": 0.5,
        "lm_head.weight": 0.5,
    }
    for name, w in expected.items():
        want = base[name] + (fts[0][name] - base[name]) * torch.tensor(w)
        assert torch.equal(out[name], want), name
    assert torch.equal(out["model.position_ids"], base["model.position_ids"])


def test_global_parameter_gradient_across_layers() -> None:
    base, fts = _states()
    out = soupkit.merge_state_dicts(fts[:1], "wise_ft", base=base, parameters={"alpha": [0.0, 1.0]})
    assert torch.equal(
        out["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    assert torch.equal(
        out["model.layers.1.mlp.up_proj.weight"], fts[0]["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # t = 0
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])  # t = 0 too (mergekit 0.1.5)


def _plan(
    base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]], weight: Any
) -> soupkit.MergePlan:
    from soupkit.io.checkpoint import in_memory_checkpoint
    from soupkit.planning.plan import make_plan

    cfg = load_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": "b",
            "models": [{"model": "m0", "parameters": {"weight": weight}}],
        }
    )
    return make_plan(cfg, [in_memory_checkpoint(fts[0], "m0")], in_memory_checkpoint(base, "b"))


def test_filter_counts_only_the_merged_tensors_an_entry_decides() -> None:
    base, fts = _states()
    p = _plan(base, fts, [{"filter": "mlp", "value": 2.0}, {"match": "*.weight", "value": 1.5}])
    assert p.filter_counts == {
        "models[0].parameters.weight filter='mlp'": 2,
        "models[0].parameters.weight match='*.weight'": len(SHAPES) - 2,
    }


def test_shadowed_filter_is_an_error() -> None:
    base, fts = _states()
    with pytest.raises(
        soupkit.ConfigError,
        match=r"filter='mlp.up_proj' matched no tensor it decides: "
        r"the 2 merged tensor\(s\) it matches all take an earlier entry",
    ):
        _plan(base, fts, [{"filter": "mlp", "value": 2.0}, {"filter": "mlp.up_proj", "value": 3.0}])


def test_filter_on_a_non_float_tensor_only_matches_nothing() -> None:
    base, fts = _states()
    with pytest.raises(soupkit.ConfigError, match=r"filter='position_ids' matched no tensor"):
        _plan(base, fts, [{"filter": "position_ids", "value": 2.0}])


def test_duplicate_filter_entries_are_told_apart() -> None:
    base, fts = _states()
    with pytest.raises(
        soupkit.ConfigError, match=r"filter='mlp' \(entry 2\) matched no tensor it decides"
    ):
        _plan(base, fts, [{"filter": "mlp", "value": 2.0}, {"filter": "mlp", "value": 3.0}])


def test_out_of_range_resolved_value_names_the_tensor() -> None:
    base, fts = _states()
    with pytest.raises(
        soupkit.ConfigError,
        match=r"density\.0: Input should be greater than 0 .*"
        r"for tensor 'model.layers.0.mlp.up_proj.weight'",
    ):
        soupkit.merge_state_dicts(
            fts[:1],
            "ties",
            base=base,
            model_parameters=[
                {"density": [{"filter": "mlp", "value": [0.0, 0.5]}, {"value": 0.5}]}
            ],
        )
