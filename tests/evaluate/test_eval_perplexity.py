from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import make_tokenizer, random_sentences, save_causal_lm

from soupkit.errors import EvaluationError
from soupkit.evaluate import HFCausalLMPerplexityEvaluator

transformers = pytest.importorskip("transformers")


def hand_perplexity(model_dir: Path, texts: list[str], max_length: int) -> float:
    """exp(mean NLL), one window at a time through the model's own loss (no padding)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = make_tokenizer()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tok(text)["input_ids"]
            for s in range(0, len(ids), max_length):
                window = torch.tensor([ids[s : s + max_length]])
                if window.shape[1] < 2:
                    continue
                # HF's loss is the mean over the window's predicted tokens (all but the first).
                loss = model(input_ids=window, labels=window).loss
                nll += float(loss) * (window.shape[1] - 1)
                count += window.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_perplexity_equals_exp_mean_nll(kind: str, tmp_path: Path) -> None:
    model_dir = save_causal_lm(tmp_path / kind, kind)
    texts = random_sentences(12, seed=5, hi=20)
    text_file = tmp_path / "eval.txt"
    text_file.write_text("\n".join(texts) + "\n\n")  # blank lines are not documents
    # max_length 8 cuts most documents into several windows; batch 3 mixes lengths and padding.
    ev = HFCausalLMPerplexityEvaluator(model_dir, text_file, max_length=8, batch_size=3)
    # The candidate comes from the saved file: GPT-2's tied lm_head.weight is absent from it.
    state = load_file(str(model_dir / "model.safetensors"))
    result = ev.evaluate(state)
    expected = hand_perplexity(model_dir, texts, max_length=8)
    assert result.score == pytest.approx(-expected, rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result.complete and result.examples == result.total == ev.total
    # A random model over a V-word vocabulary is close to uniform: perplexity near V.
    assert 0.5 * len(make_tokenizer()) < expected < 2 * len(make_tokenizer())


def test_perplexity_reads_jsonl_and_ranks_candidates(tmp_path: Path) -> None:
    model_dir = save_causal_lm(tmp_path / "m", "gpt2")
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in random_sentences(5, seed=6)))
    ev = HFCausalLMPerplexityEvaluator(model_dir, path, text_column="body")
    state = load_file(str(model_dir / "model.safetensors"))
    noisy = {k: v + 0.5 * torch.randn_like(v) for k, v in state.items()}
    assert ev(state) > ev(noisy)  # higher is better: the noisy model is more perplexed


def test_gpt2_state_with_both_tied_names_is_accepted(tmp_path: Path) -> None:
    model_dir = save_causal_lm(tmp_path / "m", "gpt2")
    text_file = tmp_path / "t.txt"
    text_file.write_text("the movie was good\n")
    ev = HFCausalLMPerplexityEvaluator(model_dir, text_file)
    state = load_file(str(model_dir / "model.safetensors"))
    assert "lm_head.weight" not in state
    with_head = {**state, "lm_head.weight": state["transformer.wte.weight"]}
    assert ev(with_head) == ev(state)


def test_missing_tensor_of_causal_lm_is_reported(tmp_path: Path) -> None:
    model_dir = save_causal_lm(tmp_path / "m", "llama")
    text_file = tmp_path / "t.txt"
    text_file.write_text("the movie was good\n")
    ev = HFCausalLMPerplexityEvaluator(model_dir, text_file)
    state = load_file(str(model_dir / "model.safetensors"))
    del state["lm_head.weight"]  # Llama's head is not tied, so it is really missing
    with pytest.raises(EvaluationError, match=r"1 missing: lm_head.weight"):
        ev(state)


def test_text_without_predictable_tokens(tmp_path: Path) -> None:
    model_dir = save_causal_lm(tmp_path / "m", "gpt2")
    text_file = tmp_path / "t.txt"
    text_file.write_text("\n  \n")
    with pytest.raises(EvaluationError, match=r"holds no non-empty line"):
        HFCausalLMPerplexityEvaluator(model_dir, text_file)


def test_autocast_perplexity_is_close_to_float32(tmp_path: Path) -> None:
    model_dir = save_causal_lm(tmp_path / "llama", "llama")
    text_file = tmp_path / "eval.txt"
    text_file.write_text("\n".join(random_sentences(12, seed=5, hi=20)) + "\n")
    state = load_file(str(model_dir / "model.safetensors"))
    full = HFCausalLMPerplexityEvaluator(model_dir, text_file, max_length=8, batch_size=3)
    amp = HFCausalLMPerplexityEvaluator(
        model_dir, text_file, max_length=8, batch_size=3, autocast=torch.bfloat16
    )
    a, b = full(state), amp(state)
    assert a != b and b == pytest.approx(a, rel=2e-2)  # bf16 products: close, not identical
