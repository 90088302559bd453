"""soupkit lora extract vs mergekit-extract-lora: same inputs, same rank, how close each folded
adapter is to the fine-tune, and how long each takes.

    .venv/bin/python benchmarks/lora_extract.py [--hidden 256] [--layers 2] [--rank 16]

The fine-tune is the base plus a rank-``2*rank`` update and small noise in every Linear (so a
rank-``rank`` adapter cannot be exact), and moved norms. Prints, per Linear both tools factor,
the relative Frobenius error ``||fold - ft||_F / ||ft - base||_F`` of each, and the totals.
Needs the mergekit venv (``bash benchmarks/setup_mergekit.sh``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import soupkit

MERGEKIT = Path(__file__).resolve().parent / ".venv-mergekit" / "bin" / "mergekit-extract-lora"


def llama(
    folder: Path, state: dict[str, torch.Tensor], hidden: int, inter: int, layers: int, vocab: int
) -> None:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_hidden_layers": layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "vocab_size": vocab,
                "hidden_act": "silu",
                "max_position_embeddings": 64,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
                "torch_dtype": "float32",
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    if not MERGEKIT.is_file():
        print(f"missing {MERGEKIT}: run bash benchmarks/setup_mergekit.sh", file=sys.stderr)
        return 2
    h, inter, vocab, r = args.hidden, 2 * args.hidden, 512, args.rank
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
    }
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"}
        shapes |= {
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    base = {
        n: torch.randn(s, generator=g) * 0.02 + (1.0 if "norm" in n else 0.0)
        for n, s in shapes.items()
    }
    ft = {}
    for n, t in base.items():
        if t.dim() == 2 and "embed" not in n:
            u, v = (
                torch.randn(t.shape[0], 2 * r, generator=g),
                torch.randn(2 * r, t.shape[1], generator=g),
            )
            ft[n] = t + 0.01 * (u @ v) / r + 0.001 * torch.randn(t.shape, generator=g)
        else:
            ft[n] = t + (0.01 * torch.randn(t.shape, generator=g) if "norm" in n else 0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llama(root / "base", base, h, inter, args.layers, vocab)
        llama(root / "ft", ft, h, inter, args.layers, vocab)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                str(MERGEKIT),
                "--model",
                str(root / "ft"),
                "--base-model",
                str(root / "base"),
                "--out-path",
                str(root / "mk"),
                "--max-rank",
                str(r),
                "--quiet",
            ],
            capture_output=True,
            text=True,
        )
        t_mk = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        soupkit.extract_lora(root / "ft", root / "base", root / "ours", rank=r, progress=False)
        t_ours = time.perf_counter() - t0
        folded = {}
        for name in ("mk", "ours"):
            soupkit.fold_lora(root / name, root / "base", root / f"fold-{name}", progress=False)
            folded[name] = load_file(str(root / f"fold-{name}" / "model.safetensors"))
        linear = [
            n for n, t in ft.items() if t.dim() == 2 and "embed" not in n and n != "lm_head.weight"
        ]
        print(
            f"rank {r}, hidden {h}, {args.layers} layers: relative error ||fold - ft|| / ||ft - base||"
        )
        print(f"{'tensor':45s} {'soupkit':>12s} {'mergekit':>12s} {'difference':>12s}")
        sums = {"ours": 0.0, "mk": 0.0}
        total = 0.0
        for n in linear:
            d = (ft[n] - base[n]).double()
            total += float(d.norm() ** 2)
            errs = {}
            for k in ("ours", "mk"):
                e = float((folded[k][n].double() - ft[n].double()).norm())
                sums[k] += e * e
                errs[k] = e / float(d.norm())
            print(
                f"{n:45s} {errs['ours']:12.6g} {errs['mk']:12.6g} {errs['ours'] - errs['mk']:12.2g}"
            )
        a, b = (sums["ours"] / total) ** 0.5, (sums["mk"] / total) ** 0.5
        print(f"{'all of these':45s} {a:12.6g} {b:12.6g} {a - b:12.2g}")
        print(
            f"wall time: soupkit {t_ours:.2f} s (in process), mergekit-extract-lora {t_mk:.2f} s "
            "(a fresh process, imports included)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
