"""NaN / Inf in inputs or produced by a method: reported with the tensor and the model, or allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hostile_helpers import debris
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import soupkit
from soupkit.engine import all_finite
from soupkit.errors import NonFiniteError


def model(
    path: Path, seed: int, *, poison: float | None = None, at: int = 7, scale: float = 1.0
) -> Path:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=g) * scale
    if poison is not None:
        w.view(-1)[at] = poison
    save_file(
        {"layer.weight": w, "layer.bias": torch.randn(32, generator=g), "step": torch.tensor([3])},
        str(path),
    )
    return path


def recipe(*paths: Path, **extra: object) -> dict[str, object]:
    return {"merge_method": "linear", "models": [{"model": str(p)} for p in paths], **extra}


@pytest.mark.parametrize(
    "poison,word",
    [
        (float("nan"), "1 NaN and 0 Inf"),
        (float("inf"), "0 NaN and 1 Inf"),
        (float("-inf"), "0 NaN and 1 Inf"),
    ],
)
def test_nonfinite_input_names_tensor_and_model(tmp_path: Path, poison: float, word: str) -> None:
    a, b = model(tmp_path / "a.safetensors", 0), model(tmp_path / "b.safetensors", 1, poison=poison)
    c = model(tmp_path / "c.safetensors", 2)
    with pytest.raises(NonFiniteError) as ei:
        soupkit.merge(recipe(a, b, c), tmp_path / "out")
    assert type(ei.value) is NonFiniteError
    msg = str(ei.value)
    assert msg.startswith("tensor 'layer.weight': ")
    assert f"  - {b} holds {word} there" in msg
    assert str(a) not in msg and str(c) not in msg
    assert "--allow-nonfinite" in msg
    assert not (tmp_path / "out").exists() and not debris(tmp_path)


def test_nonfinite_in_a_later_chunk_names_the_element_range(tmp_path: Path) -> None:
    a = model(tmp_path / "a.safetensors", 0)
    b = model(tmp_path / "b.safetensors", 1, poison=float("nan"), at=1500)
    with pytest.raises(NonFiniteError, match=r"in elements 1,024\.\.2,048 of the merged output"):
        soupkit.merge(recipe(a, b), tmp_path / "out", chunk_elems=1024)


def test_method_overflow_in_float32_is_blamed_on_the_method(tmp_path: Path) -> None:
    a, b = model(tmp_path / "a.safetensors", 0), model(tmp_path / "b.safetensors", 1)
    r = recipe(a, b, parameters={"normalize": False})
    r["models"] = [
        {"model": str(a), "parameters": {"weight": 3e38}},
        {"model": str(b), "parameters": {"weight": 3e38}},
    ]
    with pytest.raises(NonFiniteError) as ei:
        soupkit.merge(r, tmp_path / "out")
    msg = str(ei.value)
    assert "method 'linear' produced" in msg and "although every input is finite there" in msg


def test_fp16_overflow_at_the_cast(tmp_path: Path) -> None:
    a = model(tmp_path / "a.safetensors", 0, scale=1e5)
    b = model(tmp_path / "b.safetensors", 1, scale=1e5)
    with pytest.raises(NonFiniteError) as ei:
        soupkit.merge(recipe(a, b, out_dtype="float16"), tmp_path / "out")
    msg = str(ei.value)
    assert (
        "in the output after the cast to F16: the merged values are finite in float32 but reach"
        in msg
    )
    assert (
        "beyond the largest F16 value 65504" in msg and "`out_dtype: bfloat16` or `float32`" in msg
    )
    # bfloat16 has float32's range: the same merge is fine there
    soupkit.merge(recipe(a, b, out_dtype="bfloat16"), tmp_path / "ok")


def test_input_that_overflows_the_recipe_dtype(tmp_path: Path) -> None:
    a = model(tmp_path / "a.safetensors", 0, scale=1e6)
    b = model(tmp_path / "b.safetensors", 1)
    with pytest.raises(NonFiniteError, match=rf"{a} overflows the recipe's dtype float16"):
        soupkit.merge(recipe(a, b, dtype="float16"), tmp_path / "out")


def test_allow_nonfinite_writes_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from soupkit.cli import main

    a, b = (
        model(tmp_path / "a.safetensors", 0),
        model(tmp_path / "b.safetensors", 1, poison=float("nan")),
    )
    rp = tmp_path / "r.yaml"
    rp.write_text(json.dumps(recipe(a, b)))
    assert main(["merge", str(rp), str(tmp_path / "out")]) == 1
    assert "error: NonFiniteError: tensor 'layer.weight'" in capsys.readouterr().err
    assert main(["merge", str(rp), str(tmp_path / "out"), "--allow-nonfinite"]) == 0
    captured = capsys.readouterr()
    assert (
        "warning: 1 tensor(s) hold NaN or Inf (written because of --allow-nonfinite): layer.weight"
        in captured.err
    )
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert int(torch.isnan(out["layer.weight"]).sum()) == 1
    report = json.loads((tmp_path / "out" / "soupkit-report.json").read_text())
    assert report["nonfinite_tensors"] == ["layer.weight"]


def test_merge_state_dicts_checks_too() -> None:
    sd = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(NonFiniteError, match="state_dict 1 holds 0 NaN and 1 Inf there"):
        soupkit.merge_state_dicts([{"w": torch.tensor([1.0, 2.0])}, sd])
    out = soupkit.merge_state_dicts([{"w": torch.tensor([1.0, 2.0])}, sd], allow_nonfinite=True)
    assert torch.isinf(out["w"][1])


def test_integer_tensors_are_copied_unchecked(tmp_path: Path) -> None:
    a, b = model(tmp_path / "a.safetensors", 0), model(tmp_path / "b.safetensors", 1)
    soupkit.merge(recipe(a, b), tmp_path / "out")
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["step"].tolist() == [3]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    kind=st.sampled_from(["finite", "nan", "inf", "-inf", "huge"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_all_finite_agrees_with_isfinite(n: int, kind: str, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    i = int(torch.randint(0, n, (1,), generator=g))
    if kind == "huge":  # finite values whose sum overflows: must not be a false alarm
        x = x.sign() * torch.finfo(dtype).max
    elif kind != "finite":
        x[i] = float(kind)
    x = x.to(dtype)
    assert all_finite(x) == bool(torch.isfinite(x).all())
