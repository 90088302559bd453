"""How far soupkit's default (float32 accumulation) is from mergekit 0.1.5 on real tensor shapes,
and that ``compute: exact`` closes the gap, for bf16 recipes.

One decoder layer of TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 4 key/value heads; the
vocabulary cut to 1024 rows to keep the files small) in bfloat16: a base drawn N(0, 0.02) (norm
weights near 1) and three fine-tunes that move it by N(0, 2e-4), about 1 % of each weight
matrix's norm, a typical full fine-tune. Each method's recipe is merged by mergekit (its venv,
one subprocess), by soupkit's default and by ``compute: exact``; per tensor kind it prints
``||soupkit - mergekit|| / ||mergekit||``, the same over the merge's change ``||mergekit - base||``, and the fraction of entries that differ.

    .venv/bin/python benchmarks/exact_vs_default.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/exact_vs_default.py --out benchmarks/results/exact_vs_default.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

import soupkit

BENCH = Path(__file__).resolve().parent
MERGEKIT_PY = BENCH / ".venv-mergekit" / "bin" / "python"
H, INTER, KV, V = 2048, 5632, 256, 1024
SHAPES = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
for _proj, _shape in {
    "self_attn.q_proj": (H, H),
    "self_attn.k_proj": (KV, H),
    "self_attn.v_proj": (KV, H),
    "self_attn.o_proj": (H, H),
    "mlp.gate_proj": (INTER, H),
    "mlp.up_proj": (INTER, H),
    "mlp.down_proj": (H, INTER),
    "input_layernorm": (H,),
    "post_attention_layernorm": (H,),
}.items():
    SHAPES[f"model.layers.0.{_proj}.weight"] = _shape
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "intermediate_size": INTER,
    "num_hidden_layers": 1,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": V,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}
FT = ["./ft1", "./ft2", "./ft3"]
RECIPES = {
    "linear": {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(FT, [0.5, 0.3, 0.2])],
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "parameters": {"lambda": 0.8},
        "models": [{"model": m, "parameters": {"weight": 0.5}} for m in FT],
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.5}} for m in FT],
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "./base",
        "models": [
            {"model": m, "parameters": {"weight": 0.5, "density": 0.9, "gamma": 0.01}} for m in FT
        ],
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "./base",
        "models": [{"model": m} for m in FT],
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "./base",
        "parameters": {"t": 0.4},
        "models": [{"model": "./base"}, {"model": "./ft1"}],
    },
}
RUNNER = r"""
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in json.loads(sys.argv[1]):
    c = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(c, out, MergeOptions(copy_tokenizer=False, lazy_unpickle=False, out_shard_size=10**12, quiet=True))
"""


def write_models(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {
        n: (torch.randn(s, generator=g) * 0.02 + (1.0 if "norm" in n else 0.0))
        for n, s in SHAPES.items()
    }
    for name, state in [("base", base)] + [
        (f"ft{i}", {n: t + torch.randn(t.shape, generator=g) * 2e-4 for n, t in base.items()})
        for i in (1, 2, 3)
    ]:
        (root / name).mkdir()
        save_file(
            {n: t.to(torch.bfloat16) for n, t in state.items()},
            str(root / name / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (root / name / "config.json").write_text(json.dumps(CONFIG))


def compare(
    sk: dict[str, torch.Tensor], mk: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> str:
    parts = []
    for n, m in mk.items():
        if not n.endswith(
            ("q_proj.weight", "up_proj.weight", "input_layernorm.weight", "embed_tokens.weight")
        ):
            continue
        d = sk[n].double() - m.double()
        rel = float(d.norm() / m.double().norm())
        change = float(d.norm() / (m.double() - base[n].double()).norm().clamp(min=1e-30))
        frac = float((sk[n] != m).double().mean())
        parts.append(f"{n.split('.')[-2]}: {rel:.1e} / {change:.1e} / {frac:.1%}")
    return "; ".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args()
    out = args.out.resolve() if args.out else None
    torch.set_num_threads(1)
    rows = [
        "| method (dtype: bfloat16) | `compute: exact` | default: tensor `rel / rel-to-change / entries differing` |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_models(root)
        jobs = []
        for name, r in RECIPES.items():
            (root / f"{name}.yaml").write_text(
                yaml.safe_dump({**r, "dtype": "bfloat16"}, sort_keys=False)
            )
            jobs.append([str(root / f"{name}.yaml"), str(root / f"mk-{name}")])
        proc = subprocess.run(
            [str(MERGEKIT_PY), "-c", RUNNER, json.dumps(jobs)],
            cwd=root,
            capture_output=True,
            check=False,
            text=True,
        )
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        base = load_file(str(root / "base" / "model.safetensors"))
        os.chdir(root)  # the recipes name ./base, ./ft1, ...
        for name in RECIPES:
            mk = load_file(str(root / f"mk-{name}" / "model.safetensors"))
            got = {}
            for mode in ("exact", "float32"):
                soupkit.merge(
                    root / f"{name}.yaml",
                    root / f"sk-{mode}-{name}",
                    progress=False,
                    hash_inputs=False,
                    compute=mode,
                )  # type: ignore[arg-type]
                got[mode] = load_file(str(root / f"sk-{mode}-{name}" / "model.safetensors"))
            same = all(
                torch.equal(got["exact"][n].view(torch.int16), mk[n].view(torch.int16)) for n in mk
            )
            rows.append(
                f"| `{name}` | {'bit-identical' if same else 'DIFFERS'} | {compare(got['float32'], mk, base)} |"
            )
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
