#!/usr/bin/env python
"""Generate benchmark inputs: a Llama-shaped base checkpoint and N fine-tunes of it.

Each checkpoint is a Hugging Face model folder, exactly as ``save_pretrained`` would lay it
out for a sharded bf16 Llama::

    <out>/base/config.json                              LlamaConfig (mergekit reads it)
    <out>/base/model.safetensors.index.json             {"metadata": {"total_size"}, "weight_map"}
    <out>/base/model-00001-of-00002.safetensors
    <out>/base/model-00002-of-00002.safetensors
    <out>/ft1/ ... <out>/ft4/                           same layout
    <out>/generate.json                                 the parameters used (used to skip reruns)

Values (all seeded, so the same arguments always give the same bytes):

* base: matrices ~ N(0, 0.02) (Llama's ``initializer_range``); RMSNorm weights ~ 1 + N(0, 0.02).
* fine-tune i: ``bf16(base + delta_i)`` with ``delta_i = s * (c * shared + sqrt(1 - c^2) * own_i)``,
  ``shared`` and ``own_i`` standard normal, ``s = --delta-std`` (default 0.002, a tenth of the
  weight scale) and ``c = --delta-corr`` (default 0.5). The task vectors therefore have pairwise
  cosine ~ c^2 = 0.25 and disagree in sign on about 42 % of entries (arccos(0.25) / pi), which gives TIES' sign
  election and DARE's drop-and-rescale real work to do.

Memory stays bounded: the shard headers are computed first (every shape is known up front),
then every tensor is generated and written in row chunks of at most ``CHUNK_ELEMENTS`` elements
straight into all N+1 output files, so peak memory is a few hundred MB whatever the model size.
Random numbers come from one ``torch.Generator`` per (seed, checkpoint, tensor name), so the
output never depends on the tensor order or the chunk loop.

Presets::

    python benchmarks/generate.py                 # 0.84 B params, 1.68 GB per checkpoint -> benchmarks/data/full
    python benchmarks/generate.py --scale 2       # ~2x the parameters (31 layers)     -> benchmarks/data/x2
    python benchmarks/generate.py --layers 30     # any layer count                    -> benchmarks/data/layers30
    python benchmarks/generate.py --small         # ~1.3 MB per checkpoint smoke test  -> benchmarks/data/small
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_ROOT = BENCH_DIR / "data"
#: Fixed chunk budget: it is part of the random stream layout, so changing it changes the bytes.
CHUNK_ELEMENTS = 1 << 22
#: Llama's ``initializer_range``: the std of the base model's matrices.
INIT_STD = 0.02
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder (no GQA, untied embeddings)."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    intermediate_size: int = 5504
    num_hidden_layers: int = 14
    num_attention_heads: int = 16
    num_key_value_heads: int = 16

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Return ``(name, shape)`` in ``state_dict`` order (the order HF shards in)."""
        h, i, kv = (
            self.hidden_size,
            self.intermediate_size,
            self.num_key_value_heads * self.head_dim,
        )
        out: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab_size, h))
        ]
        for layer in range(self.num_hidden_layers):
            p = f"model.layers.{layer}"
            out += [
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (i, h)),
                (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i)),
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab_size, h))]
        return out

    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def hf_config(self) -> dict[str, object]:
        """A ``LlamaConfig``-compatible ``config.json`` (what mergekit and transformers read)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": INIT_STD,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }


FULL = ModelShape()
SMALL = ModelShape(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)


@dataclass(frozen=True)
class GenerateSpec:
    """Everything that determines the generated bytes (written to ``generate.json``)."""

    shape: ModelShape
    n_finetunes: int = 4
    n_shards: int = 2
    seed: int = 0
    delta_std: float = 0.002
    delta_corr: float = 0.5
    generator_version: int = GENERATOR_VERSION
    chunk_elements: int = CHUNK_ELEMENTS
    checkpoints: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["num_params"] = self.shape.num_params()
        d["bytes_per_checkpoint"] = 2 * self.shape.num_params()
        return d


def layers_for_scale(scale: float, base: ModelShape = FULL) -> int:
    """Number of layers that makes the model ``scale`` times as large as ``base`` (in params)."""
    per_layer = ModelShape(**{**asdict(base), "num_hidden_layers": 1}).num_params()
    fixed = ModelShape(**{**asdict(base), "num_hidden_layers": 0}).num_params()
    return max(1, round((scale * base.num_params() - fixed) / (per_layer - fixed)))


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.3g} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _seed_for(seed: int, role: str, name: str) -> int:
    digest = hashlib.blake2b(
        f"{GENERATOR_VERSION}|{seed}|{role}|{name}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(seed: int, role: str, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(seed, role, name))


def _split_shards(
    tensors: Sequence[tuple[str, tuple[int, ...]]], n_shards: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into ``n_shards`` contiguous groups of about equal byte size."""
    total = sum(math.prod(s) for _, s in tensors)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(n_shards)]
    acc = 0
    for name, shape in tensors:
        k = min(n_shards - 1, (acc * n_shards) // total)
        shards[k].append((name, shape))
        acc += math.prod(shape)
    if any(not s for s in shards):
        raise ValueError(
            f"cannot split {len(tensors)} tensors into {n_shards} non-empty shards; use fewer shards"
        )
    return shards


def _safetensors_header(tensors: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """Return the full safetensors prefix (8-byte length + padded JSON) and the data size."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        meta[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors pads the header with spaces to 8 bytes
    return len(header).to_bytes(8, "little") + header, offset


def _write_chunk(fh: BinaryIO, t: torch.Tensor) -> None:
    fh.write(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())


def generate(spec: GenerateSpec, out: Path, *, progress: bool = True) -> None:
    """Write ``base`` and ``ft1..ftN`` under ``out`` (see the module docstring)."""
    if sys.byteorder != "little":
        raise RuntimeError(
            "safetensors data is little-endian; this writer only supports little-endian hosts"
        )
    names = ["base"] + [f"ft{i + 1}" for i in range(spec.n_finetunes)]
    tensors = spec.shape.tensors()
    shards = _split_shards(tensors, spec.n_shards)
    shard_files = [
        f"model-{k + 1:05d}-of-{spec.n_shards:05d}.safetensors" for k in range(spec.n_shards)
    ]
    total_size = 2 * spec.shape.num_params()
    weight_map = {name: shard_files[k] for k, shard in enumerate(shards) for name, _ in shard}

    out.mkdir(parents=True, exist_ok=True)
    tmp_dirs = {n: out / f".partial-{n}" for n in names}
    for d in tmp_dirs.values():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / "config.json").write_text(json.dumps(spec.shape.hf_config(), indent=2) + "\n")
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    std = INIT_STD
    own_scale = math.sqrt(1.0 - spec.delta_corr**2)
    t0 = time.perf_counter()
    done = 0
    for k, shard in enumerate(shards):
        prefix, data_size = _safetensors_header(shard)
        handles = [open(tmp_dirs[n] / shard_files[k], "wb") for n in names]
        try:
            for fh in handles:
                fh.write(prefix)
            for name, shape in shard:
                is_norm = len(shape) == 1
                rows = shape[0]
                cols = math.prod(shape[1:])
                step = max(1, CHUNK_ELEMENTS // cols)
                g_base = _generator(spec.seed, "base", name)
                g_shared = _generator(spec.seed, "shared", name)
                g_own = [_generator(spec.seed, f"ft{i + 1}", name) for i in range(spec.n_finetunes)]
                for r0 in range(0, rows, step):
                    n = min(step, rows - r0) * cols
                    base = torch.randn(n, generator=g_base).mul_(std)
                    if is_norm:
                        base.add_(1.0)
                    base = base.to(
                        torch.bfloat16
                    ).float()  # fine-tunes start from the stored bf16 base
                    _write_chunk(handles[0], base)
                    shared = torch.randn(n, generator=g_shared).mul_(
                        spec.delta_std * spec.delta_corr
                    )
                    for i, g in enumerate(g_own):
                        delta = (
                            torch.randn(n, generator=g)
                            .mul_(spec.delta_std * own_scale)
                            .add_(shared)
                        )
                        _write_chunk(handles[i + 1], delta.add_(base))
                done += math.prod(shape)
                if progress:
                    pct = 100.0 * done / spec.shape.num_params()
                    rate = done * 2 * len(names) / 1e9 / (time.perf_counter() - t0)
                    print(
                        f"\r  {pct:5.1f}%  {rate:.2f} GB/s written  {name:<50}",
                        end="",
                        file=sys.stderr,
                        flush=True,
                    )
            for fh in handles:
                size = fh.tell()
                if size != len(prefix) + data_size:
                    raise RuntimeError(
                        f"{fh.name}: wrote {size} bytes, expected {len(prefix) + data_size}"
                    )
        finally:
            for fh in handles:
                fh.close()
    if progress:
        print(file=sys.stderr)

    # Publish only complete folders: a crash above leaves only .partial-* behind.
    for n, d in tmp_dirs.items():
        final = out / n
        shutil.rmtree(final, ignore_errors=True)
        os.replace(d, final)
    manifest = {
        **spec.to_json(),
        "checkpoints": names,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "generate.json").write_text(json.dumps(manifest, indent=2) + "\n")


def is_up_to_date(spec: GenerateSpec, out: Path) -> bool:
    """True when ``out`` holds a complete generation with exactly these parameters."""
    manifest = out / "generate.json"
    if not manifest.is_file():
        return False
    try:
        old = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    new = spec.to_json()
    same = all(old.get(k) == v for k, v in new.items() if k != "checkpoints")
    return same and all(
        (out / c / "model.safetensors.index.json").is_file() for c in old.get("checkpoints", [])
    )


def build_spec(args: argparse.Namespace) -> tuple[GenerateSpec, Path]:
    """Turn CLI arguments into a spec and the output folder."""
    if args.small:
        shape, default_name = SMALL, "small"
    elif args.scale is not None or args.layers is not None:
        if args.scale is not None and args.layers is not None:
            raise SystemExit("error: give --scale or --layers, not both")
        layers = args.layers if args.layers is not None else layers_for_scale(args.scale)
        if layers < 1:
            raise SystemExit(f"error: --layers must be >= 1, got {layers}")
        shape = ModelShape(num_hidden_layers=layers)
        default_name = f"x{args.scale:g}" if args.scale is not None else f"layers{layers}"
    else:
        shape, default_name = FULL, "full"
    spec = GenerateSpec(
        shape=shape,
        n_finetunes=args.finetunes,
        n_shards=args.shards,
        seed=args.seed,
        delta_std=args.delta_std,
        delta_corr=args.delta_corr,
    )
    out = Path(args.out) if args.out else DEFAULT_DATA_ROOT / default_name
    return spec, out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python benchmarks/generate.py\n  python benchmarks/generate.py --scale 2\n"
        "  python benchmarks/generate.py --small --out /tmp/small",
    )
    preset = parser.add_argument_group("size (default: 0.84 B params, 14 layers)")
    preset.add_argument(
        "--small", action="store_true", help="tiny smoke-test model (~1.3 MB per checkpoint)"
    )
    preset.add_argument(
        "--scale",
        type=float,
        help="choose the layer count that gives ~SCALE x the default parameters",
    )
    preset.add_argument("--layers", type=int, help="number of decoder layers (default 14)")
    parser.add_argument(
        "--out", help="output folder (default benchmarks/data/{full,small,x<SCALE>,layers<N>})"
    )
    parser.add_argument("--finetunes", type=int, default=4, help="number of fine-tunes (default 4)")
    parser.add_argument(
        "--shards", type=int, default=2, help="safetensors shards per checkpoint (default 2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--delta-std", type=float, default=0.002, help="std of a fine-tune's delta (default 0.002)"
    )
    parser.add_argument(
        "--delta-corr",
        type=float,
        default=0.5,
        help="weight of the delta shared by all fine-tunes (0..1)",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if OUT already matches"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; the RNG is serial anyway)"
    )
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 <= args.delta_corr <= 1.0:
        parser.error(f"--delta-corr must be in [0, 1], got {args.delta_corr}")
    if args.finetunes < 1 or args.shards < 1:
        parser.error("--finetunes and --shards must be >= 1")
    torch.set_num_threads(args.threads)
    spec, out = build_spec(args)
    nbytes = 2 * spec.shape.num_params()
    params = (
        f"{spec.shape.num_params() / 1e9:.3f} B params"
        if nbytes > 1e9
        else f"{spec.shape.num_params():,} params"
    )
    if not args.force and is_up_to_date(spec, out):
        if not args.quiet:
            print(f"{out}: up to date ({params}, {_human(nbytes)} per checkpoint)")
        return 0
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free / 1e9
    need = nbytes / 1e9 * (1 + spec.n_finetunes)
    if need > free:
        raise SystemExit(
            f"error: need {need:.1f} GB for {out}, only {free:.1f} GB free on that disk"
        )
    if not args.quiet:
        print(
            f"generating {out}: {params}, {spec.shape.num_hidden_layers} layers, "
            f"{_human(nbytes)} x {1 + spec.n_finetunes} checkpoints"
        )
    t0 = time.perf_counter()
    generate(spec, out, progress=not args.quiet)
    if not args.quiet:
        print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
