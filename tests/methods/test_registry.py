"""The registry as data: every method documented, listed by the CLI, presets well-formed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from soupkit import methods
from soupkit.cli import main
from soupkit.methods import MethodSpec, Params
from soupkit.methods._conventions import PresetParams

from .helpers import base_state, finetunes, write

ALL = methods.all_methods()


def test_soupkit_methods_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for spec in ALL:
        assert spec.name in out and spec.paper in out
    assert "global: lambda, " in out and "lambda_" not in out  # the recipe key, not the field name


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_module_docstring_gives_formula_paper_and_anchor(spec: MethodSpec) -> None:
    doc = sys.modules[spec.fn.__module__].__doc__ or ""
    assert spec.paper in doc
    assert "theta" in doc  # the formula
    assert "mergekit" in doc  # how it relates to mergekit's method of the same name
    assert spec.fn.__doc__


@pytest.mark.parametrize(
    "spec", [s for s in ALL if issubclass(s.params, PresetParams)], ids=lambda s: s.name
)
def test_presets_name_only_fields_and_mergekit_is_the_default(spec: MethodSpec) -> None:
    params: type[PresetParams] = spec.params  # type: ignore[assignment]
    fields = params.model_fields
    assert "paper" in params.presets and "mergekit" in params.presets
    for conv, values in params.presets.items():
        assert set(values) <= set(fields), (conv, set(values) - set(fields))
    for key, value in params.presets["mergekit"].items():
        assert fields[key].default == value, key
    assert fields["convention"].default == "mergekit"


def test_registration_refuses_bad_declarations() -> None:
    class P(Params):
        pass

    def fn(deltas, p, *, rng=None):  # type: ignore[no-untyped-def]
        return deltas[0]

    with pytest.raises(ValueError, match="already a merge method called 'ties'"):
        methods.method(
            "ties", kind="task_vector", params=P, paper="x", summary="x", needs_base=True
        )(fn)
    with pytest.raises(
        ValueError, match="a pre-pass needs a deterministic task-vector method that sees whole"
    ):
        methods.method(
            "x_trim",
            kind="task_vector",
            params=P,
            paper="x",
            summary="x",
            needs_base=True,
            prepass=methods.get("ties").prepass,
        )(fn)
    assert "x_trim" not in methods.REGISTRY


def test_plan_shows_resolved_parameters_with_recipe_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = base_state()
    fts = finetunes(base, 2)
    b = write(tmp_path / "base", base)
    ms = [write(tmp_path / f"m{i}", s) for i, s in enumerate(fts)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n  - model: {ms[1]}\n"
        "parameters: {density: 0.3, lambda: 0.5, convention: paper}\n"
    )
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "lambda=0.5" in out and "trim_scope=global" in out and "density=[0.3, 0.3]" in out
    assert "a pre-pass reads the 9 trimmed tensors of every model two more times" in out
