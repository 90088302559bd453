"""The lm-evaluation-harness evaluator on a tiny causal LM and a local task (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_hf
import torch

from soupkit.errors import EvaluationError
from soupkit.search import read_state

pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install 'soupkit[lm-eval]'")

from soupkit import open_checkpoint
from soupkit.evaluate.lmeval import LMEvalEvaluator

ROWS = [
    ("the movie was very", ["good", "sad", "long"], 0),
    ("we loved it so", ["much", "bad", "dull"], 1),
    ("i hated the", ["film", "good", "fun"], 0),
    ("the music was", ["great", "awful", "dull"], 2),
]


@pytest.fixture
def task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    data = tmp_path / "toy.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in ROWS)
    )
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "soupkit_toy.yaml").write_text(
        "task: soupkit_toy\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def test_lm_eval_accuracy_on_a_local_task_equals_the_hand_computed_one(
    tmp_path: Path, task: Path
) -> None:
    model_dir = tiny_hf.save_causal_lm(tmp_path / "gpt2", "gpt2")
    ev = LMEvalEvaluator(model_dir, ["soupkit_toy"], include_path=task, batch_size=2)
    state = read_state(open_checkpoint(model_dir))
    score = ev(state)
    # by hand: the choice with the highest total log-likelihood of its tokens after the question
    model, tok = ev.model, tiny_hf.make_tokenizer()
    right = 0
    for q, choices, y in ROWS:
        lls = []
        for c in choices:
            ctx = tok(q, add_special_tokens=False)["input_ids"]
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            lls.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
        right += int(max(range(len(choices)), key=lambda i: lls[i]) == y)
    assert score == right / len(ROWS)
    # another candidate's weights are really loaded: zeroing the head changes the log-likelihoods
    # to uniform, and the first choice (argmax ties go to the first) wins everywhere
    flat = {k: (torch.zeros_like(v) if "wte" in k else v) for k, v in state.items()}
    assert ev(flat) == sum(y == 0 for *_, y in ROWS) / len(ROWS)
    assert ev.cache_key.startswith("lm-eval|soupkit_toy|acc|")
    with pytest.raises(EvaluationError, match="does not know the task"):
        LMEvalEvaluator(model_dir, ["nope"], include_path=task)
    with pytest.raises(EvaluationError, match="no metric 'bleu'"):
        LMEvalEvaluator(model_dir, ["soupkit_toy"], include_path=task, metric="bleu")(state)


def test_cli_optimize_with_lm_eval_on_two_tiny_causal_lms(
    tmp_path: Path, task: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna", reason="needs the optimize extra")
    import yaml

    from soupkit.cli import main

    a = tiny_hf.save_causal_lm(tmp_path / "a", "gpt2", seed=0)
    b = tiny_hf.save_causal_lm(tmp_path / "b", "gpt2", seed=1)
    space = {
        "merge_method": "linear",
        "models": [
            {"model": str(a), "parameters": {"weight": {"min": 0, "max": 1}}},
            {"model": str(b), "parameters": {"weight": {"min": 0, "max": 1}}},
        ],
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "optimize",
                "space.yaml",
                "--lm-eval",
                "soupkit_toy",
                "--holdout-lm-eval",
                "soupkit_toy",
                "--lm-eval-include",
                str(task),
                "--trials",
                "3",
                "--out",
                "opt",
                "--no-cache",
                "--no-progress",
                "--no-plot",
            ]
        )
        == 2
    )  # the same tasks as held-out set: refused (same identity)
    assert "same identity" in capsys.readouterr().err
    assert (
        main(
            [
                "optimize",
                "space.yaml",
                "--lm-eval",
                "soupkit_toy",
                "--lm-eval-include",
                str(task),
                "--trials",
                "3",
                "--out",
                "opt",
                "--no-cache",
                "--no-progress",
                "--no-plot",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "opt" / "report.json").read_text())
    assert report["trials_finished"] == 3 and report["evaluator"].startswith(
        "lm-eval|soupkit_toy|acc|"
    )
    assert (tmp_path / "opt" / "model" / "model.safetensors").is_file()
