"""`python -m demo.optimize`: its inputs are found read-only, its report says what it measured."""

from __future__ import annotations

from pathlib import Path

import pytest

opt = pytest.importorskip("demo.optimize")


def test_locate_needs_a_finished_demo_cache(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no finished demo ingredients"):
        opt.locate(tmp_path)
    models = tmp_path / "models"
    for name, f in (
        ("start-1", "model.safetensors"),
        ("ft00-a", "ingredient.json"),
        ("ft01-b", "model.safetensors"),
    ):
        (models / name).mkdir(parents=True)
        (models / name / f).write_text("x")
    (tmp_path / "data").mkdir()
    for split in ("val", "test"):
        (tmp_path / "data" / f"{split}.csv").write_text("text,label\n")
    start, fts, val, test = opt.locate(tmp_path)
    assert start.name == "start-1" and [p.name for p in fts] == ["ft00-a"]  # ft01-b is unfinished
    assert opt.space(fts, 6)["models"][0]["parameters"]["weight"] == {
        "min": 0.0,
        "max": 1.0,
        "points": 6,
    }


def test_markdown_shows_every_soup_with_its_interval_and_the_leakage_table() -> None:
    report = {
        "settings": {
            "ingredients": 8,
            "points": 6,
            "parameters": 48,
            "trials": 60,
            "sampler": "tpe",
            "seed": 0,
            "val_examples": 1000,
            "test_examples": 2000,
            "threads": 2,
        },
        "seconds": {"total": 900.0, "search": 800.0},
        "rows": [
            {"name": "optimized (per-layer)", "val": 0.78, "test": 0.75},
            {"name": "greedy soup", "val": 0.776, "test": 0.7515},
        ],
        "bootstrap": {"greedy soup": {"mean": -0.0015, "low": -0.01, "high": 0.007}},
        "top": [{"trial": 12, "validation": 0.78, "test": 0.75}],
    }
    text = opt.markdown(report)
    assert "| greedy soup | 77.60 | 75.15 | -0.15 [-1.00, +0.70] |" in text
    assert "| optimized (per-layer) | 78.00 | 75.00 |  |" in text
    assert "| 12 | 78.00 | 75.00 |" in text and "48 parameters, 60 trials" in text
