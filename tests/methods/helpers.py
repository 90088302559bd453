"""Small models and a reference runner shared by the method tests."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from soupkit import methods
from soupkit.engine import tensor_seed

# Every tensor below RNG_BLOCK elements: one generator per tensor in the engine.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (11, 6),
    "model.layers.0.self_attn.q_proj.weight": (6, 6),
    "model.layers.0.mlp.up_proj.weight": (9, 6),
    "model.layers.0.input_layernorm.weight": (6,),
    "model.layers.1.self_attn.q_proj.weight": (6, 6),
    "model.layers.1.mlp.up_proj.weight": (9, 6),
    "model.layers.1.input_layernorm.weight": (6,),
    "model.norm.weight": (6,),
    "lm_head.weight": (11, 6),
}


def base_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    sd["model.position_ids"] = torch.arange(5, dtype=torch.int64)
    return sd


def finetunes(
    base: Mapping[str, torch.Tensor],
    n: int,
    seed: int = 100,
    scale: float = 0.1,
    dtype: torch.dtype | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``n`` fine-tunes: the base plus independent noise (non-float tensors copied)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        sd = {}
        for k, v in base.items():
            if v.is_floating_point():
                sd[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(dtype or v.dtype)
            else:
                sd[k] = v.clone()
        out.append(sd)
    return out


def write(folder: Path, state: Mapping[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return folder


def direct(
    method: str,
    states: Sequence[Mapping[str, torch.Tensor]],
    base: Mapping[str, torch.Tensor] | None,
    params: Any,
    name: str,
    seed: int = 0,
) -> torch.Tensor:
    """The pure method function on whole float32 tensors, seeded as the engine seeds it."""
    spec = methods.get(method)
    xs = [s[name].float().clone() for s in states]
    b = (
        base[name].float().clone()
        if (base is not None and (spec.needs_base or spec.optional_base))
        else None
    )
    if base is not None and spec.base_as_input:  # karcher: the base after the models, as mergekit
        xs.append(base[name].float().clone())
    rng = None
    if spec.stochastic:  # the tensor's counter-based stream, from its first element
        rng = methods.CounterRNG(tensor_seed(seed, name))
    return spec.call(xs, params, base=b, rng=rng)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (distinguishes -0.0 from 0.0 and NaN payloads)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(
        torch.equal(
            a.contiguous().view(torch.uint8)
            if a.element_size() == 1
            else a.contiguous().view(
                {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            ),
            b.contiguous().view(torch.uint8)
            if b.element_size() == 1
            else b.contiguous().view(
                {2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()]
            ),
        )
    )
