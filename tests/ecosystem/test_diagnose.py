"""`soupkit diagnose` on tiny models with a known answer: fine-tunes of one initialisation soup,
independent initialisations do not; the numbers behind the verdict are checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import soupkit
from soupkit.cli import main

X = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))


def mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    )


def finetune(base: torch.nn.Module, seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}


TEACHER = mlp(0)


def score(state: dict[str, torch.Tensor]) -> float:
    """Higher is better: minus the squared error against the teacher network's outputs."""
    net = mlp(0)
    net.load_state_dict(state)
    with torch.no_grad():
        return -float((net(X) - TEACHER(X)).pow(2).mean())


def write(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def permuted(net: torch.nn.Sequential, seed: int) -> dict[str, torch.Tensor]:
    """The same function with its hidden units reordered: what another initialisation finds."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    p0, p1 = torch.randperm(16, generator=g), torch.randperm(16, generator=g)
    sd["0.weight"], sd["0.bias"] = sd["0.weight"][p0], sd["0.bias"][p0]
    sd["2.weight"], sd["2.bias"] = sd["2.weight"][p1][:, p0], sd["2.bias"][p1]
    sd["4.weight"] = sd["4.weight"][:, p1]
    return sd


def test_same_init_soups_independent_inits_do_not() -> None:
    same = soupkit.diagnose(
        [finetune(TEACHER, 1), finetune(TEACHER, 2), finetune(TEACHER, 3)],
        TEACHER,
        evaluator=score,
        progress=False,
    )
    assert same.safe and same.verdict == "share an initialisation, low barrier: safe to soup"
    # two equally good solutions in different basins: the teacher and a permutation of it
    pair = [TEACHER.state_dict(), permuted(TEACHER, 1)]
    assert score(pair[1]) == pytest.approx(0.0, abs=1e-10)
    independent = soupkit.diagnose(pair, evaluator=score, progress=False)
    assert not independent.safe and independent.verdict.startswith(
        "different bases: averaging will fail"
    )
    assert any("independent initialisations give cosine near 0" in e for e in independent.evidence)
    # same initialisation: raw weights nearly parallel; independent: nearly orthogonal
    assert (
        min(min(r) for r in same.weight_cosine) > 0.95
        and abs(independent.weight_cosine[0][1]) < 0.3
    )
    # the path between two fine-tunes of one init stays above the line: no barrier
    it = same.interpolations[0]
    assert len(it.alphas) == 11 and it.barrier < 1e-3 * abs(it.scores[0]) + 1e-9
    bad = independent.interpolations[0]
    assert (
        bad.barrier > 1e-3 and 0 < bad.barrier_alpha < 1
    )  # in between: a different, worse function
    assert "high barrier" in independent.verdict


def test_cosine_matrices_distances_and_sign_conflicts_by_hand() -> None:
    base = {"w": torch.zeros(4), "v": torch.ones(2, 2)}
    a = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "v": torch.ones(2, 2)}
    b = {"w": torch.tensor([1.0, -1.0, 0.0, 2.0]), "v": torch.ones(2, 2) * 3}
    c = {"w": torch.tensor([0.0, 0.0, 0.0, 0.0]), "v": torch.ones(2, 2)}
    rep = soupkit.diagnose([a, b, c], base, progress=False)
    for m in (rep.cosine, rep.weight_cosine):
        assert m is not None
        t = torch.tensor(m)
        assert torch.allclose(t, t.T) and torch.allclose(t.diagonal()[:2], torch.ones(2))
    # task vectors: a = (1,1,1,1, 0,0,0,0), b = (1,-1,0,2, 2,2,2,2), c = 0
    ta, tb = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]), torch.tensor([1.0, -1, 0, 2, 2, 2, 2, 2])
    assert rep.cosine[0][1] == pytest.approx(float(ta @ tb / ta.norm() / tb.norm()))  # type: ignore[index]
    assert rep.cosine[2][2] == 1.0 and rep.cosine[0][2] == 0.0  # type: ignore[index]  # a zero task vector
    assert rep.task_vector_norms["model 1"] == pytest.approx(float(tb.norm()))
    assert rep.distance_from_base["model 0"] == pytest.approx(2 / 2)  # ||tau_a|| = 2, ||base|| = 2
    # sign conflicts: entries where >= 2 task vectors are non-zero: w[0], w[1], w[3]; w[1] disagrees
    assert rep.sign_conflicts == {
        "w": pytest.approx(1 / 3)
    } and rep.sign_conflict_rate == pytest.approx(1 / 3)
    wa, wb = torch.cat([a["v"].flatten(), a["w"]]), torch.cat([b["v"].flatten(), b["w"]])
    assert rep.weight_distance[0][1] == pytest.approx(
        float((wa - wb).norm() / ((wa.norm() + wb.norm()) / 2))
    )


def test_streaming_in_small_chunks_gives_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    base = mlp(0)
    paths = [write(tmp_path / f"m{i}", finetune(base, i)) for i in (1, 2)]
    b = write(tmp_path / "base", base.state_dict())
    whole = soupkit.diagnose(paths, b, progress=False)
    monkeypatch.setattr(soupkit.api.diagnostics, "CHUNK", 7)
    chunked = soupkit.diagnose(paths, b, progress=False)
    assert torch.allclose(torch.tensor(chunked.cosine), torch.tensor(whole.cosine), atol=1e-12)
    assert chunked.sign_conflicts == whole.sign_conflicts


def test_architecture_and_vocabulary_mismatches(tmp_path: Path) -> None:
    a = mlp(0).state_dict()
    wrapped = {f"module.{k}": v for k, v in mlp(1).state_dict().items()}
    rep = soupkit.diagnose([a, wrapped], progress=False)
    assert rep.verdict == "different architectures: these models cannot be souped" and not rep.safe
    assert any("try --strip-prefix module." in e for e in rep.evidence)
    fixed = soupkit.diagnose(
        [a, wrapped], key_map=soupkit.KeyMap.build(strip_prefix="module."), progress=False
    )
    assert fixed.same_architecture
    emb = {"embed_tokens.weight": torch.randn(10, 4), "proj.weight": torch.randn(4, 4)}
    bigger = {"embed_tokens.weight": torch.randn(12, 4), "proj.weight": torch.randn(4, 4)}
    rep = soupkit.diagnose([emb, bigger], progress=False)
    assert rep.same_vocabulary is False and rep.vocab_sizes == {"model 0": 10, "model 1": 12}
    assert rep.verdict.startswith("different vocabularies")


def test_cli_writes_json_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = mlp(0)
    paths = [str(write(tmp_path / f"ft{i}", finetune(base, i))) for i in (1, 2)]
    b = str(write(tmp_path / "base", base.state_dict()))
    (tmp_path / "evals.py").write_text(
        "import torch\n"
        "def neg_norm(state):\n"
        "    return -float(sum(v.float().pow(2).sum() for v in state.values()))\n"
    )
    code = main(
        [
            "diagnose",
            *paths,
            "--base",
            b,
            "--evaluator",
            f"{tmp_path / 'evals.py'}:neg_norm",
            "--points",
            "5",
            "--out",
            str(tmp_path / "d"),
            "--json",
            "--no-progress",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["safe"] is True
        and data["models"] == paths
        and len(data["interpolations"][0]["scores"]) == 5
    )
    for name in ("cosine", "interpolation", "sign_conflicts"):
        png = tmp_path / "d" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and data["plots"][name] == str(png)
    assert json.loads((tmp_path / "d" / "diagnosis.json").read_text())["verdict"] == data["verdict"]
    assert main(["diagnose", paths[0], paths[1], "--no-progress"]) == 0
    assert "verdict: share an initialisation: likely safe to soup" in capsys.readouterr().out
