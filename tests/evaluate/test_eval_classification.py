from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tiny_hf import LABELS, make_tokenizer, random_sentences, save_bert_classifier

from soupkit.errors import EvaluationError
from soupkit.evaluate import BoundedEvaluator, EvalResult, HFClassificationEvaluator, run_evaluator

transformers = pytest.importorskip("transformers")


def write_csv(path: Path, texts: list[str], labels: list[object]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(zip(texts, labels, strict=True))
    return path


def constant_state(model_dir: Path, cls: int) -> dict[str, torch.Tensor]:
    """Weights of `model_dir` changed so that the model predicts class `cls` for every input."""
    state = load_file(str(model_dir / "model.safetensors"))
    state["classifier.weight"] = torch.zeros_like(state["classifier.weight"])
    state["classifier.bias"] = torch.nn.functional.one_hot(torch.tensor(cls), 3).float()
    return state


def per_example_predictions(model_dir: Path, texts: list[str]) -> list[int]:
    """Reference predictions: one unpadded example at a time, no batching involved."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = make_tokenizer()
    with torch.inference_mode():
        return [int(model(**tok(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bert_classifier(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return random_sentences(60, seed=1)


def test_constant_predictor_scores_the_label_frequency(model_dir: Path, tmp_path: Path) -> None:
    labels = ["negative"] * 5 + ["neutral"] * 3 + ["positive"] * 2
    data = write_csv(tmp_path / "d.csv", random_sentences(10, seed=2), labels)
    ev = HFClassificationEvaluator(model_dir, data, batch_size=3)
    assert ev(constant_state(model_dir, 0)) == 0.5
    assert ev(constant_state(model_dir, 1)) == 0.3
    result = ev.evaluate(constant_state(model_dir, 2))
    assert result.score == 0.2 and result.complete and (result.examples, result.total) == (10, 10)


def test_accuracy_matches_unbatched_predictions(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    preds = per_example_predictions(model_dir, texts)
    # Labels agree with the model's own prediction on exactly the first 37 examples.
    labels = [LABELS[p] if i < 37 else LABELS[(p + 1) % 3] for i, p in enumerate(preds)]
    data = write_csv(tmp_path / "d.csv", texts, labels)
    state = load_file(str(model_dir / "model.safetensors"))
    for batch_size in (1, 7, 64):  # padding and length bucketing must not change predictions
        ev = HFClassificationEvaluator(model_dir, data, batch_size=batch_size)
        result = ev.evaluate(state)
        assert result.score == 37 / 60
        assert result.metrics["accuracy"] == 37 / 60


def test_loss_metric_matches_hand_computed_cross_entropy(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    labels = [i % 3 for i in range(len(texts))]
    data = write_csv(tmp_path / "d.csv", texts, labels)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = make_tokenizer()
    with torch.inference_mode():
        losses = [
            float(
                torch.nn.functional.cross_entropy(
                    model(**tok(t, return_tensors="pt")).logits, torch.tensor([y])
                )
            )
            for t, y in zip(texts, labels, strict=True)
        ]
    ev = HFClassificationEvaluator(model_dir, data, metric="neg_loss", batch_size=8)
    result = ev.evaluate(load_file(str(model_dir / "model.safetensors")))
    assert result.score == pytest.approx(-sum(losses) / len(losses), rel=1e-5)
    assert result.metrics["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_candidates_do_not_leak_into_each_other(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "d.csv", texts, [i % 3 for i in range(len(texts))])
    ev = HFClassificationEvaluator(model_dir, data, metric="neg_loss")
    a = load_file(str(model_dir / "model.safetensors"))
    b = {k: v + 0.05 * torch.randn_like(v) for k, v in a.items()}
    before = {k: v.clone() for k, v in b.items()}
    first = ev(a)
    assert ev(b) != first
    assert ev(a) == first
    assert all(torch.equal(b[k], before[k]) for k in b)  # the candidate is never modified


def test_half_precision_candidate_is_cast_on_load(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "d.csv", texts, [0] * len(texts))
    ev = HFClassificationEvaluator(model_dir, data)
    state = {
        k: v.to(torch.bfloat16) for k, v in load_file(str(model_dir / "model.safetensors")).items()
    }
    assert 0.0 <= ev(state) <= 1.0


# --- early rejection ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded(
    model_dir: Path, texts: list[str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, object]:
    """Evaluators for both metrics plus five candidates with their full scores."""
    data = write_csv(
        tmp_path_factory.mktemp("d") / "d.csv", texts, [i % 3 for i in range(len(texts))]
    )
    base = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    candidates = [base] + [
        {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(4)
    ]
    out: dict[str, object] = {"candidates": candidates}
    for metric in ("accuracy", "neg_loss"):
        ev = HFClassificationEvaluator(model_dir, data, batch_size=4, metric=metric)
        out[metric] = (ev, [ev(c) for c in candidates])
    return out


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    metric=st.sampled_from(["accuracy", "neg_loss"]),
    which=st.integers(0, 4),
    offset=st.one_of(
        st.just(0.0), st.floats(-0.3, 0.3), st.sampled_from([-1 / 60, 1 / 60, 2 / 60])
    ),
    strict=st.booleans(),
)
def test_early_rejection_decides_exactly_like_full_evaluation(
    bounded: dict[str, object], metric: str, which: int, offset: float, strict: bool
) -> None:
    ev, scores = bounded[metric]  # type: ignore[misc]
    full = scores[which]
    need = full + offset  # offset 0 is the tie: accepted by >=, rejected by >
    result = ev.evaluate(bounded["candidates"][which], need=need, strict=strict)  # type: ignore[index]
    full_decision = full > need if strict else full >= need
    assert result.meets(need, strict=strict) == full_decision
    if result.complete:
        assert result.score == full and result.examples == result.total
    else:
        assert result.score >= full  # an upper bound ...
        assert not full_decision  # ... only ever used to reject
        assert result.examples < result.total


def test_early_rejection_saves_examples_and_ties_follow_the_rule(
    bounded: dict[str, object],
) -> None:
    ev, scores = bounded["accuracy"]  # type: ignore[misc]
    candidate = bounded["candidates"][0]  # type: ignore[index]
    full = scores[0]
    hopeless = ev.evaluate(candidate, need=full + 0.3)
    assert not hopeless.complete and hopeless.examples < hopeless.total
    assert hopeless.score < full + 0.3
    tie_ge = ev.evaluate(candidate, need=full)
    assert tie_ge.complete and tie_ge.meets(full)  # >= accepts a tie, so it must finish
    tie_gt = run_evaluator(ev, candidate, need=full, strict=True, label="tie")
    assert not tie_gt.meets(full, strict=True)
    assert isinstance(ev, BoundedEvaluator)


def test_impossible_threshold_stops_before_any_example(bounded: dict[str, object]) -> None:
    ev, _ = bounded["accuracy"]  # type: ignore[misc]
    result = ev.evaluate(bounded["candidates"][0], need=1.01)  # type: ignore[index]
    assert result == EvalResult(score=1.0, examples=0, total=60, complete=False, metrics={})


# --- labels and files ----------------------------------------------------------------------------


def test_jsonl_with_integer_ids_and_text_pairs(model_dir: Path, tmp_path: Path) -> None:
    a, b = random_sentences(6, seed=3), random_sentences(6, seed=4)
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(
            json.dumps({"premise": x, "hypothesis": y, "y": i % 3}) + "\n"
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        )
    )
    ev = HFClassificationEvaluator(
        model_dir, path, text_column="premise", text_pair_column="hypothesis", label_column="y"
    )
    assert ev.total == 6 and 0.0 <= ev(constant_state(model_dir, 0)) <= 1.0
    assert ev(constant_state(model_dir, 0)) == pytest.approx(2 / 6)


def test_label_names_come_from_the_model_config(model_dir: Path, tmp_path: Path) -> None:
    data = write_csv(
        tmp_path / "d.csv", ["good", "bad", "fine"], ["positive", "negative", "neutral"]
    )
    ev = HFClassificationEvaluator(model_dir, data)
    assert ev.label_to_id == {"negative": 0, "neutral": 1, "positive": 2}


def test_unnamed_model_uses_sorted_unique_labels(tmp_path: Path) -> None:
    model_dir = save_bert_classifier(tmp_path / "m", named_labels=False)
    data = write_csv(tmp_path / "d.csv", ["good", "bad", "fine"], ["pos", "neg", "mid"])
    ev = HFClassificationEvaluator(model_dir, data)
    assert ev.label_to_id == {"mid": 0, "neg": 1, "pos": 2}
    explicit = HFClassificationEvaluator(model_dir, data, labels={"neg": 0, "mid": 1, "pos": 2})
    assert explicit.label_to_id == {"neg": 0, "mid": 1, "pos": 2}


def test_unknown_label_is_reported(model_dir: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", ["good", "bad"], ["positive", "angry"])
    with pytest.raises(
        EvaluationError, match=r"1 label value\(s\) \['angry'\] are not known.*\nhint: pass labels="
    ):
        HFClassificationEvaluator(model_dir, data)


def test_out_of_range_class_id_is_reported(model_dir: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", ["good", "bad"], [0, 7])
    with pytest.raises(
        EvaluationError, match=r"class id\(s\) \[7\] are outside the model's 3 labels"
    ):
        HFClassificationEvaluator(model_dir, data)


def test_missing_column_lists_the_columns(model_dir: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", ["good"], [0])
    with pytest.raises(
        EvaluationError,
        match=r"has no column\(s\) \['sentence'\]; its columns are \['text', 'label'\]",
    ):
        HFClassificationEvaluator(model_dir, data, text_column="sentence")


def test_bad_jsonl_line_is_named(model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 0}\n{"text": "bad", "label": 1\n')
    with pytest.raises(EvaluationError, match=r"line 2: not valid JSON"):
        HFClassificationEvaluator(model_dir, path)


def test_not_a_model_folder(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", ["good"], [0])
    with pytest.raises(
        EvaluationError, match=r"is not a Hugging Face model folder: no config.json"
    ):
        HFClassificationEvaluator(tmp_path / "nothing", data)


# --- candidates that do not fit -------------------------------------------------------------------


def test_state_problems_are_all_reported_at_once(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    data = write_csv(tmp_path / "d.csv", texts[:5], [0] * 5)
    ev = HFClassificationEvaluator(model_dir, data)
    state = load_file(str(model_dir / "model.safetensors"))
    del state["classifier.bias"]
    state["classifier.weight"] = torch.zeros(4, 32)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(EvaluationError) as info:
        ev(state)
    message = str(info.value)
    assert "1 missing: classifier.bias" in message
    assert "1 unexpected: extra.weight" in message
    assert "1 shape mismatch: classifier.weight: got [4, 32], expected [3, 32]" in message
    assert "hint:" in message
    with pytest.raises(
        EvaluationError, match=r"^evaluating candidate 'ft03' failed: the candidate's tensors"
    ):
        run_evaluator(ev, state, label="ft03")


def test_prefixed_names_get_a_hint(model_dir: Path, texts: list[str], tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", texts[:5], [0] * 5)
    ev = HFClassificationEvaluator(model_dir, data)
    state = {f"module.{k}": v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    with pytest.raises(EvaluationError, match=r"(?s)missing: .*\(\d+ more\).*prefix differs"):
        ev(state)


def test_correct_is_per_example_in_file_order(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    preds = per_example_predictions(model_dir, texts)
    # right exactly on the examples whose index is a multiple of 3
    labels = [LABELS[p] if i % 3 == 0 else LABELS[(p + 1) % 3] for i, p in enumerate(preds)]
    data = write_csv(tmp_path / "d.csv", texts, labels)
    state = load_file(str(model_dir / "model.safetensors"))
    ev = HFClassificationEvaluator(model_dir, data, batch_size=7)  # batches are length-sorted
    hits = ev.correct(state)
    assert hits.tolist() == [i % 3 == 0 for i in range(len(texts))]
    assert int(hits.sum()) / len(texts) == ev(state)
    batches = ev.labelled_batches()
    assert sum(len(b["labels"]) for b in batches) == len(texts)
    assert all(set(b) >= {"input_ids", "attention_mask", "labels"} for b in batches)


def _linear_output_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """Record the output dtype of every nn.Linear call (bfloat16 under bf16 autocast)."""
    seen: list[torch.dtype] = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


def test_autocast_runs_matrix_products_in_bfloat16(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    preds = per_example_predictions(model_dir, texts)
    data = write_csv(tmp_path / "d.csv", texts, [LABELS[p] for p in preds])
    state = load_file(str(model_dir / "model.safetensors"))
    full = HFClassificationEvaluator(model_dir, data, batch_size=8)
    amp = HFClassificationEvaluator(model_dir, data, batch_size=8, autocast="bfloat16")
    full_seen, amp_seen = _linear_output_dtypes(full.model), _linear_output_dtypes(amp.model)
    assert full(state) == 1.0
    score = amp(state)
    assert set(full_seen) == {torch.float32} and set(amp_seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in amp.model.parameters())  # weights stay float32
    # The score is the accuracy of the autocast model on the evaluator's own batches.
    hits = 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for b in amp.labelled_batches():
            labels = b.pop("labels")
            hits += int((amp.model(**b).logits.float().argmax(-1) == labels).sum())
    assert score == hits / len(texts)
    assert int(amp.correct(state).sum()) == hits
    assert score >= 0.8  # bf16 rounding flips at most a few borderline examples of a random model


def test_unknown_autocast_dtype_is_refused(model_dir: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", ["a b"], [0])
    with pytest.raises(
        EvaluationError,
        match=r"unknown autocast dtype 'int8'; expected one of \['bfloat16', 'float16'\]",
    ):
        HFClassificationEvaluator(model_dir, data, autocast="int8")


def test_per_example_scores_requested_examples_in_request_order(
    model_dir: Path, texts: list[str], tmp_path: Path
) -> None:
    from soupkit.evaluate.protocol import PerExampleEvaluator

    preds = per_example_predictions(model_dir, texts)
    labels = [LABELS[p] if i % 3 == 0 else LABELS[(p + 1) % 3] for i, p in enumerate(preds)]
    data = write_csv(tmp_path / "d.csv", texts, labels)
    state = load_file(str(model_dir / "model.safetensors"))
    ev = HFClassificationEvaluator(model_dir, data, batch_size=4)
    assert isinstance(ev, PerExampleEvaluator) and ev.n_examples() == len(texts)
    order = list(range(len(texts)))[::-1][: len(texts) - 2] + [0]
    got = ev.per_example(state, order)
    assert got.dtype == torch.float32 and got.tolist() == [float(i % 3 == 0) for i in order]
    # Over every example, the mean is the evaluator's score.
    assert float(ev.per_example(state, range(len(texts))).sum()) / len(texts) == ev(state)
    with pytest.raises(
        EvaluationError, match=r"per_example: example index\(es\) \[99\] are outside the"
    ):
        ev.per_example(state, [0, 99])
    loss = HFClassificationEvaluator(model_dir, data, batch_size=4, metric="neg_loss")
    vals = loss.per_example(state, range(len(texts)))
    assert float(vals.mean()) == pytest.approx(loss(state), rel=1e-5) and bool((vals <= 0).all())
