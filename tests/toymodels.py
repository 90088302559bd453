"""Tiny checkpoints for the top-level tests (importable: ``from toymodels import ...``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_state(
    seed: int, dtype: torch.dtype = torch.float32, layers: int = 2
) -> dict[str, torch.Tensor]:
    """A small Llama-shaped state dict with a non-float buffer."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(50, 8, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(16, 8, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=g)
    sd["model.norm.weight"] = torch.randn(8, generator=g)
    sd["lm_head.weight"] = torch.randn(50, 8, generator=g)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    sd["model.position_ids"] = torch.arange(12, dtype=torch.int64)
    return sd


def write_model(folder: Path, state: Mapping[str, torch.Tensor], *, config: bool = True) -> Path:
    """Write ``state`` as a Hugging Face style folder with model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
        (folder / "tokenizer_config.json").write_text("{}")
    return folder
