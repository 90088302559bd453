"""Smoke test of the benchmark scripts: generate a tiny model, run the runner on it.

Fast (a few seconds for soupkit; the mergekit part, ~10 s, runs only when the separate
``benchmarks/.venv-mergekit`` exists, see ``benchmarks/setup_mergekit.sh``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
SOUPKIT = Path(sys.executable).parent / "soupkit"
MERGEKIT = BENCH / ".venv-mergekit" / "bin" / "mergekit-yaml"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # A bound for a hang, not a speed check: `run.py --smoke` starts one process per tool and
    # recipe (each imports torch): 17 s in a full run here, 25 s beside two busy loops, 62 s beside six
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "small"
    r = _run(str(BENCH / "generate.py"), "--small", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_generate_small_is_a_deterministic_hf_folder(small_data: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    manifest = json.loads((small_data / "generate.json").read_text())
    assert manifest["checkpoints"] == ["base", "ft1", "ft2", "ft3", "ft4"]
    for ckpt in manifest["checkpoints"]:
        folder = small_data / ckpt
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        names: set[str] = set()
        for shard in shards:
            with safe_open(str(folder / shard), framework="pt") as fh:
                names |= set(fh.keys())
                assert all(str(fh.get_slice(k).get_dtype()) == "BF16" for k in fh.keys())
        assert names == set(index["weight_map"])
        assert {
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight",
        } <= names
        assert index["metadata"]["total_size"] == manifest["bytes_per_checkpoint"]

    again = tmp_path / "again"
    r = _run(str(BENCH / "generate.py"), "--small", "--quiet", "--out", str(again))
    assert r.returncode == 0, r.stderr
    for f in sorted(small_data.glob("*/*.safetensors")):
        assert f.read_bytes() == (again / f.parent.name / f.name).read_bytes(), (
            f"{f.name} is not deterministic"
        )


def _smoke(small_data: Path, tmp_path: Path, *extra: str) -> dict:
    results = tmp_path / "results" / "smoke"
    r = _run(
        str(BENCH / "run.py"),
        "--smoke",
        "--data",
        str(small_data),
        "--out-dir",
        str(tmp_path / "out"),
        "--results",
        str(results),
        "--soupkit",
        str(SOUPKIT),
        *extra,
    )
    assert r.returncode == 0, f"run.py failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert results.with_suffix(".md").read_text().startswith("# soupkit vs mergekit")
    return json.loads(results.with_suffix(".json").read_text())


def _soupkit_methods() -> set[str]:
    """Method names that ``soupkit methods`` lists (names start a line; details are indented)."""
    r = subprocess.run([str(SOUPKIT), "methods"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"`soupkit methods` failed:\n{r.stderr}"
    return {line.split()[0] for line in r.stdout.splitlines() if line and not line[0].isspace()}


def test_run_smoke_soupkit(small_data: Path, tmp_path: Path) -> None:
    if not SOUPKIT.exists():
        pytest.fail(
            f"{SOUPKIT} not found: install the package (`pip install -e .`) so the console script exists"
        )
    # The core grows method by method: benchmark the recipes whose method soupkit registers.
    recipes = [
        r for r in ("linear", "task_arithmetic", "ties", "dare_ties") if r in _soupkit_methods()
    ]
    if not recipes:
        pytest.skip("soupkit registers none of linear, task_arithmetic, ties, dare_ties yet")
    report = _smoke(small_data, tmp_path, "--tools", "soupkit", "--only", ",".join(recipes))
    assert [rec["name"] for rec in report["recipes"]] == recipes
    for rec in report["recipes"]:
        t = rec["tools"]["soupkit"]
        assert "skipped" not in t, f"soupkit was not run: {t.get('skipped')}"
        assert all(run["returncode"] == 0 for run in t["runs"]), rec["name"]
        assert t["median_wall_s"] > 0 and t["peak_private_bytes"] > 0
        if rec["name"] in ("linear", "task_arithmetic"):
            check = rec["checks"]["soupkit vs reference"]
            assert not check["problems"], check["summary"]


@pytest.mark.skipif(
    not MERGEKIT.exists(),
    reason=f"mergekit venv absent ({MERGEKIT}); create it with `bash benchmarks/setup_mergekit.sh`",
)
def test_run_smoke_mergekit_linear(small_data: Path, tmp_path: Path) -> None:
    report = _smoke(small_data, tmp_path, "--tools", "soupkit,mergekit", "--only", "linear")
    (rec,) = report["recipes"]
    assert rec["tools"]["mergekit"]["runs"][0]["returncode"] == 0
    assert rec["checks"]["mergekit vs reference"]["identical"], rec["checks"][
        "mergekit vs reference"
    ]["summary"]
    # soupkit's own health is test_run_smoke_soupkit's job; compare only when it ran.
    if "skipped" not in rec["tools"]["soupkit"]:
        check = rec["checks"]["soupkit vs mergekit"]
        assert check["identical"], check["summary"]


def test_ab_runs_each_configuration_in_its_own_process(small_data: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "linear",
                "models": [{"model": str(small_data / f"ft{i}")} for i in (1, 2)],
            }
        )
    )
    out = tmp_path / "ab-out"
    r = _run(
        str(BENCH / "ab.py"),
        str(recipe),
        "--configs",
        "1,2+tune",
        "--runs",
        "2",
        "--out",
        str(out),
        timeout=300,
    )
    assert r.returncode == 0, f"ab.py failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    runs = [line for line in r.stdout.splitlines() if line.startswith("run ")]
    assert [line.split(":")[0].split()[-1] for line in runs] == [
        "1",
        "2+tune",
        "1",
        "2+tune",
    ]  # alternating
    medians = r.stdout.split("medians over 2 runs (linear.yaml):")[1].split()
    assert medians[:2] == ["1:", "pass"] and float(medians[2]) > 0 and "2+tune:" in medians
    assert not out.exists()  # the last output is removed


def test_profile_reports_phases_and_functions(small_data: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "ties",
                "base_model": str(small_data / "base"),
                "parameters": {"density": 0.5, "trim_scope": "per_tensor"},
                "models": [{"model": str(small_data / f"ft{i}")} for i in (1, 2)],
            }
        )
    )
    r = _run(
        str(BENCH / "profile_pass.py"),
        str(recipe),
        "--out",
        str(tmp_path / "out"),
        "--cprofile",
        "--top",
        "5",
        timeout=300,
    )
    assert r.returncode == 0, (
        f"profile_pass.py failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    )
    head, phases = r.stdout.splitlines()[:2]
    assert head.startswith("ties.yaml: pass ") and " GB/s of " in head and "system" in head
    assert phases.startswith("phases (main thread wall s): ") and "merge" in phases
    assert "tottime" in r.stdout  # the function table


def test_plot_results_draws_every_merge_and_refuses_unreadable_files(tmp_path: Path) -> None:
    def tool(median: float, private: int) -> dict[str, object]:
        return {
            "median_wall_s": median,
            "min_wall_s": median * 0.9,
            "max_wall_s": median * 1.1,
            "peak_private_bytes": private,
        }

    meta = {"date": "2026-12-05 15:44 UTC", "data": "/x/full", "cold": False}
    doc = {
        "meta": {**meta, "machine": {"logical_cores": 2}},
        "recipes": [
            {
                "name": "linear",
                "cat": {"median_s": 0.9},
                "tools": {"soupkit": tool(6.4, 1 << 28), "mergekit": tool(13.1, 5 << 30)},
            },
            {
                "name": "ties",
                "tools": {"soupkit": tool(16.4, 1 << 28), "mergekit": {"skipped": "absent"}},
            },
        ],
    }
    (tmp_path / "r.json").write_text(json.dumps(doc))
    out = tmp_path / "plots" / "r.png"
    r = _run(str(BENCH / "plot_results.py"), str(tmp_path / "r.json"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    spec = importlib.util.spec_from_file_location("_plot_results", BENCH / "plot_results.py")
    assert spec is not None and spec.loader is not None
    plot_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_results)
    table, order = plot_results.rows([doc], None)
    assert [row["label"] for row in table] == ["linear (full)", "ties (full)"]
    assert order == ["soupkit", "mergekit"] and "mergekit" not in table[1]["tools"]
    bad = _run(str(BENCH / "plot_results.py"), str(tmp_path / "missing.json"), "--out", str(out))
    assert bad.returncode == 2 and "missing.json: cannot read run.py results" in bad.stderr
