"""Same recipe, same bytes: across runs and thread counts; the report hashes every file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from hostile_helpers import cli_process
from safetensors.torch import save_file

import soupkit


def models(root: Path) -> list[Path]:
    out = []
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        folder = root / f"m{i}"
        folder.mkdir(parents=True)
        save_file(
            {
                "embed.weight": torch.randn(3000, 64, generator=g).to(torch.bfloat16),
                "proj.weight": torch.randn(257, 129, generator=g).to(torch.bfloat16),
                "ids": torch.arange(7),
            },
            str(folder / "model.safetensors"),
        )
        (folder / "config.json").write_text('{"model_type": "tiny"}')
        out.append(folder)
    return out


def test_byte_identical_across_thread_counts_and_runs(tmp_path: Path) -> None:
    ms = models(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "linear",
                "dtype": "float32",
                "out_dtype": "float16",
                "models": [
                    {"model": str(m), "parameters": {"weight": w}}
                    for m, w in zip(ms, [0.2, 0.5, 0.3])
                ],
            }
        )
    )
    procs = []
    for threads in (1, 2):
        argv = [
            "merge",
            str(recipe),
            str(tmp_path / f"out{threads}"),
            "--max-shard-size",
            "200KB",
            "--no-progress",
        ]
        procs.append(cli_process(argv, tmp_path / f"log{threads}", threads=threads))
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    again = soupkit.merge(recipe, tmp_path / "again", max_shard_size="200KB")

    def files(out: Path) -> dict[str, bytes]:
        return {
            p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "soupkit-report.json"
        }

    one = files(tmp_path / "out1")
    assert len([n for n in one if n.endswith(".safetensors")]) >= 2
    assert one == files(tmp_path / "out2") == files(again.out)


def test_report_records_sha256_of_every_input_and_output(tmp_path: Path) -> None:
    ms = models(tmp_path)
    r = soupkit.merge(
        {"merge_method": "linear", "models": [{"model": str(m)} for m in ms]},
        tmp_path / "out",
        max_shard_size="200KB",
    )
    report = json.loads((r.out / "soupkit-report.json").read_text())

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert report["inputs_hashed"] is True
    for m, entry in zip(ms, report["inputs"]["models"]):
        (f,) = entry["files"]
        assert f["path"] == str(m / "model.safetensors") and f["sha256"] == sha(
            m / "model.safetensors"
        )
    assert len(report["outputs"]) >= 2
    for o in report["outputs"]:
        assert o["sha256"] == sha(r.out / o["file"])
    others = {o["file"]: o["sha256"] for o in report["other_files"]}
    assert set(others) == {"model.safetensors.index.json", "config.json", "README.md"}
    assert all(h == sha(r.out / n) for n, h in others.items())
    # every file of the output except the report itself is accounted for
    assert {p.name for p in r.out.iterdir()} - {"soupkit-report.json"} == set(others) | {
        o["file"] for o in report["outputs"]
    }


def test_hashing_inputs_can_be_turned_off(tmp_path: Path) -> None:
    ms = models(tmp_path)
    r = soupkit.merge(
        {"merge_method": "linear", "models": [{"model": str(m)} for m in ms]},
        tmp_path / "out",
        hash_inputs=False,
    )
    report = json.loads((r.out / "soupkit-report.json").read_text())
    assert report["inputs_hashed"] is False
    assert all("sha256" not in f for m in report["inputs"]["models"] for f in m["files"])
    assert all(len(o["sha256"]) == 64 for o in report["outputs"])  # outputs are always hashed
