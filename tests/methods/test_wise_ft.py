"""WiSE-FT: the formula, the reference code's bytes, and many alphas from one read of the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import soupkit
from soupkit.api.multi import alpha_folder_names, wise_ft_recipe
from soupkit.cli import main
from soupkit.cli.wise_ft import parse_alphas
from soupkit.io.reader import TensorReader

from .helpers import base_state, bits_equal, finetunes, write


def test_hand_example() -> None:
    zs, ft = {"w": torch.tensor([0.0, 4.0])}, {"w": torch.tensor([8.0, 0.0])}
    out = soupkit.merge_state_dicts([ft], "wise_ft", base=zs, parameters={"alpha": 0.25})
    assert out["w"].tolist() == [2.0, 3.0]


@settings(max_examples=50, deadline=None)
@given(alpha=st.floats(-0.5, 1.5), seed=st.integers(0, 1000))
def test_equals_the_reference_code_bit_for_bit(alpha: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    theta_0, theta_1 = {"w": torch.randn(50, generator=g)}, {"w": torch.randn(50, generator=g)}
    # github.com/mlfoundations/wise-ft, src/wise_ft.py: _merge
    reference = (1 - alpha) * theta_0["w"] + alpha * theta_1["w"]
    out = soupkit.merge_state_dicts(
        [theta_1], "wise_ft", base=theta_0, parameters={"alpha": alpha}, chunk_elems=7
    )
    assert bits_equal(out["w"], reference)


def test_endpoints() -> None:
    base = base_state()
    (ft,) = finetunes(base, 1)
    zero = soupkit.merge_state_dicts([ft], "wise_ft", base=base, parameters={"alpha": 0.0})
    one = soupkit.merge_state_dicts([ft], "wise_ft", base=base, parameters={"alpha": 1.0})
    assert all(torch.equal(zero[k], base[k]) and torch.equal(one[k], ft[k]) for k in base)


@pytest.fixture
def zs_ft(tmp_path: Path) -> tuple[Path, Path]:
    base = base_state(dtype=torch.bfloat16)
    (ft,) = finetunes(base, 1)
    return write(tmp_path / "zs", base), write(tmp_path / "ft", ft)


def test_many_alphas_equal_single_merges_and_read_inputs_once(
    zs_ft: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    zs, ft = zs_ft
    alphas = [0.0, 0.25, 0.5, 1.0, 1.2]
    reads: list[tuple[str, int, int | None]] = []
    real_read = TensorReader.read

    def counting_read(self, info, start=0, stop=None, out=None):  # type: ignore[no-untyped-def]
        reads.append((f"{info.file}:{info.name}", start, stop))
        return real_read(self, info, start, stop, out)

    monkeypatch.setattr(TensorReader, "read", counting_read)
    results = soupkit.wise_ft(
        zs, ft, tmp_path / "grid", alphas=alphas, progress=False, chunk_elems=7, hash_inputs=False
    )
    monkeypatch.setattr(TensorReader, "read", real_read)
    assert len(reads) == len(set(reads))  # no range of any input was read twice
    assert [r.out.name for r in results] == [
        "alpha-0.00",
        "alpha-0.25",
        "alpha-0.50",
        "alpha-1.00",
        "alpha-1.20",
    ]
    for a, r in zip(alphas, results):
        single = soupkit.merge(wise_ft_recipe(zs, ft, a), tmp_path / f"single-{a}", progress=False)
        got = load_file(str(r.out / "model.safetensors"))
        want = load_file(str(single.out / "model.safetensors"))
        assert got.keys() == want.keys() and all(bits_equal(got[k], want[k]) for k in got)
        report = json.loads((r.out / "soupkit-report.json").read_text())
        assert report["wise_ft"]["alpha"] == a and report["recipe"]["parameters"] == {"alpha": a}
        assert (r.out / "config.json").is_file() and (r.out / "README.md").is_file()
        assert got["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16


def test_existing_output_is_refused_before_any_work(
    zs_ft: tuple[Path, Path], tmp_path: Path
) -> None:
    zs, ft = zs_ft
    (tmp_path / "grid" / "alpha-0.50").mkdir(parents=True)
    (tmp_path / "grid" / "alpha-0.50" / "keep.txt").write_text("mine")
    with pytest.raises(soupkit.OutputExistsError):
        soupkit.wise_ft(zs, ft, tmp_path / "grid", alphas=[0.25, 0.5], progress=False)
    assert not (tmp_path / "grid" / "alpha-0.25").exists()
    assert (tmp_path / "grid" / "alpha-0.50" / "keep.txt").read_text() == "mine"


def test_alpha_folder_names() -> None:
    assert alpha_folder_names([0.5, 1.0, -0.25]) == ["alpha-0.50", "alpha-1.00", "alpha--0.25"]
    assert alpha_folder_names([0.5, 0.501]) == ["alpha-0.500", "alpha-0.501"]
    with pytest.raises(soupkit.UsageError, match="alpha 0.5 is given twice"):
        alpha_folder_names([0.5, 0.5])
    with pytest.raises(soupkit.UsageError, match="finite"):
        alpha_folder_names([float("nan")])


def test_cli_alpha_lists_and_trailing_out_dir() -> None:
    assert parse_alphas(["0.25", "0.5", "0.75", "out"], None) == ([0.25, 0.5, 0.75], "out")
    assert parse_alphas(["0,0.1", "0.2"], "out") == ([0.0, 0.1, 0.2], "out")
    with pytest.raises(soupkit.UsageError, match="no output folder"):
        parse_alphas(["0.5"], None)
    with pytest.raises(soupkit.UsageError, match="'x' is not a number"):
        parse_alphas(["0.5", "x", "out"], None)


def test_cli_runs_a_grid(
    zs_ft: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zs, ft = zs_ft
    out = tmp_path / "cli"
    assert (
        main(["wise-ft", str(zs), str(ft), "--alpha", "0.25", "0.75", str(out), "--no-progress"])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["alpha-0.25", "alpha-0.75"]
    assert "alpha 0.75:" in capsys.readouterr().out
    assert main(["wise-ft", str(zs), str(ft), "--alpha", "0.5"]) == 2
    assert "no output folder given" in capsys.readouterr().err
