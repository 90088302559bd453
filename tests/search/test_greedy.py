"""Greedy soup: the paper's algorithm, exact output, exact early rejection, cache, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soup_toy as toy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from soupkit import uniform_soup
from soupkit.backends import LocalBackend
from soupkit.errors import CheckpointFormatError, EvaluationError, PlanError, UsageError
from soupkit.evaluate.protocol import meets
from soupkit.search import ScoreCache, greedy_soup

KINDS = ["good", "perm", "good", "noisy", "good", "good"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that comparisons are exact (NaN-safe, -0.0 != 0.0)."""
    return t.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    )


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


def test_keeps_the_helpful_ingredients_and_matches_the_paper_algorithm(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, KINDS)
    _, xv, yv, xt, yt = toy.problem()
    result = greedy_soup(
        paths, toy.Accuracy(xv, yv), test_evaluator=toy.Accuracy(xt, yt, key="test")
    )

    # The known answer: every good ingredient in, every harmful one out.
    chosen = {Path(p).name for p in result.ingredients}
    assert chosen == {p.name for p, k in zip(paths, KINDS) if k == "good"}
    # ... and exactly what the paper's algorithm gives with everything in memory.
    states = [load_file(str(p / "model.safetensors")) for p in paths]
    ref_idx, ref_score = toy.naive_greedy(states, lambda s: toy.accuracy(s, xv, yv))
    assert result.ingredients == [str(paths[i]) for i in ref_idx]
    assert result.score == ref_score
    assert result.score > result.best_single.score + 0.2
    # Ranking: best first, the history has one decision per remaining ingredient, in rank order.
    scores = {s.label: s.score for s in result.ingredient_scores}
    ranked = sorted(result.ingredient_scores, key=lambda s: s.rank)
    assert [s.score for s in ranked] == sorted(scores.values(), reverse=True)
    assert [s.label for s in result.steps] == [s.label for s in ranked[1:]]
    assert all(not s.accepted for s in result.steps if "perm" in s.label or "noisy" in s.label)
    # Held-out test set: the soup generalises, the best single ingredient does not as well.
    assert result.held_out is not None
    assert result.held_out.best_single == ranked[0].label
    assert result.held_out.soup_score == toy.accuracy(_average(states, ref_idx), xt, yt)
    assert result.held_out.soup_score > result.held_out.best_single_score


