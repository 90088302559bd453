"""Tiny Hugging Face models built in the tests (no downloads): a 2-layer BERT classifier, a
GPT-2 and a Llama causal LM, all sharing a 40-word tokenizer. Imported by the tests of this
folder (pytest puts the folder on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = (
    "the a movie film plot actor was is very really not good great fine bad awful boring fun "
    "loved hated it and but story end music scene too long short funny sad dull i we they this "
    "that so"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = ("negative", "neutral", "positive")


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer ([CLS] text [SEP]), built without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[SEP]",
        bos_token="[CLS]",
    )


def random_sentences(n: int, seed: int, lo: int = 1, hi: int = 14) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        idx = torch.randint(0, len(WORDS), (length,), generator=g).tolist()
        out.append(" ".join(WORDS[i] for i in idx))
    return out


def save_bert_classifier(path: Path, *, seed: int = 0, named_labels: bool = True) -> Path:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    extra = (
        {"id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
        if named_labels
        else {}
    )
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
        **extra,
    )
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def save_causal_lm(path: Path, kind: str, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            bos_token_id=2,
            eos_token_id=3,
        )
    else:
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
