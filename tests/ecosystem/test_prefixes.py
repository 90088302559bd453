"""Inputs whose tensor names differ only by a wrapper prefix (``module.``, ``model.``): `merge`,
`plan` and `validate` say so in one problem that names ``--strip-prefix`` and the recipe key
``strip_prefix:``, instead of one problem per tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.cli import main
from soupkit.errors import ConfigError, PlanError
from soupkit.io.names import COMMON_PREFIXES, KeyMap, prefix_fix

from .eco_helpers import llama_state, write_llama


def wrapped(tmp_path: Path, name: str, seed: int, prefix: str, drop: str = "") -> Path:
    """A Llama saved with ``prefix`` before every name (as DDP's ``module.`` does), without ``drop``."""
    folder = tmp_path / name
    folder.mkdir()
    save_file(
        {prefix + k: v for k, v in llama_state(seed).items() if k != drop},
        str(folder / "model.safetensors"),
    )
    return folder


def recipe(tmp_path: Path, paths: list[Path], extra: str = "") -> Path:
    r = tmp_path / "r.yaml"
    r.write_text(
        "merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n" for p in paths) + extra
    )
    return r


def test_one_problem_that_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_llama(tmp_path / "a", llama_state(0))
    b = wrapped(tmp_path, "b", 1, "module.")
    r = recipe(tmp_path, [a, b])
    with pytest.raises(PlanError) as e:
        soupkit.plan(r)
    assert len(e.value.problems) == 1
    msg = e.value.problems[0]
    assert msg.startswith(
        "the models' tensor names differ only by a prefix ('module.'); the same tensor is named:"
    )
    assert f"{a}" in msg and "'lm_head.weight'\n" in msg and "'module.lm_head.weight'\n" in msg
    assert msg.endswith(
        "hint: add --strip-prefix module. (recipe key: `strip_prefix: [module.]`), which "
        "removes it from every name that has it"
    )
    assert "share an architecture" not in msg
    for cmd in (["validate", str(r)], ["plan", str(r)], ["merge", str(r), str(tmp_path / "o")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("--strip-prefix module.") == 1 and "share an architecture" not in err
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_the_flag_and_the_recipe_key_fix_it_with_the_same_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_llama(tmp_path / "a", llama_state(0))
    b = wrapped(tmp_path, "b", 1, "module.")
    r = recipe(tmp_path, [a, b])
    assert main(["validate", str(r), "--strip-prefix", "module."]) == 0
    assert (
        main(
            ["merge", str(r), str(tmp_path / "flag"), "--strip-prefix", "module.", "--no-progress"]
        )
        == 0
    )
    keyed = recipe(tmp_path, [a, b], "strip_prefix: module.\n")
    assert main(["validate", str(keyed)]) == 0
    assert main(["merge", str(keyed), str(tmp_path / "key"), "--no-progress"]) == 0
    capsys.readouterr()
    x, y = (
        load_file(tmp_path / "flag" / "model.safetensors"),
        load_file(tmp_path / "key" / "model.safetensors"),
    )
    assert x.keys() == y.keys() == llama_state(0).keys()
    assert all(torch.equal(x[k], y[k]) for k in x)
    want = (llama_state(0)["lm_head.weight"] + llama_state(1)["lm_head.weight"]) / 2
    assert torch.allclose(x["lm_head.weight"], want, atol=1e-7)
    p = soupkit.plan(
        {
            "merge_method": "linear",
            "strip_prefix": ["module."],
            "models": [{"model": str(a)}, {"model": str(b)}],
        }
    )
    assert any("strip prefix 'module.'" in n for n in p.notes)


def test_two_wrappers_on_two_models(tmp_path: Path) -> None:
    a = write_llama(tmp_path / "a", llama_state(0))
    b = wrapped(tmp_path, "b", 1, "module.")
    c = wrapped(tmp_path, "c", 2, "_orig_mod.")
    with pytest.raises(PlanError) as e:
        soupkit.plan(recipe(tmp_path, [a, b, c]))
    assert len(e.value.problems) == 1
    assert (
        "hint: add --strip-prefix module. --strip-prefix _orig_mod. (recipe key: "
        "`strip_prefix: [module., _orig_mod.]`)" in e.value.problems[0]
    )
    soupkit.plan(recipe(tmp_path, [a, b, c], "strip_prefix: [module., _orig_mod.]\n"))


def test_a_real_difference_is_still_listed(tmp_path: Path) -> None:
    a = write_llama(tmp_path / "a", llama_state(0))
    b = wrapped(tmp_path, "b", 1, "module.", drop="lm_head.weight")
    with pytest.raises(PlanError) as e:
        soupkit.plan(recipe(tmp_path, [a, b]))
    assert len(e.value.problems) > 1  # not only a prefix: every problem, as before
    assert not any("differ only by a prefix" in p for p in e.value.problems)


def test_empty_prefix_in_the_recipe_is_refused(tmp_path: Path) -> None:
    a = write_llama(tmp_path / "a", llama_state(0))
    with pytest.raises(ConfigError, match="strip_prefix: a prefix to strip cannot be empty"):
        soupkit.plan(recipe(tmp_path, [a], "strip_prefix: ['']\n"))


def test_prefix_fix_cases() -> None:
    llama = list(llama_state(0, layers=1))
    assert prefix_fix([llama, llama]) is None  # nothing differs
    assert (
        prefix_fix([llama, ["model." + n for n in llama]]) is None
    )  # strip 'model.' also hits the other
    assert prefix_fix([llama, ["net." + n for n in llama]]) == ["net."]
    assert prefix_fix([["a.w", "b.w"], ["x.a.w", "y.b.w"]]) is None  # no common wrapper
    assert prefix_fix([["w", "v"], ["module.w"]]) is None  # a tensor is missing too


names = st.lists(
    st.from_regex(r"[a-z]{1,3}(\.[a-z0-9]{1,3}){0,3}", fullmatch=True),
    min_size=1,
    max_size=12,
    unique=True,
)


@settings(max_examples=60, deadline=None)
@given(names, st.sampled_from(COMMON_PREFIXES), st.booleans())
def test_prefix_fix_property(ns: list[str], prefix: str, swap: bool) -> None:
    """Whatever it returns makes the name sets equal; a pure wrapper over names that do not
    themselves start with a candidate prefix is always found."""
    sets = [ns, [prefix + n for n in ns]]
    fix = prefix_fix(sets[::-1] if swap else sets)
    if fix is not None:
        km = KeyMap.build(strip_prefix=fix)
        assert {km(n) for n in sets[0]} == {km(n) for n in sets[1]}
    if not any(n.startswith(p) or (p.startswith(n + ".")) for n in ns for p in COMMON_PREFIXES):
        assert fix is not None