def _average(states: list[dict[str, torch.Tensor]], idx: list[int]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in states[idx[0]].items():
        if not v.is_floating_point():
            out[k] = v
            continue
        acc = v.float().clone()
        for j in idx[1:]:
            acc = acc + states[j][k].float()
        out[k] = (acc / float(len(idx))).to(v.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_soup_equals_uniform_soup_and_the_evaluated_candidate_bit_for_bit(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    paths = toy.make_ingredients(tmp_path, KINDS, dtype=dtype, seed=1)
    _, xv, yv, xt, yt = toy.problem(1)
    val, test = toy.Accuracy(xv, yv), toy.Accuracy(xt, yt, key="test")
    result = greedy_soup(paths, val, tmp_path / "soup", test_evaluator=test, progress=False)
    assert len(result.ingredients) >= 3  # a sum of several ingredients, so the order matters

    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    uniform_soup(result.ingredients, tmp_path / "uniform", progress=False)
    assert_same_bits(written, load_file(str(tmp_path / "uniform" / "model.safetensors")))
    # The test evaluator saw the final soup first; the validation evaluator saw it when the
    # last ingredient was accepted. Both are the written bytes.
    assert_same_bits(written, test.states[0])
    last = max(i for i, s in enumerate(result.steps) if s.accepted)
    candidate = val.states[len(paths) + last]
    assert_same_bits(written, candidate)
    assert (
        written["fc.steps"].tolist()
        == load_file(str(Path(result.ingredients[0]) / "model.safetensors"))["fc.steps"].tolist()
    )


def test_reads_one_ingredient_at_a_time(tmp_path: Path, live_reads) -> None:  # type: ignore[no-untyped-def]
    kinds = KINDS + ["good", "noisy", "good", "perm"]
    paths = toy.make_ingredients(tmp_path, kinds)
    _, xv, yv, _, _ = toy.problem()
    greedy_soup(paths, toy.Accuracy(xv, yv), progress=False)
    model = sum(
        v.numel() * v.element_size()
        for v in load_file(str(paths[0] / "model.safetensors")).values()
    )
    assert live_reads.reads > 0
    assert live_reads.peak <= model, (live_reads.peak, model)  # never two ingredients at once


@pytest.mark.parametrize("strict", [False, True])
def test_early_rejection_gives_the_same_soup_as_full_evaluation(
    tmp_path: Path, strict: bool
) -> None:
    kinds = KINDS + ["noisy", "good", "perm"]
    paths = toy.make_ingredients(tmp_path, kinds, seed=2)
    _, xv, yv, _, _ = toy.problem(2)
    full_ev, early_ev = toy.Accuracy(xv, yv), toy.Accuracy(xv, yv)
    full = greedy_soup(paths, full_ev, strict=strict, early_stop=False)
    early = greedy_soup(paths, early_ev, strict=strict, early_stop=True)

    assert early.ingredients == full.ingredients and early.score == full.score
    assert [(s.label, s.accepted, s.soup_score) for s in early.steps] == [
        (s.label, s.accepted, s.soup_score) for s in full.steps
    ]
    for e, f in zip(early.steps, full.steps):
        if e.complete:
            assert e.candidate_score == f.candidate_score
        else:  # stopped early: a rejected upper bound of the full score
            assert not e.accepted and e.candidate_score >= f.candidate_score
            assert not meets(e.candidate_score, e.need, strict=strict)
    assert full.examples_saved == 0 and early.examples_saved > 0
    assert full_ev.examples - early_ev.examples == early.examples_saved
    assert early.examples_evaluated == early_ev.examples


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kinds=st.lists(st.sampled_from(["good", "perm", "noisy"]), min_size=2, max_size=7),
    seed=st.integers(0, 50),
    strict=st.booleans(),
)
def test_early_rejection_never_changes_a_decision(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str], seed: int, strict: bool
) -> None:
    root = tmp_path_factory.mktemp("prop")
    paths = toy.make_ingredients(root, kinds, seed=seed)
    _, xv, yv, _, _ = toy.problem(seed, n=300)
    a = greedy_soup(paths, toy.Accuracy(xv, yv, batch=20), strict=strict, early_stop=False)
    b = greedy_soup(paths, toy.Accuracy(xv, yv, batch=20), strict=strict, early_stop=True)
    assert [s.accepted for s in a.steps] == [s.accepted for s in b.steps]
    assert a.ingredients == b.ingredients and a.score == b.score


def test_paper_rule_accepts_ties_and_strict_rule_does_not(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, ["good", "good"])
    twin = tmp_path / "twin"
    shutil.copytree(paths[0], twin)  # same bytes: the soup of the two equals either one exactly
    _, xv, yv, _, _ = toy.problem()
    both = [paths[0], twin]
    paper = greedy_soup(both, toy.Accuracy(xv, yv))
    strict = greedy_soup(both, toy.Accuracy(xv, yv), strict=True)
    assert paper.steps[0].candidate_score == paper.steps[0].need
    assert paper.ingredients == [str(paths[0]), str(twin)]
    assert strict.ingredients == [str(paths[0])]


def test_ties_in_the_ranking_keep_the_order_given(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, ["good", "good", "perm"])
    twin = tmp_path / "twin"
    shutil.copytree(paths[1], twin)
    _, xv, yv, _, _ = toy.problem()
    for order in ([twin, paths[0], paths[1], paths[2]], [paths[1], paths[2], twin, paths[0]]):
        r = greedy_soup(order, toy.Accuracy(xv, yv))
        tied = [s for s in r.ingredient_scores if Path(s.label).name in ("twin", paths[1].name)]
        assert tied[0].score == tied[1].score
        assert tied[0].rank + 1 == tied[1].rank  # adjacent, the one given first ranks first
        assert tied[0].index < tied[1].index


def test_rerun_with_the_cache_evaluates_nothing(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, KINDS)
    _, xv, yv, xt, yt = toy.problem()
    cache = tmp_path / "cache" / "scores.jsonl"
    first_ev = toy.Accuracy(xv, yv)
    first = greedy_soup(
        paths, first_ev, cache=cache, test_evaluator=toy.Accuracy(xt, yt, key="test")
    )
    assert first.cache_hits == 0 and first.evaluations == first_ev.calls + 2

    again_ev, again_test = toy.Accuracy(xv, yv), toy.Accuracy(xt, yt, key="test")
    again = greedy_soup(paths, again_ev, cache=cache, test_evaluator=again_test)
    assert again_ev.calls == 0 and again_test.calls == 0 and again.evaluations == 0
    assert again.cache_hits == first.evaluations
    assert again.ingredients == first.ingredients and again.score == first.score
    assert again.held_out == first.held_out
    assert [(s.accepted, s.candidate_score, s.complete) for s in again.steps] == [
        (s.accepted, s.candidate_score, s.complete) for s in first.steps
    ]
    assert all(s.cached for s in again.steps) and all(s.cached for s in again.ingredient_scores)

    # Moved files keep their scores (the key is their content) ...
    moved = [shutil.copytree(p, tmp_path / "moved" / p.name) for p in paths]
    ev = toy.Accuracy(xv, yv)
    assert greedy_soup(moved, ev, cache=cache).ingredients == [
        str(tmp_path / "moved" / Path(p).name) for p in first.ingredients
    ]
    assert ev.calls == 0
    # ... and a changed ingredient is evaluated again, alone and in every soup it joins.
    changed = toy.states(KINDS)[3]
    changed["fc.bias"] = changed["fc.bias"] + 1.0
    toy.write(moved[3], changed)
    ev = toy.Accuracy(xv, yv)
    r = greedy_soup(moved, ev, cache=cache)
    assert ev.calls >= 1 and ev.calls == r.evaluations
    assert [s.cached for s in r.ingredient_scores] == [i != 3 for i in range(len(KINDS))]


def test_the_cache_refuses_evaluators_it_cannot_name(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, ["good", "good"])
    _, xv, yv, _, _ = toy.problem()

    def closure(state):  # type: ignore[no-untyped-def]
        return toy.accuracy(state, xv, yv)

    with pytest.raises(UsageError, match="cannot cache scores of evaluator"):
        greedy_soup(paths, closure, cache=tmp_path / "c.jsonl")
    r = greedy_soup(paths, closure, cache=tmp_path / "c.jsonl", evaluator_id="toy-val-v1")
    assert r.evaluator == "toy-val-v1"
    with pytest.raises(UsageError, match="same identity"):
        greedy_soup(
            paths,
            closure,
            cache=tmp_path / "c.jsonl",
            evaluator_id="x",
            test_evaluator=lambda s: 0.0,
            test_evaluator_id="x",
        )


def test_cached_early_stop_answers_only_when_it_proves_the_decision(tmp_path: Path) -> None:
    from soupkit.evaluate.protocol import EvalResult

    path = tmp_path / "c.jsonl"
    cache = ScoreCache(path)
    cache.store("ev", "soup", EvalResult(0.79, 40, 100, False), need=0.8, strict=False)
    reread = ScoreCache(path)
    assert reread.lookup("ev", "soup") is None  # a bound is no score
    assert reread.lookup("ev", "soup", need=0.7) is None  # the bound 0.79 would pass 0.7
    hit = reread.lookup("ev", "soup", need=0.85)
    assert hit is not None and not hit.complete and hit.score == 0.79
    assert reread.lookup("ev", "soup", need=0.79, strict=True) is not None  # 0.79 > 0.79 fails
    assert reread.lookup("ev", "soup", need=0.79, strict=False) is None
    cache.store("ev", "soup", EvalResult(0.75, 100, 100, True))
    assert ScoreCache(path).lookup("ev", "soup").score == 0.75  # type: ignore[union-attr]
    # A torn last line (interrupted write) is skipped, not fatal.
    with open(path, "a") as f:
        f.write('{"v":1,"kind":"score","evalu')
    torn = ScoreCache(path)
    assert torn.skipped_lines == 1 and torn.lookup("ev", "soup") is not None


def test_evaluator_failure_names_the_candidate(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, ["good", "good", "perm"])
    _, xv, yv, _, _ = toy.problem()
    calls = []

    def flaky(state):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("CUDA out of memory")
        return toy.accuracy(state, xv, yv)

    with pytest.raises(
        EvaluationError, match=r"candidate 'soup of .*ft0\d-good \+ .*'.*CUDA out of memory"
    ):
        greedy_soup(paths, flaky)


def test_incompatible_ingredients_fail_before_any_evaluation(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, ["good", "good"])
    odd = toy.states(["good"])[0]
    odd["fc.weight"] = torch.zeros(4, toy.D)
    toy.write(tmp_path / "odd", odd)
    called = []
    with pytest.raises(PlanError, match="fc.weight"):
        greedy_soup([*paths, tmp_path / "odd"], lambda s: called.append(1) or 0.0)
    assert not called
    with pytest.raises(UsageError, match="given twice"):
        greedy_soup([paths[0], paths[1], str(paths[0]) + "/"], lambda s: 0.0)
    with pytest.raises(UsageError, match="no checkpoints"):
        greedy_soup([], lambda s: 0.0)


def test_output_folder_has_the_soup_history_and_plot(tmp_path: Path) -> None:
    paths = toy.make_ingredients(tmp_path, KINDS)
    _, xv, yv, xt, yt = toy.problem()
    r = greedy_soup(
        paths, toy.Accuracy(xv, yv), tmp_path / "soup", test_evaluator=toy.Accuracy(xt, yt, key="t")
    )
    report = json.loads((tmp_path / "soup" / "soupkit-report.json").read_text())
    g = report["greedy"]
    assert report["method"]["name"] == "linear"
    assert [m["label"] for m in report["inputs"]["models"]] == r.ingredients
    assert g["final"]["ingredients"] == r.ingredients and g["rule"] == ">="
    assert len(g["ingredients"]) == len(KINDS) and len(g["steps"]) == len(KINDS) - 1
    assert {"candidate_score", "accepted", "complete", "need", "soup_score"} <= set(g["steps"][0])
    assert g["examples"]["saved"] == r.examples_saved > 0
    assert (
        g["evaluations"] == r.evaluations and g["held_out"]["soup_score"] == r.held_out.soup_score
    )  # type: ignore[union-attr]
    png = (tmp_path / "soup" / "greedy-soup.png").read_bytes()
    assert (
        r.plot == tmp_path / "soup" / "greedy-soup.png"
        and png.startswith(b"\x89PNG")
        and len(png) > 10_000
    )
    # The plot can be redrawn from the report alone.
    from soupkit.search.report_plot import plot_report

    again = plot_report(tmp_path / "soup", tmp_path / "again.png")
    assert again.read_bytes().startswith(b"\x89PNG")


def test_a_copy_of_an_ingredient_is_scored_once_whatever_the_backend(tmp_path: Path) -> None:
    # Scores are cached by content: a copy of an ingredient in another folder is a cache hit,
    # in the one loop whether it runs here or on a backend (its jobs are one per content).
    paths = toy.make_ingredients(tmp_path, ["good", "perm", "good"])
    copy = shutil.copytree(paths[0], tmp_path / "copy-of-ft00")
    _, xv, yv, _, _ = toy.problem()
    runs = {}
    for name, backend in (("here", None), ("local", LocalBackend())):
        ev = toy.Accuracy(xv, yv)
        r = greedy_soup([*paths, copy], ev, backend=backend)
        assert [s.cached for s in r.ingredient_scores] == [False, False, False, True]
        assert r.ingredient_scores[3].score == r.ingredient_scores[0].score
        assert r.evaluations == ev.calls == 3 + sum(not s.cached for s in r.steps)
        assert r.cache_hits == 1 + sum(s.cached for s in r.steps)
        runs[name] = r
    assert runs["here"].distributed is None and runs["local"].distributed is not None
    assert runs["here"].steps == runs["local"].steps


_HUB_SCRIPT = """
import hashlib, os, sys, pathlib
import soup_toy as toy
from soupkit.search import greedy_soup

root = pathlib.Path(sys.argv[1])
paths = toy.make_ingredients(root / "runs", ["good", "good", "perm"])
for src, repo in ((paths[0], "org/a"), (paths[1], "org/b")):  # a Hugging Face cache layout
    d = pathlib.Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    snap = d / "snapshots" / ("0" * 40)
    (d / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text("0" * 40)
    for f in sorted(src.iterdir()):
        etag = hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(d / "blobs" / etag)
        os.symlink(f"../../blobs/{etag}", snap / f.name)
_, xv, yv, _, _ = toy.problem()
r = greedy_soup(["org/a", "org/b", str(paths[2])], toy.Accuracy(xv, yv), root / "out", plot=False)
print(r.ingredients)
"""


def test_checkpoints_named_by_hub_id_are_evaluated_from_the_cache(tmp_path: Path) -> None:
    # The loop's jobs name each checkpoint by its resolved path: a Hub id is its snapshot folder
    # (offline, from the cache), not a folder of that name in the working directory.
    script = tmp_path / "hub_greedy.py"
    script.write_text(_HUB_SCRIPT)
    src = Path(__file__).resolve().parents[2] / "src"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env |= {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens: nothing may be downloaded
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(src), str(Path(__file__).parent)]),
    }
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() in ("['org/a', 'org/b']", "['org/b', 'org/a']")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_without_a_backend_the_first_failure_stops_the_run_and_names_no_worker(
    tmp_path: Path,
) -> None:
    # In this process a failing evaluator stops the run at once (a cluster would run the other
    # independent jobs first), and messages speak of this process, not of workers.
    paths = toy.make_ingredients(tmp_path, ["good", "good", "perm"])
    calls = []

    def broken(state):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise RuntimeError("no GPU")

    with pytest.raises(EvaluationError) as got:
        greedy_soup(paths, broken, evaluator_id="broken")
    assert calls == [1]
    msg = str(got.value)
    assert "candidate 'ingredient " in msg and "ft00-good' failed" in msg and "no GPU" in msg
    assert "on worker" not in msg and "more candidate" not in msg
    (tmp_path / "gone").mkdir()
    shutil.copy(paths[2] / "model.safetensors", tmp_path / "gone" / "model.safetensors")
    _, xv, yv, _, _ = toy.problem()

    def remove_after_first(state):  # type: ignore[no-untyped-def]
        shutil.rmtree(tmp_path / "gone", ignore_errors=True)  # the file vanishes mid-run
        return toy.accuracy(state, xv, yv)

    with pytest.raises(CheckpointFormatError, match=r"gone") as e:
        greedy_soup([paths[0], tmp_path / "gone"], remove_after_first, evaluator_id="rm")
    assert "on worker" not in str(e.value) and "shared storage" not in str(e.value)
