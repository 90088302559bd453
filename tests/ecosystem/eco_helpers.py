"""Tiny models for the ecosystem tests, written by hand (no transformers model is built unless a
test needs one): Llama-shaped safetensors folders with a config.json that transformers and
mergekit both accept, and a 64-word tokenizer, imported by the tests of this package; the
fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB, HIDDEN, INTER = 64, 16, 32
MERGEKIT_PY = (
    Path(__file__).resolve().parents[2] / "benchmarks" / ".venv-mergekit" / "bin" / "python"
)


def llama_config(layers: int, **extra: object) -> dict[str, object]:
    """A config.json for a tiny LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": HIDDEN // 2,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "torch_dtype": "float32",
        **extra,
    }


def llama_state(
    seed: int,
    layers: int = 4,
    dtype: torch.dtype = torch.float32,
    base: Mapping[str, torch.Tensor] | None = None,
    scale: float = 0.02,
) -> dict[str, torch.Tensor]:
    """Random Llama weights (every tensor random, norms too); with ``base``: base + scale * noise."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    shapes |= {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        t = (
            (base[name].float() + scale * noise)
            if base is not None
            else noise * 0.2 + (1.0 if "norm" in name else 0.0)
        )
        out[name] = t.to(dtype)
    return out


def write_tokenizer(folder: Path) -> None:
    """A 64-word word-level tokenizer (tokenizer.json + tokenizer_config.json), no download."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {
        w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)])
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def write_llama(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    *,
    tokenizer: bool = False,
    config: Mapping[str, object] | None = None,
) -> Path:
    """A Hugging Face folder: model.safetensors, config.json, generation_config.json[, tokenizer]."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(state), str(folder / "model.safetensors"), metadata={"format": "pt"})
    layers = 1 + max(int(n.split(".")[2]) for n in state if n.startswith("model.layers."))
    (folder / "config.json").write_text(json.dumps(dict(config or llama_config(layers)), indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2})
    )
    if tokenizer:
        write_tokenizer(folder)
    return folder


# mergekit 0.1.5 in its own venv: each job is [cwd, recipe file, output folder, lora cache or None].
# Its loader cache is keyed by the path as written, so it is emptied between jobs (the same
# "./ft1" in another folder is another model).
_MERGEKIT_RUNNER = r"""
import json, os, sys, yaml, torch
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cwd, cfg, out, lora_cache in json.loads(sys.argv[1]):
    os.chdir(cwd)
    LoaderCache.loaders = {}
    torch.manual_seed(0)
    c = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(c, out, MergeOptions(copy_tokenizer=False, lazy_unpickle=False, out_shard_size=10**12, quiet=True,
                                   lora_merge_cache=lora_cache))
"""


def run_mergekit(jobs: list[tuple[Path, Path, Path, Path | None]], timeout: int = 900) -> None:
    """Run mergekit 0.1.5 on ``(cwd, recipe, out, lora_cache)`` jobs in one subprocess (its
    import time is paid once); raises with mergekit's stderr when it fails."""
    import json
    import subprocess

    payload = json.dumps(
        [[str(c), str(r), str(o), str(lc) if lc else None] for c, r, o, lc in jobs]
    )
    proc = subprocess.run(
        [str(MERGEKIT_PY), "-c", _MERGEKIT_RUNNER, payload],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{proc.stderr[-3000:]}")
