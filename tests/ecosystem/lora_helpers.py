"""PEFT adapters for the LoRA tests: a tiny Llama (optionally with random biases), adapters with
random non-zero factors, and comparisons with what PEFT computes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(bias: bool = False) -> Any:
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=bias,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if bias:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.normal_()
    return model


def peft_adapter(model: torch.nn.Module, folder: Path, seed: int, **lora: Any) -> Any:
    """A saved PEFT adapter with random non-zero factors (and random lora_B biases)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n and n.endswith(".bias"):
                    p.normal_()
        pm.save_pretrained(folder)
    return pm


def peft_load_problems(base: Path, adapter: Path) -> tuple[list[str], list[str]]:
    """(adapter keys PEFT expected but did not find, keys it did not use) when it loads ``adapter``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base), adapter
        )
        res = pm.load_adapter(adapter, adapter_name="check")
    return [k for k in res.missing_keys if ".check." in k or k.endswith(".check")], list(
        res.unexpected_keys
    )


def states_equal(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    assert set(got) <= set(ref)
    return [k for k in got if not torch.equal(got[k], ref[k])]
