"""Planning from headers: every problem reported at once, with names and hints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from toymodels import tiny_state, write_model

import soupkit
from soupkit.errors import ConfigError, PlanError


def recipe(paths: list[Path], **extra: object) -> dict[str, object]:
    return {"merge_method": "linear", "models": [{"model": str(p)} for p in paths], **extra}


def test_all_problems_reported_together(tmp_path: Path, models: list[Path]) -> None:
    s = tiny_state(5)
    del s["model.norm.weight"]  # missing
    s["lm_head.weight"] = torch.randn(51, 8)  # vocab differs
    s["extra.bias"] = torch.zeros(2)  # extra
    bad = write_model(tmp_path / "bad", s)
    with pytest.raises(PlanError) as e:
        soupkit.plan(recipe([models[0], bad]))
    msg = str(e.value)
    assert len(e.value.problems) == 3
    assert "tensor 'model.norm.weight' is missing from" in msg and str(bad) in msg
    assert "tensor 'lm_head.weight': shapes differ" in msg and "[51, 8]" in msg and "[50, 8]" in msg
    assert "hint: vocabularies differ" in msg
    assert "has 1 tensor(s) that" in msg and "'extra.bias'" in msg


def test_mixed_dtypes_need_explicit_dtype(tmp_path: Path, models: list[Path]) -> None:
    half = write_model(tmp_path / "half", tiny_state(9, torch.float16))
    with pytest.raises(PlanError, match="mixed dtypes") as e:
        soupkit.plan(recipe([models[0], half]))
    assert "set `dtype:`" in str(e.value)
    p = soupkit.plan(recipe([models[0], half], dtype="float32"))
    assert {j.out_dtype for j in p.jobs if not j.is_copy} == {"F32"}


def test_unknown_keys_parameters_and_methods_suggest_fixes(models: list[Path]) -> None:
    with pytest.raises(ConfigError) as e:
        soupkit.plan({**recipe(models), "merge_methdo": "linear"})
    assert "merge_methdo: unknown key; did you mean 'merge_method'?" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean 'linear'"):
        soupkit.plan({**recipe(models), "merge_method": "lineer"})
    r = recipe(models)
    r["models"][0]["parameters"] = {"wieght": 2}  # type: ignore[index]
    with pytest.raises(
        ConfigError, match=r"unknown parameter 'wieght' for method 'linear'; did you mean 'weight'"
    ):
        soupkit.plan(r)
    r["models"][0]["parameters"] = {"normalize": False}  # type: ignore[index]
    with pytest.raises(ConfigError, match="'normalize' is a global parameter"):
        soupkit.plan(r)
    with pytest.raises(ConfigError, match="mergekit key 'modules'.*not supported"):
        soupkit.plan({**recipe(models), "modules": {}})


def test_several_config_errors_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        soupkit.load_recipe("merge_method: linear\nmodels: []\ndtype: float8\nseed: x\n")
    assert len(e.value.errors) == 3
    assert e.value.exit_code == 2


def test_non_float_tensors_are_copied_from_the_first_model(models: list[Path]) -> None:
    p = soupkit.plan(recipe(models))
    (job,) = [j for j in p.jobs if j.is_copy]
    assert (
        job.name == "model.position_ids"
        and job.source is not None
        and str(models[0]) in str(job.source.file)
    )


def test_filters_are_counted_and_unmatched_filters_fail(models: list[Path]) -> None:
    r = recipe(models)
    r["models"][0]["parameters"] = {"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}  # type: ignore[index]
    p = soupkit.plan(r)
    assert p.filter_counts == {"models[0].parameters.weight filter='mlp'": 2}
    mlp = next(j for j in p.jobs if "mlp" in j.name)
    attn = next(j for j in p.jobs if "q_proj" in j.name)
    assert mlp.params.weight == (3.0, 1.0, 1.0) and attn.params.weight == (1.0, 1.0, 1.0)  # type: ignore[union-attr]
    r["models"][0]["parameters"] = {"weight": [{"filter": "mpl", "value": 3.0}]}  # type: ignore[index]
    with pytest.raises(ConfigError, match="filter='mpl' matched no tensor"):
        soupkit.plan(r)


def test_gradient_parameters_interpolate_across_layers(tmp_path: Path) -> None:
    paths = [write_model(tmp_path / f"g{i}", tiny_state(i, layers=3)) for i in range(2)]
    r = recipe(paths)
    r["models"][0]["parameters"] = {"weight": [0.0, 1.0]}  # type: ignore[index]
    p = soupkit.plan(r)
    w = {j.name: j.params.weight[0] for j in p.jobs if j.params is not None}  # type: ignore[union-attr]
    assert w["model.layers.0.mlp.up_proj.weight"] == 0.0
    assert w["model.layers.1.mlp.up_proj.weight"] == 0.5
    assert w["model.layers.2.mlp.up_proj.weight"] == 1.0
    # outside the layers: t = 0, as mergekit 0.1.5 resolves them
    assert w["model.embed_tokens.weight"] == 0.0 and w["lm_head.weight"] == 0.0


def test_peak_memory_estimate_is_flat_in_model_size(tmp_path: Path) -> None:
    def model(rows: int, name: str) -> Path:
        return write_model(
            tmp_path / name, {f"w{i}": torch.zeros(rows, 64) for i in range(4)}, config=False
        )

    small = soupkit.plan(recipe([model(1 << 15, "s0"), model(1 << 15, "s1")]), chunk_elems=1 << 16)
    big = soupkit.plan(recipe([model(1 << 16, "b0"), model(1 << 16, "b1")]), chunk_elems=1 << 16)
    assert big.input_bytes == 2 * small.input_bytes
    assert big.peak_memory_bytes == small.peak_memory_bytes


def test_describe_is_a_readable_dry_run(models: list[Path]) -> None:
    text = soupkit.plan(recipe(models)).describe()
    for part in (
        "method      linear",
        "models      3",
        "copied: non-float",
        "peak memory",
        "weight=[1, 1, 1]",
    ):
        assert part in text


def test_model_paths_resolve_from_the_recipe_folder_when_not_in_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "proj"
    for i in range(2):
        write_model(folder / f"m{i}", tiny_state(i))
    recipe = folder / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: m0\n  - model: m1\n")
    monkeypatch.chdir(tmp_path)  # m0/m1 do not exist here
    p = soupkit.plan(recipe)
    assert [m.label for m in p.models] == ["m0", "m1"]
    (tmp_path / "m0").mkdir()  # now the cwd wins, as in mergekit: an empty folder is an error
    with pytest.raises(PlanError, match="folder holds no checkpoint"):
        soupkit.plan(recipe)


def test_soupkit_merge_validates_and_plans_the_recipe_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``soupkit merge`` to the writer, the recipe is validated once (schema and method
    parameters) and planned once."""
    from soupkit.cli import main
    from soupkit.planning import from_recipe
    from soupkit.planning import plan as plan_mod
    from soupkit.recipe.schema import MergeConfig

    calls: dict[str, int] = {"schema": 0, "params": 0, "plan": 0}

    def spy(key: str, real: Any) -> Any:
        def f(*a: Any, **k: Any) -> Any:
            calls[key] += 1
            return real(*a, **k)

        return f

    base = write_model(tmp_path / "b", tiny_state(0))
    ft = write_model(tmp_path / "f", tiny_state(1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n"
        "    parameters: {weight: 0.5}\n"
    )
    monkeypatch.setattr(
        MergeConfig,
        "model_validate",
        classmethod(spy("schema", MergeConfig.model_validate.__func__)),
    )
    monkeypatch.setattr(plan_mod, "_check_param_names", spy("params", plan_mod._check_param_names))
    planned = spy("plan", plan_mod.plan_checked)
    for mod in (plan_mod, from_recipe):  # make_plan's and plan_recipe's way in
        monkeypatch.setattr(mod, "plan_checked", planned)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 0
    assert calls == {"schema": 1, "params": 1, "plan": 1}
