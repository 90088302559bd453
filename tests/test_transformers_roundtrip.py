"""A merged tiny Hugging Face model loads with transformers and computes what the average should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import soupkit

transformers = pytest.importorskip("transformers")


def tiny_bert(seed: int) -> transformers.BertForSequenceClassification:
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_merged_model_loads_and_matches_the_averaged_state_dict(tmp_path: Path) -> None:
    nets = [tiny_bert(s) for s in range(3)]
    paths = []
    for i, n in enumerate(nets):
        n.save_pretrained(tmp_path / f"ft{i}")  # safetensors by default
        paths.append(tmp_path / f"ft{i}")
    soupkit.uniform_soup(paths, tmp_path / "soup", progress=False, max_shard_size="20KB")
    assert (tmp_path / "soup" / "model.safetensors.index.json").is_file()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "soup"
    ).eval()

    avg = soupkit.merge_state_dicts([n.state_dict() for n in nets])
    by_hand = tiny_bert(0)
    by_hand.load_state_dict(avg)
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = merged(input_ids=ids).logits
        b = by_hand(input_ids=ids).logits
    assert torch.equal(a, b)
    # and the average really is the mean of the ingredients' parameters
    sd = merged.state_dict()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(
        sd[name], sum(n.state_dict()[name] for n in nets) / 3, rtol=0, atol=1e-7
    )
