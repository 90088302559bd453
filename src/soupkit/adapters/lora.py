"""PEFT LoRA adapters: read them, fold them into their base, merge several exactly.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For each
adapted module ``M`` (``base_model.model.<M>.lora_A.weight``, ``.lora_B.weight``) the weight
update is the low-rank product

    delta_W = scale * B @ A,     scale = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)

with per-module ``r`` and ``lora_alpha`` from ``rank_pattern`` / ``alpha_pattern`` (matched as
PEFT matches them), transposed for ``fan_in_fan_out`` layers (GPT-2's ``Conv1D``) and for
embeddings (``lora_embedding_A`` / ``lora_embedding_B``). Convolutions use PEFT's formula.
Tensors an adapter stores whole (``modules_to_save``, e.g. a classification head, and the
``base_layer`` copy PEFT saves for adapted embeddings) replace the base model's tensor.

`fold_lora` writes ``W + delta_W`` for every adapted module, streaming the base model tensor by
tensor (memory: one base tensor plus the adapter's factors for it). With float32 weights the
result equals PEFT's ``merge_and_unload()`` bit for bit (same operations in the same order).
For half-precision weights soupkit adds in float32 and rounds once (``rounding="fp32"``, the
default); ``rounding="peft"`` reproduces PEFT's CPU path instead (delta rounded to the
adapter's dtype, then added in the weight's dtype).

`merge_loras` merges several adapters of one base *in weight space*: the task vector of adapter
i on module M is its delta ``delta_i = scale_i * B_i @ A_i`` (zero where it does not adapt M),
and any merge method combines those deltas exactly, never the factors (averaging the As and Bs
separately would add cross terms ``B_i @ A_j``). Task-vector methods (``task_arithmetic``,
``ties``, ``dare_*``, ...) receive the deltas themselves; the other methods (``delta_linear``,
the registry's ``linear``; ``slerp``, ...) receive ``W + delta_i`` in float32 and their result
minus ``W`` is the merged delta. ``linear`` is refused as ambiguous; ``peft_linear`` is PEFT's
``combination_type="linear"``, which does combine the factors (`_peft_linear`).
The result is written as a full model, or with ``rank=k`` as a new adapter of rank k: the
truncated SVD of each merged delta (``B' = U_k diag(S_k)``, ``A' = Vh_k``, ``lora_alpha = r = k``,
as PEFT's ``add_weighted_adapter(..., combination_type="svd")`` does), with the relative
Frobenius error ``||delta - B'A'||_F / ||delta||_F`` of each tensor in the report. Since adapters
come from PEFT, ``convention: peft`` is the default for methods that have conventions (TIES:
per-tensor trim, as ``add_weighted_adapter`` does); a whole-model magnitude trim
(``trim_scope: global``) is not available for adapters. A ``lora_bias`` update is written as
``lora_B.bias`` of its module (``lora_bias: true``).

`extract_lora` goes the other way: from a full fine-tune to an adapter, by the truncated SVD of
each module's ``W_ft - W_base``.

``adapter_config.json`` is validated and every ``LoraConfig`` field classified in
`soupkit.adapters.lora_config`: what soupkit cannot fold exactly (DoRA, aLoRA, trainable tokens, KaSA,
PiSSA-style initialisations, other PEFT types, ...) is refused by PEFT's name, never ignored;
grouped convolutions fail on their shapes. NaN / Inf in any output stop the run
(`NonFiniteError`) unless ``allow_nonfinite``.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from soupkit import methods
from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._util.progress import progress_bar
from soupkit._version import __version__
from soupkit.adapters.lora_config import clip, pattern_key, validate_adapter_config
from soupkit.engine import RNG_BLOCK, all_finite, tensor_seed
from soupkit.errors import (
    CheckpointFormatError,
    ConfigError,
    NonFiniteError,
    PlanError,
    SoupError,
    UsageError,
    shown,
)
from soupkit.io.card import card_front_matter, render_card
from soupkit.io.carry import first_carried
from soupkit.io.checkpoint import Checkpoint, carried_files, open_checkpoint
from soupkit.io.digest import sha256_file
from soupkit.io.header import DTYPES, TensorInfo
from soupkit.io.links import resolve_model_file
from soupkit.io.output import OutputWriter, json_bytes, report_header
from soupkit.io.reader import TensorReader
from soupkit.io.writer import OutputTensor, layout_shards, parse_size
from soupkit.methods import CounterRNG, MethodSpec, Params
from soupkit.recipe.params import LayerIndex, resolve_chain
from soupkit.recipe.schema import load_recipe

__all__ = [
    "ADAPTER_CONFIG",
    "LoraAdapter",
    "LoraModule",
    "LoraResult",
    "extract_lora",
    "fold_lora",
    "merge_loras",
    "read_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 10_000_000
_DTYPE_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
# base_model.model.<module>.lora_A[.<adapter name>].weight, lora_embedding_A[.<adapter name>]
# (an adapter name is never "weight" or "bias": ``m.lora_B.bias`` is lora_bias's bias of B)
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<name>(?!(?:weight|bias)$)[A-Za-z0-9_-]+))?(?:\.(?P<param>weight|bias))?$"
)
Rounding = Literal["fp32", "peft"]


# --------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class LoraModule:
    """One adapted module of an adapter.

    Attributes:
        module: the module path inside the model (``model.layers.0.self_attn.q_proj``).
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        a: the A factor (``lora_A.weight``, or ``lora_embedding_A``).
        b: the B factor.
        bias: ``lora_B.bias`` when the adapter trained one (``lora_bias: true``), else None.
        r: the rank (rows of A).
        alpha: ``lora_alpha`` for this module (after ``alpha_pattern``).
        scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rslora.
        fan_in_fan_out: the base weight is stored transposed (``Conv1D``).
    """

    module: str
    kind: Literal["linear", "embedding", "conv"]
    a: TensorInfo
    b: TensorInfo
    bias: TensorInfo | None
    r: int
    alpha: float
    scale: float
    fan_in_fan_out: bool

    def delta(self, reader: TensorReader, weight_shape: Sequence[int]) -> torch.Tensor:
        """``scale * B @ A`` as float32, laid out like the base weight (PEFT's get_delta_weight)."""
        a = reader.read(self.a).to(torch.float32).reshape(self.a.shape)
        b = reader.read(self.b).to(torch.float32).reshape(self.b.shape)
        if self.kind == "conv" and len(weight_shape) != len(a.shape):
            raise PlanError(
                [
                    f"LoRA module {self.module!r}: {len(a.shape)}-D convolution factors for a "
                    f"{len(weight_shape)}-D base weight {list(weight_shape)}"
                ]
            )
        if self.kind == "conv":
            if tuple(weight_shape[2:]) == (1,) * (len(weight_shape) - 2):
                sq = (b.flatten(1) @ a.flatten(1)).reshape(
                    b.shape[0], a.shape[1], *weight_shape[2:]
                )
                out = sq * self.scale
            else:
                conv = {
                    3: torch.nn.functional.conv1d,
                    4: torch.nn.functional.conv2d,
                    5: torch.nn.functional.conv3d,
                }[len(weight_shape)]
                try:
                    out = conv(a.transpose(0, 1), b).transpose(0, 1) * self.scale
                except RuntimeError as e:
                    raise PlanError(
                        [
                            f"LoRA module {self.module!r}: its convolution factors A {list(a.shape)} "
                            f"and B {list(b.shape)} do not compose ({str(e)[:200]})"
                        ]
                    ) from None
        else:
            prod = b @ a
            if self.kind == "embedding" or self.fan_in_fan_out:
                prod = prod.T
            out = prod * self.scale
        if tuple(out.shape) != tuple(weight_shape):
            raise PlanError(
                [
                    f"LoRA module {self.module!r}: B @ A has shape {list(out.shape)} but the base "
                    f"weight has {list(weight_shape)}\n    hint: the adapter was trained on "
                    "another model (or with fan_in_fan_out set wrongly, or on a grouped convolution)"
                ]
            )
        return out.contiguous()

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.b.torch_dtype


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter, known from its config and headers.

    Attributes:
        label: how messages name it.
        folder: the adapter folder.
        config: ``adapter_config.json`` as a dict.
        checkpoint: its tensors (headers only).
        modules: module path -> `LoraModule`.
        replacements: module-relative tensor name (``lm_head.weight``) -> a tensor the adapter
            stores whole (``modules_to_save``, embedding ``base_layer`` copies).
    """

    label: str
    folder: Path
    config: dict[str, Any]
    checkpoint: Checkpoint
    modules: dict[str, LoraModule]
    replacements: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for reports."""
        scales = sorted({m.scale for m in self.modules.values()})
        return {
            "label": self.label,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.config.get("target_modules"),
            "modules": len(self.modules),
            "scales": scales,
            "replaced_tensors": sorted(self.replacements),
            "files": [str(f) for f in self.checkpoint.files],
        }


def _adapter_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` by the link rule of `soupkit.io.links` (a link must stay in the folder),
    None when absent; anything but a regular file (a FIFO, a device, a folder) is refused
    before it is opened, so it can neither hang nor feed endless bytes."""
    path = resolve_model_file(folder, name, what="adapter file")
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CheckpointFormatError(f"{shown(folder / name)}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointFormatError(
            f"{shown(folder / name)}: is not a regular file (a folder, FIFO or device)\n"
            "hint: a PEFT adapter folder holds plain files"
        )
    return path


def _load_config(folder: Path, label: str) -> dict[str, Any]:
    path = _adapter_file(folder, ADAPTER_CONFIG)
    if path is None:
        raise CheckpointFormatError(
            f"{label}: no {ADAPTER_CONFIG}\nhint: give a PEFT adapter folder (what "
            "`PeftModel.save_pretrained` writes: adapter_config.json + adapter_model.safetensors)"
        )
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointFormatError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; refused")
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointFormatError(f"{path}: cannot read it as JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_adapter(
    path: str | os.PathLike[str], *, allow_pickle: bool = False, label: str | None = None
) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (config and tensor headers; no tensor data).

    Args:
        path: the adapter folder.
        allow_pickle: accept ``adapter_model.bin`` (loaded with ``torch.load(weights_only=True)``).
        label: how messages name it (default: the path).

    Raises:
        CheckpointFormatError: not an adapter folder, inconsistent factors (missing A or B,
            ranks that disagree with the config).
        UsageError: an adapter soupkit cannot fold exactly (DoRA, another PEFT type).
    """
    folder = Path(path)
    lab = label or str(path)
    if folder.is_file() and folder.name == ADAPTER_CONFIG:
        folder = folder.parent
    if not folder.is_dir():
        raise CheckpointFormatError(
            f"{lab}: not a folder\nhint: give the PEFT adapter folder (with {ADAPTER_CONFIG})"
        )
    cfg = _load_config(folder, lab)
    settings = validate_adapter_config(cfg, str(folder / ADAPTER_CONFIG))
    weights = next(
        (f for w in ADAPTER_WEIGHTS if (f := _adapter_file(folder, w)) is not None), None
    )
    if weights is None:
        raise CheckpointFormatError(
            f"{lab}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}"
        )
    ck = open_checkpoint(weights, label=f"{lab}/{weights.name}", allow_pickle=allow_pickle)
    r0, alpha0, rslora, fifo = (
        settings.r,
        settings.lora_alpha,
        settings.use_rslora,
        settings.fan_in_fan_out,
    )
    rank_pattern, alpha_pattern = settings.rank_pattern, settings.alpha_pattern
    factors: dict[str, dict[str, TensorInfo]] = {}
    replacements: dict[str, TensorInfo] = {}
    problems: list[str] = []
    for name, info in ck.tensors.items():
        rel = name[len(PREFIX) :] if name.startswith(PREFIX) else name
        if "lora_magnitude_vector" in rel:
            raise UsageError(
                f"{lab}: holds DoRA magnitude vectors ({clip(name, 300)}); soupkit does not fold DoRA\n"
                "hint: use PEFT's merge_and_unload()"
            )
        if ".token_adapter." in rel or "trainable_tokens_" in rel:
            raise UsageError(
                f"{lab}: holds a trainable tokens adapter ({clip(name, 300)}); soupkit does not fold "
                "trainable tokens\nhint: use PEFT's merge_and_unload()"
            )
        m = _FACTOR.match(rel)
        if m:
            key = m.group("kind") + ("" if m.group("param") in (None, "weight") else ".bias")
            factors.setdefault(m.group("module"), {})[key] = info
            continue
        rel = rel.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        rel = re.sub(r"\.modules_to_save\.[A-Za-z0-9_-]+\.", ".", rel)
        replacements[rel] = info
    modules: dict[str, LoraModule] = {}
    for mod, parts in factors.items():
        emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        ka, kb = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
        if ka not in parts or kb not in parts:
            problems.append(
                f"module {mod!r} has {', '.join(sorted(parts))} but not both {ka} and {kb}"
            )
            continue
        a, b = parts[ka], parts[kb]
        rk = pattern_key(list(rank_pattern), mod)
        ak = pattern_key(list(alpha_pattern), mod)
        r = rank_pattern[rk] if rk is not None else r0
        alpha = alpha_pattern[ak] if ak is not None else alpha0
        nd = len(a.shape)
        bias = parts.get("lora_B.bias")
        if (
            nd != len(b.shape)
            or not (2 <= nd <= 5)
            or (emb and nd != 2)
            or (bias is not None and tuple(bias.shape) != (b.shape[0],))
        ):
            problems.append(
                f"module {mod!r}: factors of shapes A {list(a.shape)}, B {list(b.shape)}"
                f"{'' if bias is None else f', bias {list(bias.shape)}'} are not a LoRA's "
                "(A: r x in, B: out x r, both 2-D, or both 3..5-D for a convolution)"
            )
            continue
        if r < 1 or a.shape[0] != r or b.shape[1] != r:
            problems.append(
                f"module {mod!r}: the config says r = {r} but A is {list(a.shape)} and "
                f"B is {list(b.shape)}"
            )
            continue
        kind: Literal["linear", "embedding", "conv"] = (
            "embedding" if emb else ("conv" if len(a.shape) > 2 else "linear")
        )
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        modules[mod] = LoraModule(mod, kind, a, b, bias, r, alpha, scale, fifo and kind == "linear")
    if problems:
        raise CheckpointFormatError(
            f"{lab}: inconsistent LoRA factors:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    if not modules and not replacements:
        raise CheckpointFormatError(
            f"{lab}: no LoRA factors (no '*.lora_A.weight' tensors) in {weights.name}\n"
            "hint: soupkit reads adapters saved by PEFT's save_pretrained"
        )
    return LoraAdapter(lab, folder, cfg, ck, modules, replacements)


# -------------------------------------------------------------------------------------- matching
def _match(names: Mapping[str, Any], rel: str) -> tuple[str | None, str]:
    """The base tensor for adapter-relative name ``rel`` (``m.weight``): exact, else by dropping
    leading segments of ``rel`` (adapter on ``BertForX``, base a ``BertModel``), else the unique
    base name ending in ``.rel`` (base saved with a prefix the adapter lacks)."""
    if rel in names:
        return rel, ""
    parts = rel.split(".")
    for i in range(1, len(parts) - 1):
        cand = ".".join(parts[i:])
        if cand in names:
            return cand, "dropped adapter prefix " + ".".join(parts[:i]) + "."
    ends = [n for n in names if n.endswith("." + rel)]
    if len(ends) == 1:
        return ends[0], "added base prefix " + ends[0][: -len(rel)]
    return None, ""


@dataclass
class _Target:
    """What happens to one base tensor."""

    name: str
    info: TensorInfo
    deltas: list[tuple[int, LoraModule, str]] = field(
        default_factory=list
    )  # (adapter idx, module, "weight"|"bias")
    replaced: dict[int, TensorInfo] = field(default_factory=dict)  # adapter idx -> whole tensor

    @property
    def touched(self) -> bool:
        return bool(self.deltas or self.replaced)


def _targets(
    adapters: Sequence[LoraAdapter], base: Checkpoint
) -> tuple[dict[str, _Target], list[str]]:
    targets = {n: _Target(n, i) for n, i in base.tensors.items()}
    problems: list[str] = []
    notes: list[str] = []
    for ai, ad in enumerate(adapters):
        how: set[str] = set()
        for mod, lm in ad.modules.items():
            name, why = _match(base.tensors, f"{mod}.weight")
            if name is None:
                problems.append(
                    f"{ad.label}: adapted module {mod!r} has no weight {mod + '.weight'!r} "
                    f"in {base.label}"
                )
                continue
            how.add(why)
            targets[name].deltas.append((ai, lm, "weight"))
            if lm.bias is not None:
                bname = name[: -len("weight")] + "bias"
                if bname not in targets:
                    problems.append(
                        f"{ad.label}: module {mod!r} trained a bias (lora_bias) but "
                        f"{base.label} has no {bname!r}"
                    )
                elif tuple(targets[bname].info.shape) != tuple(lm.bias.shape):
                    problems.append(
                        f"{ad.label}: module {mod!r}: lora_B.bias has shape {list(lm.bias.shape)} but "
                        f"{bname!r} in {base.label} has {list(targets[bname].info.shape)}"
                    )
                else:
                    targets[bname].deltas.append((ai, lm, "bias"))
        for rel, info in ad.replacements.items():
            name, why = _match(base.tensors, rel)
            if name is None:
                problems.append(
                    f"{ad.label}: stores {rel!r} whole (modules_to_save), but {base.label} "
                    "has no such tensor"
                )
                continue
            how.add(why)
            targets[name].replaced[ai] = info
        for why in sorted(w for w in how if w):
            notes.append(f"{ad.label}: {why} to match {base.label}")
    if problems:
        raise PlanError(problems)
    return targets, notes


# ----------------------------------------------------------------------------------------- output
@dataclass(frozen=True)
class LoraResult:
    """What `fold_lora` / `merge_loras` wrote.

    Attributes:
        out: the output folder.
        kind: ``"model"`` (full weights) or ``"adapter"`` (a new LoRA).
        changed: names of the tensors that differ from the base (model) / the adapted modules.
        svd_errors: for ``kind="adapter"``: module -> relative Frobenius error of the rank-k
            approximation of its merged delta (0 when the rank suffices).
        notes: what a user should know (prefix matching, conventions chosen).
        report: the content of ``soupkit-report.json``.
    """

    out: Path
    kind: Literal["model", "adapter"]
    changed: tuple[str, ...]
    svd_errors: dict[str, float]
    notes: tuple[str, ...]
    report: dict[str, Any]

    @property
    def max_svd_error(self) -> float:
        return max(self.svd_errors.values(), default=0.0)


@dataclass
class _FiniteCheck:
    """What to do with NaN / Inf in an output: ``sources(name)`` gives (label, tensor) pairs of
    the inputs that made output ``name``, re-read to say which one holds them."""

    allow: bool
    reader: TensorReader
    sources: Callable[[str], list[tuple[str, TensorInfo]]]
    found: list[str] = field(default_factory=list)

    def fail(self, name: str, out: torch.Tensor) -> None:
        if self.allow:
            if name not in self.found:
                self.found.append(name)
            return
        nan, inf = int(torch.isnan(out).sum()), int(torch.isinf(out).sum())
        what = " and ".join(
            x for x in (f"{nan:,} NaN" if nan else "", f"{inf:,} Inf" if inf else "") if x
        )
        allow = "or pass --allow-nonfinite (allow_nonfinite=True) to write it anyway (listed in the report)"
        culprits = []
        for label, info in self.sources(name):
            raw = self.reader.read(info)
            if raw.is_floating_point():
                n_nan, n_inf = int(torch.isnan(raw).sum()), int(torch.isinf(raw).sum())
                if n_nan or n_inf:
                    culprits.append(
                        f"{label} holds {n_nan:,} NaN and {n_inf:,} Inf in {clip(info.name, 300)}"
                    )
        if culprits:
            raise NonFiniteError(
                f"tensor {clip(name, 300)}: {what} in the output, from the inputs:\n"
                + "\n".join(f"  - {c}" for c in culprits)
                + f"\nhint: that adapter or base is broken (diverged training, a bad "
                f"conversion); leave it out, {allow}"
            )
        raise NonFiniteError(
            f"tensor {clip(name, 300)}: {what} in the output although every input is finite "
            "(float32 overflow: an extreme lora_alpha / r or merge weight, or a value beyond "
            f"the output dtype's range)\nhint: check the adapter's scale and the output dtype, {allow}"
        )


def _sources(
    ads: Sequence[LoraAdapter], base: Checkpoint, tg: _Target
) -> list[tuple[str, TensorInfo]]:
    """The input tensors that make base tensor ``tg``'s output, with the input's label."""
    out = [(f"base {base.label}", tg.info)]
    out += [(ads[ai].label, info) for ai, info in tg.replaced.items()]
    for ai, lm, part in tg.deltas:
        out += [
            (ads[ai].label, info)
            for info in ([lm.bias] if part == "bias" else [lm.a, lm.b])
            if info is not None
        ]
    return out


def _write(
    dest: Path,
    outputs: Sequence[OutputTensor],
    produce: Callable[[OutputTensor], torch.Tensor],
    *,
    force: bool,
    max_shard_size: int | str,
    files: Callable[[OutputWriter, dict[str, str]], None],
    progress: bool | None,
    desc: str,
    finite: _FiniteCheck,
    inputs: Sequence[Checkpoint],
    stem: str = "model",
) -> dict[str, str]:
    """Write ``outputs`` (each made by ``produce`` when its turn comes) as shards, then ``files``,
    into the output folder ``dest`` (never one of the ``inputs``).

    Every float output is checked for NaN / Inf (as a merge's are): `NonFiniteError` before
    anything looks complete, or with ``finite.allow`` the name goes to ``finite.found``."""
    try:
        limit = parse_size(max_shard_size)
    except ValueError as e:
        raise UsageError(f"max_shard_size: {e}") from None
    shards = layout_shards(outputs, limit)
    if stem != "model":
        if len(shards) > 1:
            limit = max(limit, sum(o.nbytes for o in outputs) + 1)
            shards = layout_shards(outputs, limit)
        shards = [
            s.__class__(f"{stem}.safetensors", s.header, s.offsets, s.tensors, s.size)
            for s in shards
        ]
    bar = progress_bar(len(outputs), progress, desc, unit="tensor")

    def checked(o: OutputTensor) -> torch.Tensor:
        t = produce(o)
        if not all_finite(t):
            finite.fail(o.name, t)
        bar.update(1)
        return t

    try:
        with OutputWriter(dest, force=force, inputs=inputs) as out:
            hashes = out.write_tensors(shards, checked)
            files(out, hashes)
    finally:
        bar.close()
    return hashes


def _file_hashes(cks: Sequence[Checkpoint]) -> list[dict[str, Any]]:
    return [
        {"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)}
        for c in cks
        for f in c.files
    ]


def _out_code(out_dtype: str | None, info: TensorInfo) -> str:
    if out_dtype is None or not info.is_float:
        return info.dtype
    if out_dtype not in _DTYPE_CODE:
        raise UsageError(f"out_dtype {out_dtype!r}: expected one of {', '.join(_DTYPE_CODE)}")
    return _DTYPE_CODE[out_dtype]


def _open_base(base: str | os.PathLike[str], allow_pickle: bool) -> Checkpoint:
    return open_checkpoint(base, allow_pickle=allow_pickle)


# transformers builds these models' layers from GPT-2's Conv1D, whose weights are stored
# [in, out]: factors written for nn.Linear would load transposed (or not at all) in PEFT
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def _conv1d_model_type(ck: Checkpoint) -> str | None:
    """The ``model_type`` of ``ck``'s ``config.json`` when it is one of `CONV1D_MODEL_TYPES`."""
    path = carried_files(ck.folder).get("config.json") if ck.folder is not None else None
    if path is None:
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    mt = obj.get("model_type") if isinstance(obj, dict) else None
    return mt if isinstance(mt, str) and mt in CONV1D_MODEL_TYPES else None


# ------------------------------------------------------------------------------------------- fold
def fold_lora(
    adapters: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    out_dtype: str | None = None,
    rounding: Rounding = "fp32",
    tokenizer_source: Literal["base", "adapter"] = "base",
    force: bool = False,
    progress: bool | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
) -> LoraResult:
    """Fold LoRA adapter(s) into their base model: ``W + scale * B @ A`` per adapted module.

    Several adapters are added one after the other, as PEFT's ``merge_and_unload`` does with
    several active adapters. The output is a Hugging Face folder (safetensors, sharded with an
    index above ``max_shard_size``, config and tokenizer files, README.md, soupkit-report.json).

    Args:
        adapters: one adapter folder, or several.
        base: the base model (folder or safetensors file) the adapters were trained on.
        out: the output folder.
        out_dtype: output dtype of float tensors (default: the base's).
        rounding: ``"fp32"``: add in float32, round once; ``"peft"``: reproduce PEFT's rounding
            for half-precision weights (identical to ``"fp32"`` for float32 weights).
        tokenizer_source: copy tokenizer files from the ``base`` (default) or the first
            ``adapter`` folder (when the adapter was trained with added tokens).
        force: replace a non-empty ``out``.
        progress: show a progress bar (default: when stderr is a terminal).
        max_shard_size: largest output shard.
        allow_pickle: accept pickle checkpoints / ``adapter_model.bin`` (``weights_only``).
        allow_nonfinite: write NaN / Inf outputs instead of stopping with `NonFiniteError`
            (they are listed in the report's ``nonfinite_tensors``).

    Returns:
        A `LoraResult` with the changed tensors.

    Raises:
        CheckpointFormatError: unreadable adapter or base.
        PlanError: an adapted module the base does not have, or shapes that disagree.
        NonFiniteError: NaN / Inf in an output (without ``allow_nonfinite``); nothing is written.
    """
    paths = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    if not paths:
        raise UsageError("no adapter given")
    if rounding not in ("fp32", "peft"):
        raise UsageError(f"rounding {rounding!r}: expected 'fp32' or 'peft'")
    ads = [read_adapter(p, allow_pickle=allow_pickle) for p in paths]
    base_ck = _open_base(base, allow_pickle)
    targets, notes = _targets(ads, base_ck)
    outputs: list[OutputTensor] = []
    for name, tg in targets.items():
        shape = tg.info.shape
        if tg.replaced:
            repl = tg.replaced[
                max(tg.replaced)
            ]  # the last adapter to store it wins, as when loading in order
            if repl.shape != shape:
                notes.append(
                    f"{name}: the adapter stores it with shape {list(repl.shape)} (base: {list(shape)})"
                )
            shape = repl.shape
        outputs.append(OutputTensor(name, _out_code(out_dtype, tg.info), shape))
    changed = tuple(n for n, tg in targets.items() if tg.touched)

    with TensorReader() as reader:

        def produce(o: OutputTensor) -> torch.Tensor:
            tg = targets[o.name]
            dt = DTYPES[o.dtype][0]
            src = tg.replaced[max(tg.replaced)] if tg.replaced else tg.info
            raw = reader.read(src).reshape(src.shape)
            if not tg.deltas:
                return raw.to(dt)
            if rounding == "peft":
                w = raw.clone()
                for _, lm, part in tg.deltas:
                    d = _delta(lm, part, reader, src.shape)
                    if lm.factor_dtype in (torch.float16, torch.bfloat16):
                        d = d.to(lm.factor_dtype)
                    w += d
                return w.to(dt)
            w32 = raw.to(torch.float32, copy=True)
            for _, lm, part in tg.deltas:
                w32 += _delta(lm, part, reader, src.shape)
            return w32.to(dt)

        def files(dst: OutputWriter, hashes: dict[str, str]) -> None:
            # config.json always comes from the base (an adapter folder has none)
            carried = dst.carry(
                first_carried(
                    [ads[0].folder, base_ck.folder]
                    if tokenizer_source == "adapter"
                    else [base_ck.folder]
                )
            )
            front = card_front_matter(
                [str(base), *map(str, paths)], tags=["lora", "peft"], relation=None
            )
            body = [
                f"# {Path(out).name}",
                "",
                f"{'These LoRA adapters were' if len(ads) > 1 else 'This LoRA adapter was'} folded into "
                f"`{base}` with [soupkit](https://pypi.org/project/soupkit/) {__version__}: "
                "W + scale * B @ A for every adapted module.",
                "",
                "## Adapters",
                "",
            ]
            body += [
                f"- `{a.label}`: r = {a.r}, lora_alpha = {a.lora_alpha:g}"
                f"{', rslora' if a.use_rslora else ''}, {len(a.modules)} module(s)"
                for a in ads
            ]
            dst.write_card(render_card(front, body))
            report = _report(
                "fold",
                ads,
                base_ck,
                hashes,
                carried,
                notes,
                {"rounding": rounding, "out_dtype": out_dtype, "changed_tensors": len(changed)},
                finite.found,
            )
            dst.write_report(report)
            result_report.update(report)

        result_report: dict[str, Any] = {}
        finite = _FiniteCheck(allow_nonfinite, reader, lambda n: _sources(ads, base_ck, targets[n]))
        _write(
            Path(out),
            outputs,
            produce,
            force=force,
            max_shard_size=max_shard_size,
            files=files,
            progress=progress,
            desc="fold lora",
            finite=finite,
            inputs=[*(a.checkpoint for a in ads), base_ck],
        )
    return LoraResult(Path(out), "model", changed, {}, tuple(notes), result_report)


def _delta(lm: LoraModule, part: str, reader: TensorReader, shape: Sequence[int]) -> torch.Tensor:
    if part == "bias":
        assert lm.bias is not None
        return reader.read(lm.bias).to(torch.float32) * lm.scale
    return lm.delta(reader, shape)


def _report(
    op: str,
    ads: Sequence[LoraAdapter],
    base: Checkpoint,
    hashes: Mapping[str, str],
    carried: Mapping[str, str],
    notes: Sequence[str],
    extra: Mapping[str, Any],
    nonfinite: Sequence[str],
) -> dict[str, Any]:
    return {
        **report_header(),
        "lora": {"operation": op, **dict(extra)},
        "inputs": {
            "base": {"label": base.label, "files": _file_hashes([base])},
            "adapters": [{**a.summary(), "files": _file_hashes([a.checkpoint])} for a in ads],
        },
        "outputs": [{"file": f, "sha256": h} for f, h in hashes.items()],
        "other_files": [{"file": f, "sha256": h} for f, h in carried.items()],
        "nonfinite_tensors": list(nonfinite),
        "notes": list(notes),
    }


# ------------------------------------------------------------------------------------------ merge
def _method_params(
    spec: MethodSpec, parameters: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Default to PEFT's convention for methods that have conventions (see the module docstring)."""
    params = dict(parameters)
    notes: list[str] = []
    presets = getattr(spec.params, "presets", None)
    if isinstance(presets, Mapping) and "peft" in presets and "convention" not in params:
        params["convention"] = "peft"
        notes.append(
            f"{spec.name}: using convention 'peft' (PEFT's add_weighted_adapter), the default "
            "for adapters; set parameters.convention to change it"
        )
    return params, notes


def merge_loras(
    adapters: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    method: str = "task_arithmetic",
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    rank: int | None = None,
    seed: int = 0,
    out_dtype: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
) -> LoraResult:
    """Merge several LoRA adapters of one base exactly in weight space.

    Args:
        adapters: the adapter folders (at least one).
        base: the base model they were trained on.
        out: the output folder.
        method: any registered merge method (``soupkit methods``); task-vector methods get the
            deltas ``scale_i * B_i @ A_i`` themselves. ``delta_linear`` is the weighted average of
            the deltas (the registry's ``linear``); ``peft_linear`` is PEFT's
            ``combination_type="linear"``, a combination of the factors; ``linear`` itself is
            refused as ambiguous (`UsageError`).
        parameters: the method's global parameters (and per-adapter defaults), as in a recipe
            (scalars, gradients, ``filter`` lists over base tensor names).
        model_parameters: per-adapter parameters (e.g. ``{"weight": 0.5}``), one per adapter.
        rank: write a new adapter of this rank (truncated SVD of each merged delta) instead of
            a full model.
        seed: seed for stochastic methods (DARE), per tensor as in file merges.
        out_dtype: output dtype (full model: of float tensors; adapter: of the factors).
        force: replace a non-empty ``out``.
        progress: show a progress bar.
        max_shard_size: largest output shard (full model).
        allow_pickle: accept pickle checkpoints / ``adapter_model.bin``.
        allow_nonfinite: write NaN / Inf outputs instead of stopping with `NonFiniteError`.

    Returns:
        A `LoraResult`; for ``rank`` its ``svd_errors`` hold each module's relative error.

    Raises:
        ConfigError: unknown method or parameters, or values the method rejects.
        UsageError: a global magnitude trim, or a rank below 1.
        PlanError: adapters that do not fit the base or each other.
    """
    if not adapters:
        raise UsageError("no adapters given\nhint: give at least one adapter folder")
    if model_parameters is not None and len(model_parameters) != len(adapters):
        raise UsageError(f"{len(model_parameters)} model_parameters for {len(adapters)} adapters")
    if rank is not None and rank < 1:
        raise UsageError(f"rank must be at least 1, got {rank}")
    if method == "linear":
        raise UsageError(
            "method 'linear' is ambiguous for LoRA adapters: PEFT's add_weighted_adapter(combination_type="
            "'linear') combines the factors (A' = sum_i sqrt(w_i*s_i) A_i, B' = sum_i sqrt(w_i*s_i) B_i, so "
            "B'A' has cross terms B_i A_j), while soupkit's merge averaged the deltas (sum_i w_i s_i B_i A_i "
            "/ sum_i w_i)\nhint: use 'delta_linear' for the average of the deltas (what 'linear' meant in "
            "soupkit before), or 'peft_linear' for PEFT's combination of the factors"
        )
    if method == "peft_linear":
        return _peft_linear(
            [read_adapter(p, allow_pickle=allow_pickle) for p in adapters],
            _open_base(base, allow_pickle),
            Path(out),
            model_parameters,
            parameters,
            rank=rank,
            out_dtype=out_dtype,
            force=force,
            progress=progress,
            max_shard_size=max_shard_size,
            allow_nonfinite=allow_nonfinite,
        )
    try:
        spec = methods.get("linear" if method == "delta_linear" else method)
    except SoupError as e:
        raise ConfigError([f"method: {e}"]) from None
    glob, notes = _method_params(spec, parameters or {})
    per = [dict(m) for m in (model_parameters or [{}] * len(adapters))]
    every = set(spec.per_model_names) | set(spec.global_names)
    bad = [k for k in glob if k not in every] + [
        k for m in per for k in m if k not in spec.per_model_names
    ]
    if bad:
        raise ConfigError(
            [
                f"unknown parameter {k!r} for method {spec.name!r} (or a global one given per "
                f"adapter); it takes: {', '.join(sorted(every)) or 'nothing'}"
                for k in dict.fromkeys(bad)
            ]
        )
    if len(adapters) < spec.min_models or (
        spec.max_models is not None and len(adapters) > spec.max_models
    ):
        raise ConfigError(
            [
                f"method {spec.name!r} takes {spec.min_models}"
                f"{'..' + str(spec.max_models) if spec.max_models else '+'} models, got {len(adapters)} adapters"
            ]
        )
    ads = [read_adapter(p, allow_pickle=allow_pickle) for p in adapters]
    base_ck = _open_base(base, allow_pickle)
    targets, match_notes = _targets(ads, base_ck)
    notes += match_notes
    layers = LayerIndex.from_names(base_ck.tensors)
    load_recipe(
        {
            "merge_method": spec.name,
            "models": [{"model": str(a), "parameters": p} for a, p in zip(adapters, per)],
            "parameters": glob,
        }
    )  # validates value shapes (scalars, gradients, filters) like a recipe
    cache: dict[tuple[Any, ...], Params] = {}
    bad_values: dict[str, str] = {}

    def params_for(name: str) -> Params | None:
        t = layers.t(name)
        values: dict[str, Any] = {}
        for key, default in spec.params.per_model.items():
            values[key] = tuple(
                v if (v := resolve_chain(key, (m, glob), name, t)) is not None else default
                for m in per
            )
        for key in spec.global_names:
            v = resolve_chain(key, (glob,), name, t)
            if v is not None:
                values[key] = v
        ck = tuple(sorted(values.items()))
        if ck not in cache:
            try:
                cache[ck] = spec.params.model_validate(values)
            except ValidationError as e:
                for err in e.errors():
                    loc = ".".join(str(x) for x in err["loc"])
                    bad_values.setdefault(
                        f"parameter {loc or '?'}: {err['msg']} (got {err.get('input')!r})", name
                    )
                return None
        p = cache[ck]
        if spec.prepass is not None and spec.prepass.scope(p) == "global":
            raise UsageError(
                f"method {spec.name!r} with a whole-model magnitude trim (trim_scope: global) "
                "is not available for LoRA merges\nhint: set trim_scope: per_tensor, or "
                "convention: peft (the default here)"
            )
        return p

    merged_names = [n for n, tg in targets.items() if tg.touched and tg.info.is_float]
    plist = {n: params_for(n) for n in merged_names}
    if bad_values:
        raise ConfigError([f"{m} for tensor {n!r}" for m, n in bad_values.items()])
    if rank is not None:
        for n in merged_names:
            if any(lm.kind == "conv" for _, lm, _ in targets[n].deltas):
                raise UsageError(
                    f"{n}: a convolution; writing a merged LoRA (--rank) supports linear and "
                    "embedding modules only\nhint: leave out --rank to write the full model"
                )
        return _merge_to_adapter(
            ads,
            base_ck,
            targets,
            spec,
            plist,
            Path(out),
            rank=rank,
            seed=seed,
            out_dtype=out_dtype,
            force=force,
            progress=progress,
            notes=notes,
            allow_nonfinite=allow_nonfinite,
            method_params={"parameters": glob, "model_parameters": per},
        )

    outputs = [
        OutputTensor(n, _out_code(out_dtype, tg.info), tg.info.shape) for n, tg in targets.items()
    ]
    with TensorReader() as reader:

        def produce(o: OutputTensor) -> torch.Tensor:
            tg = targets[o.name]
            dt = DTYPES[o.dtype][0]
            raw = reader.read(tg.info).reshape(tg.info.shape)
            if o.name not in plist:
                return raw.to(dt)
            w = raw.to(torch.float32)
            deltas = _deltas(tg, len(ads), reader, w)
            merged = _combine(spec, plist[o.name], deltas, w, seed, o.name)  # type: ignore[arg-type]
            return (w + merged).to(dt)

        def files(dst: OutputWriter, hashes: dict[str, str]) -> None:
            carried = dst.carry(first_carried([base_ck.folder]))
            _card_and_report(
                dst,
                "merge",
                ads,
                base_ck,
                hashes,
                carried,
                notes,
                spec,
                rank=None,
                extra={
                    "method": _shown(spec),
                    "parameters": glob,
                    "model_parameters": per,
                    "seed": seed,
                    "out_dtype": out_dtype,
                    "merged_tensors": len(merged_names),
                },
                result=result_report,
                nonfinite=finite.found,
            )

        result_report: dict[str, Any] = {}
        finite = _FiniteCheck(allow_nonfinite, reader, lambda n: _sources(ads, base_ck, targets[n]))
        _write(
            Path(out),
            outputs,
            produce,
            force=force,
            max_shard_size=max_shard_size,
            files=files,
            progress=progress,
            desc=f"merge loras ({_shown(spec)})",
            finite=finite,
            inputs=[*(a.checkpoint for a in ads), base_ck],
        )
    return LoraResult(Path(out), "model", tuple(merged_names), {}, tuple(notes), result_report)


def _deltas(tg: _Target, n: int, reader: TensorReader, w: torch.Tensor) -> list[torch.Tensor]:
    """Adapter i's task vector on this tensor (float32): its whole tensor minus W, plus its
    LoRA delta; zero for adapters that leave the tensor alone."""
    out = [torch.zeros_like(w) for _ in range(n)]
    for ai, info in tg.replaced.items():
        if info.shape != tg.info.shape:
            raise PlanError(
                [
                    f"{tg.name}: adapter {ai} stores it with shape {list(info.shape)}, the base has "
                    f"{list(tg.info.shape)}; merging needs equal shapes"
                ]
            )
        out[ai] = reader.read(info).to(torch.float32).reshape(w.shape) - w
    for ai, lm, part in tg.deltas:
        out[ai] += _delta(lm, part, reader, w.shape)
    return out


def _combine(
    spec: MethodSpec, p: Params, deltas: list[torch.Tensor], w: torch.Tensor, seed: int, name: str
) -> torch.Tensor:
    """The merged delta for one tensor, with the engine's seeding (see `soupkit.engine.execute`)."""

    def run(ds: list[torch.Tensor], base: torch.Tensor, rng: CounterRNG | None) -> torch.Tensor:
        if spec.kind == "task_vector":
            merged: torch.Tensor = spec.fn(ds, p, rng=rng)
            return merged
        xs = [base + d for d in ds]
        if (
            spec.base_as_input
        ):  # karcher: the base is one more input, as with a base_model in a recipe
            return spec.call([*xs, base.clone()], p, rng=rng) - base
        return spec.call(xs, p, base=base, rng=rng) - base

    if not spec.stochastic:
        return run(deltas, w, None)
    if not spec.elementwise:
        return run(deltas, w, CounterRNG(tensor_seed(seed, name)))
    flat = [d.reshape(-1) for d in deltas]
    wf = w.reshape(-1)
    out = torch.empty_like(wf)
    for a in range(0, wf.numel(), RNG_BLOCK):
        b = min(wf.numel(), a + RNG_BLOCK)
        rng = CounterRNG(tensor_seed(seed, name), a)  # the engine's blocks (L1 rescale)
        out[a:b] = run([f[a:b].clone() for f in flat], wf[a:b], rng)
    return out.reshape(w.shape)


def _shown(spec: MethodSpec) -> str:
    """The method's name for adapters: the registry's ``linear`` is reached as ``delta_linear``."""
    return "delta_linear" if spec.name == "linear" else spec.name


_PEFT_LINEAR = ("peft_linear", "https://huggingface.co/docs/peft/developer_guides/model_merging")


def _card_and_report(
    dst: OutputWriter,
    op: str,
    ads: Sequence[LoraAdapter],
    base: Checkpoint,
    hashes: Mapping[str, str],
    carried: Mapping[str, str],
    notes: Sequence[str],
    spec: MethodSpec | tuple[str, str],
    *,
    rank: int | None,
    extra: Mapping[str, Any],
    result: dict[str, Any],
    nonfinite: Sequence[str],
) -> None:
    name, paper = spec if isinstance(spec, tuple) else (_shown(spec), spec.paper)
    is_adapter = rank is not None
    front = card_front_matter(
        [base.label, *(a.label for a in ads)],
        tags=["lora", "peft", name],
        library_name="peft" if is_adapter else "transformers",
        relation="adapter" if is_adapter else "merge",
    )
    what = f"a LoRA adapter of rank {rank}" if is_adapter else "a full model"
    body = [
        f"# {dst.tmp.name if not dst.tmp.name.startswith('.soupkit') else 'Merged LoRA'}",
        "",
        f"{len(ads)} LoRA adapter(s) of `{base.label}` merged "
        + (
            "by combining their factors A and B as PEFT's add_weighted_adapter(combination_type='linear') does"
            if name == "peft_linear"
            else "exactly in weight space (their deltas scale * B @ A)"
        )
        + f" with the `{name}` method ({paper}) by "
        f"[soupkit](https://pypi.org/project/soupkit/) {__version__}, written as {what}.",
        "",
        "## Adapters",
        "",
    ]
    body += [
        f"- `{a.label}`: r = {a.r}, lora_alpha = {a.lora_alpha:g}, {len(a.modules)} module(s)"
        for a in ads
    ]
    body += [
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(dict(extra), indent=2, default=str),
        "```",
    ]
    dst.write_card(render_card(front, body))
    report = _report(op, ads, base, hashes, carried, notes, extra, nonfinite)
    dst.write_report(report)
    result.update(report)


def _merge_to_adapter(
    ads: Sequence[LoraAdapter],
    base: Checkpoint,
    targets: Mapping[str, _Target],
    spec: MethodSpec,
    plist: Mapping[str, Params | None],
    out: Path,
    *,
    rank: int,
    seed: int,
    out_dtype: str | None,
    force: bool,
    progress: bool | None,
    notes: list[str],
    method_params: Mapping[str, Any],
    allow_nonfinite: bool = False,
) -> LoraResult:
    """Merged deltas -> a PEFT adapter of rank ``rank`` by truncated SVD (factors computed
    while writing; each tensor's error goes to the report)."""
    if out_dtype is not None:
        code = _DTYPE_CODE[out_dtype]
    else:  # the factors' dtype of the first adapter
        code = next((lm.b.dtype for a in ads for lm in a.modules.values()), "F32")
    fdtype = DTYPES[code][0]
    outputs: list[OutputTensor] = []
    plan: dict[
        str, tuple[str, str, str]
    ] = {}  # output name -> (base tensor, module, "A"|"B"|"whole")
    modules: dict[
        str, tuple[str, bool, bool]
    ] = {}  # module -> (base weight name, transposed, embedding)
    bias_updates: list[str] = []
    for name in plist:
        tg = targets[name]
        lora = [lm for _, lm, part in tg.deltas if part == "weight"]
        if any(part == "bias" for _, _, part in tg.deltas) and not tg.replaced:
            bias_updates.append(
                name
            )  # lora_bias: after the weights, as lora_B.bias of their module
            continue
        if any(part == "bias" for _, _, part in tg.deltas) or (tg.replaced and not lora):
            # a whole-tensor module: stored whole (modules_to_save)
            out_name = PREFIX + name
            outputs.append(
                OutputTensor(out_name, code if tg.info.is_float else tg.info.dtype, tg.info.shape)
            )
            plan[out_name] = (name, name.rsplit(".", 1)[0], "whole")
            continue
        lm0 = lora[0]
        mod = lm0.module if all(lm.module == lm0.module for lm in lora) else name.rsplit(".", 1)[0]
        emb = lm0.kind == "embedding"
        transposed = emb or lm0.fan_in_fan_out
        rows, cols = tg.info.shape[0], tg.info.shape[1]
        out_f, in_f = (cols, rows) if transposed else (rows, cols)
        k = min(rank, out_f, in_f)
        an, bn = (
            (f"{PREFIX}{mod}.lora_embedding_A", f"{PREFIX}{mod}.lora_embedding_B")
            if emb
            else (f"{PREFIX}{mod}.lora_A.weight", f"{PREFIX}{mod}.lora_B.weight")
        )
        outputs += [OutputTensor(an, code, (k, in_f)), OutputTensor(bn, code, (out_f, k))]
        plan[an] = (name, mod, "A")
        plan[bn] = (name, mod, "B")
        modules[mod] = (name, transposed, emb)
        if k < rank:
            notes.append(
                f"{mod}: rank {rank} exceeds min(out, in) = {k}; stored at rank {k} (exact)"
            )
    # lora_bias: the merged bias update is lora_B.bias (scale 1). PEFT gives every adapted module a
    # lora_B.bias when lora_bias is set, so the others get zeros, and all need a base bias.
    by_weight = {w[: -len("weight")] + "bias": m for m, (w, _, _) in modules.items()}
    for name in bias_updates:
        if name not in by_weight:
            raise UsageError(
                f"{name}: a lora_bias update of a module that is not re-factored; writing a "
                "merged LoRA (--rank) cannot hold it\nhint: leave out --rank to write the full model"
            )
    if bias_updates:
        for bname, mod in by_weight.items():
            if bname not in targets:
                raise UsageError(
                    f"{mod}: has no bias in {base.label}, but a merged adapter with lora_bias gives "
                    "every adapted module a bias (as PEFT does)\nhint: leave out --rank to write "
                    "the full model"
                )
            out_name = f"{PREFIX}{mod}.lora_B.bias"
            outputs.append(OutputTensor(out_name, code, targets[bname].info.shape))
            plan[out_name] = (bname, mod, "bias" if bname in bias_updates else "zero")
    errors: dict[str, float] = {}
    norms: dict[str, tuple[float, float]] = {}
    pending: dict[str, torch.Tensor] = {}

    with TensorReader() as reader:

        def merged_delta(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            tg = targets[name]
            w = reader.read(tg.info).to(torch.float32).reshape(tg.info.shape)
            p = plist[name]
            assert p is not None
            return _combine(spec, p, _deltas(tg, len(ads), reader, w), w, seed, name), w

        def produce(o: OutputTensor) -> torch.Tensor:
            name, mod, part = plan[o.name]
            if part in ("bias", "zero"):
                return (
                    merged_delta(name)[0].to(fdtype)
                    if part == "bias"
                    else torch.zeros(o.shape, dtype=fdtype)
                )
            if part == "whole":
                d, w = merged_delta(name)
                return (w + d).to(DTYPES[o.dtype][0])
            if part == "B" and o.name in pending:
                return pending.pop(o.name)
            d, _ = merged_delta(name)
            _, transposed, emb = modules[mod]
            m = d.T if transposed else d  # PEFT's orientation: delta = B @ A
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            k = o.shape[0] if part == "A" else o.shape[1]
            b_f: torch.Tensor = (u[:, :k] * s[:k]).to(fdtype).contiguous()
            a_f: torch.Tensor = vh[:k].to(fdtype).contiguous()
            total = float(torch.linalg.vector_norm(m.double()))
            resid = float(torch.linalg.vector_norm(m.double() - b_f.double() @ a_f.double()))
            errors[mod] = resid / total if total > 0 else 0.0
            norms[mod] = (resid, total)
            other = (
                o.name.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
                if part == "A"
                else o.name.replace("lora_B", "lora_A").replace(
                    "lora_embedding_B", "lora_embedding_A"
                )
            )
            pending[other] = a_f if part == "B" else b_f
            return a_f if part == "A" else b_f

        def files(dst: OutputWriter, hashes: dict[str, str]) -> None:
            cfg = dict(ads[0].config)
            targets_cfg: Any
            if all(isinstance(a.config.get("target_modules"), list) for a in ads):
                targets_cfg = sorted({t for a in ads for t in a.config["target_modules"]})
            else:
                targets_cfg = sorted(modules)
            saves = (
                sorted({s for a in ads for s in (a.config.get("modules_to_save") or [])}) or None
            )
            cfg.update(
                {
                    "r": rank,
                    "lora_alpha": rank,
                    "use_rslora": False,
                    "rank_pattern": {},
                    "alpha_pattern": {},
                    "target_modules": targets_cfg,
                    "modules_to_save": saves,
                    "fan_in_fan_out": any(t for _, t, e in modules.values() if not e),
                    "base_model_name_or_path": base.label,
                    "use_dora": False,
                    "inference_mode": True,
                    "lora_bias": bool(bias_updates),
                }
            )
            dst.write(ADAPTER_CONFIG, json_bytes(cfg))
            tot_r = math.sqrt(sum(r * r for r, _ in norms.values()))
            tot = math.sqrt(sum(t * t for _, t in norms.values()))
            extra = {
                **dict(method_params),
                "method": _shown(spec),
                "rank": rank,
                "seed": seed,
                "svd": {
                    "relative_frobenius_error": {m: round(e, 8) for m, e in sorted(errors.items())},
                    "max": max(errors.values(), default=0.0),
                    "overall": tot_r / tot if tot > 0 else 0.0,
                },
            }
            _card_and_report(
                dst,
                "merge_to_adapter",
                ads,
                base,
                hashes,
                {},
                notes,
                spec,
                rank=rank,
                extra=extra,
                result=result_report,
                nonfinite=finite.found,
            )

        result_report: dict[str, Any] = {}
        finite = _FiniteCheck(
            allow_nonfinite, reader, lambda n: _sources(ads, base, targets[plan[n][0]])
        )
        _write(
            out,
            outputs,
            produce,
            force=force,
            max_shard_size="1000TB",
            files=files,
            progress=progress,
            desc=f"merge loras ({_shown(spec)}, rank {rank})",
            stem="adapter_model",
            finite=finite,
            inputs=[*(a.checkpoint for a in ads), base],
        )
    return LoraResult(out, "adapter", tuple(sorted(modules)), errors, tuple(notes), result_report)


def _peft_linear(
    ads: Sequence[LoraAdapter],
    base: Checkpoint,
    out: Path,
    model_parameters: Sequence[Mapping[str, Any]] | None,
    parameters: Mapping[str, Any] | None,
    *,
    rank: int | None,
    out_dtype: str | None,
    force: bool,
    progress: bool | None,
    max_shard_size: int | str,
    allow_nonfinite: bool,
) -> LoraResult:
    """PEFT's ``add_weighted_adapter(combination_type="linear")``: a combination of the *factors*.

    For every module, over the adapters that adapt it (scale ``s_i``, weight ``w_i``)::

        A' = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i        B' = sum_i sqrt(|w_i s_i|) B_i

    with ``lora_alpha = r`` (scale 1), in PEFT's order of operations. All adapters must have the
    same rank on a module (PEFT requires equal ``r``). Written as the full model ``W + B'A'``, or
    with ``rank`` (which must equal that ``r``) as the new adapter itself.
    """
    if parameters:
        raise ConfigError(
            [f"method 'peft_linear' takes only per-adapter weights, not {sorted(parameters)}"]
        )
    weights: list[float] = []
    for i, m in enumerate(model_parameters or [{}] * len(ads)):
        unknown = sorted(set(m) - {"weight"})
        w = m.get("weight", 1.0)
        if (
            unknown
            or isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not math.isfinite(w)
        ):
            raise ConfigError(
                [
                    f"adapter {i}: method 'peft_linear' takes one finite number 'weight' per adapter, "
                    f"got {clip(dict(m))}"
                ]
            )
        weights.append(float(w))
    targets, notes = _targets(ads, base)
    problems: list[str] = []
    for ad in ads:
        # the base_layer copy PEFT saves of an adapted embedding is the weight the factors add to (as
        # in a fold); other whole tensors (modules_to_save) are not combined by PEFT's linear
        whole = sorted(r for r in ad.replacements if r.removesuffix(".weight") not in ad.modules)
        if whole:
            problems.append(
                f"{ad.label}: stores tensors whole (modules_to_save: {clip(whole, 300)}); "
                "PEFT's linear combination does not merge them"
            )
        if any(lm.bias is not None for lm in ad.modules.values()):
            problems.append(
                f"{ad.label}: trained lora_B biases (lora_bias); PEFT's linear combination drops them"
            )
    modules: dict[str, list[tuple[int, LoraModule]]] = {}
    for name, tg in targets.items():
        lms = [(ai, lm) for ai, lm, part in tg.deltas if part == "weight"]
        if not lms:
            continue
        modules[name] = lms
        if any(lm.kind == "conv" for _, lm in lms):
            problems.append(
                f"{name}: a convolution; PEFT's linear combination needs linear or embedding modules"
            )
        elif len({lm.r for _, lm in lms}) > 1:
            problems.append(
                f"{name}: ranks {[lm.r for _, lm in lms]}; PEFT's linear combination needs equal ranks"
            )
    if problems:
        raise PlanError(
            problems
            + [
                "hint: use 'delta_linear' or 'task_arithmetic', which merge the deltas "
                "of any adapters exactly"
            ]
        )
    ranks = {lms[0][1].r for lms in modules.values()}
    if rank is not None and ranks != {rank}:
        raise UsageError(
            f"method 'peft_linear' keeps the adapters' rank {sorted(ranks)}, got rank {rank}\n"
            "hint: leave out the rank to write the full model, or give the adapters' rank"
        )

    def factors(reader: TensorReader, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        # peft.tuners.lora.model._generalized_task_arithmetic_weighted_adapter, then merge_utils.task_arithmetic
        wa, wb, a_s, b_s = [], [], [], []
        for ai, lm in modules[name]:
            ws = weights[ai] * lm.scale
            wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
            wb.append(math.sqrt(abs(ws)))
            a_s.append(reader.read(lm.a).reshape(lm.a.shape))
            b_s.append(reader.read(lm.b).reshape(lm.b.shape))
        dtype = a_s[0].dtype
        out = []
        for ts, w in ((a_s, wa), (b_s, wb)):
            stacked = torch.stack(ts, dim=0)
            wt = torch.tensor(w).to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
            out.append((wt * stacked).sum(dim=0).to(dtype))
        return out[0], out[1]

    with TensorReader() as reader:
        parts: dict[
            str, tuple[str, int]
        ] = {}  # adapter output tensor -> (base tensor, 0 for A / 1 for B)
        finite = _FiniteCheck(
            allow_nonfinite,
            reader,
            lambda n: _sources(ads, base, targets[parts[n][0] if n in parts else n]),
        )
        result_report: dict[str, Any] = {}
        extra = {"method": "peft_linear", "weights": weights, "rank": rank}
        if rank is None:
            outputs = [
                OutputTensor(n, _out_code(out_dtype, tg.info), tg.info.shape)
                for n, tg in targets.items()
            ]

            def produce(o: OutputTensor) -> torch.Tensor:
                tg = targets[o.name]
                src = tg.replaced[max(tg.replaced)] if tg.replaced else tg.info
                raw = reader.read(src).reshape(src.shape)
                if o.name not in modules:
                    return raw.to(DTYPES[o.dtype][0])
                a, b = factors(reader, o.name)
                lm = modules[o.name][0][1]
                d = b.float() @ a.float()
                d = d.T if (lm.kind == "embedding" or lm.fan_in_fan_out) else d
                return (raw.to(torch.float32) + d * 1.0).to(DTYPES[o.dtype][0])

            def files(dst: OutputWriter, hashes: dict[str, str]) -> None:
                carried = dst.carry(first_carried([base.folder]))
                _card_and_report(
                    dst,
                    "merge",
                    ads,
                    base,
                    hashes,
                    carried,
                    notes,
                    _PEFT_LINEAR,
                    rank=None,
                    extra=extra,
                    result=result_report,
                    nonfinite=finite.found,
                )

            _write(
                out,
                outputs,
                produce,
                force=force,
                max_shard_size=max_shard_size,
                files=files,
                progress=progress,
                desc="merge loras (peft_linear)",
                finite=finite,
                inputs=[*(a.checkpoint for a in ads), base],
            )
            return LoraResult(out, "model", tuple(modules), {}, tuple(notes), result_report)

        outputs = []
        for name, lms in modules.items():
            lm = lms[0][1]
            mod = name[: -len(".weight")]
            emb = lm.kind == "embedding"
            an, bn = (
                (f"{PREFIX}{mod}.lora_embedding_A", f"{PREFIX}{mod}.lora_embedding_B")
                if emb
                else (f"{PREFIX}{mod}.lora_A.weight", f"{PREFIX}{mod}.lora_B.weight")
            )
            code = _DTYPE_CODE[out_dtype] if out_dtype else lm.a.dtype
            outputs += [OutputTensor(an, code, lm.a.shape), OutputTensor(bn, code, lm.b.shape)]
            parts[an], parts[bn] = (name, 0), (name, 1)

        def produce_factor(o: OutputTensor) -> torch.Tensor:
            name, which = parts[o.name]
            return factors(reader, name)[which].to(DTYPES[o.dtype][0])

        def adapter_files(dst: OutputWriter, hashes: dict[str, str]) -> None:
            r = next(iter(ranks))
            cfg = dict(ads[0].config)
            cfg.update(
                {
                    "r": r,
                    "lora_alpha": r,
                    "use_rslora": False,
                    "rank_pattern": {},
                    "alpha_pattern": {},
                    "target_modules": sorted(
                        {n[: -len(".weight")].rsplit(".", 1)[-1] for n in modules}
                    ),
                    "base_model_name_or_path": base.label,
                    "inference_mode": True,
                }
            )
            dst.write(ADAPTER_CONFIG, json_bytes(cfg))
            _card_and_report(
                dst,
                "merge_to_adapter",
                ads,
                base,
                hashes,
                {},
                notes,
                _PEFT_LINEAR,
                rank=r,
                extra=extra,
                result=result_report,
                nonfinite=finite.found,
            )

        _write(
            out,
            outputs,
            produce_factor,
            force=force,
            max_shard_size="1000TB",
            files=adapter_files,
            progress=progress,
            desc="merge loras (peft_linear)",
            stem="adapter_model",
            finite=finite,
            inputs=[*(a.checkpoint for a in ads), base],
        )
        return LoraResult(out, "adapter", tuple(sorted(modules)), {}, tuple(notes), result_report)


# ---------------------------------------------------------------------------------------- extract
# module names (last component) of embedding layers: PEFT adapts nn.Embedding with other tensor
# names (lora_embedding_A/B) and soupkit reads headers only, so their changes are stored whole
EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens",
        "embed_positions",
        "embed_in",
        "tok_embeddings",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "shared",
        "embeddings",
    }
)


def _svd_factors(
    d: torch.Tensor, k: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Rank-``k`` truncated SVD of ``d`` (float32): ``B = U_k diag(S_k)``, ``A = Vh_k`` in
    ``dtype``, and the residual and total Frobenius norms of ``d - B @ A`` (in float64)."""
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    b = (u[:, :k] * s[:k]).to(dtype).contiguous()
    a = vh[:k].to(dtype).contiguous()
    total = float(torch.linalg.vector_norm(d.double()))
    resid = float(torch.linalg.vector_norm(d.double() - b.double() @ a.double()))
    return a, b, resid, total


def extract_lora(
    fine_tuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int,
    out_dtype: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
) -> LoraResult:
    """Extract a PEFT LoRA adapter of rank ``rank`` from a full fine-tune (mergekit-extract-lora's job).

    For every 2-D ``*.weight`` of a module that is not an embedding, the task vector
    ``delta = W_ft - W_base`` (float32) is factored by its truncated SVD, ``B = U_k diag(S_k)``,
    ``A = Vh_k`` with ``k = min(rank, out, in)`` and ``lora_alpha = r`` (scale 1; modules whose
    ``k`` is below ``rank`` get it through ``rank_pattern`` / ``alpha_pattern``). By Eckart-Young no
    rank-k adapter folds closer to the fine-tune. Every other tensor that differs from the base
    (norms, biases, embeddings, and whole modules whose bias changed) is stored whole
    (``modules_to_save``). Memory: one module's two weights and its SVD.

    Args:
        fine_tuned: the fine-tuned model (folder or safetensors file).
        base: the model it was fine-tuned from (same tensor names and shapes).
        out: the adapter folder to write (``adapter_config.json``, ``adapter_model.safetensors``).
        rank: the LoRA rank r.
        out_dtype: dtype of the factors (default float32; whole tensors keep their dtype).
        force: replace a non-empty ``out``.
        progress: show a progress bar.
        allow_pickle: accept pickle checkpoints (``weights_only``).
        allow_nonfinite: write NaN / Inf factors instead of stopping with `NonFiniteError`.

    Returns:
        A `LoraResult` of kind ``"adapter"``; ``svd_errors`` holds each module's relative
        Frobenius error ``||delta - B A||_F / ||delta||_F`` (also in the report).

    Raises:
        UsageError: a rank below 1 or an unknown ``out_dtype``.
        PlanError: the two models do not have the same tensors and shapes.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"rank must be a whole number of at least 1, got {rank!r}")
    if out_dtype is not None and out_dtype not in _DTYPE_CODE:
        raise UsageError(f"out_dtype {out_dtype!r}: expected one of {', '.join(_DTYPE_CODE)}")
    code = _DTYPE_CODE[out_dtype or "float32"]
    ft = open_checkpoint(fine_tuned, allow_pickle=allow_pickle)
    bs = _open_base(base, allow_pickle)
    conv1d = _conv1d_model_type(bs) or _conv1d_model_type(ft)
    if conv1d is not None:
        raise UsageError(
            f"{shown(bs.label)}: a {conv1d!r} model, whose layers are GPT-2's Conv1D (weights "
            "stored [in, out]); `lora extract` writes factors for nn.Linear only, which PEFT "
            "would load transposed\nhint: extract with PEFT or mergekit-extract-lora for this "
            "architecture"
        )
    problems = [
        f"{clip(n, 300)} is in {ft.label} but not in {bs.label}"
        for n in ft.tensors
        if n not in bs.tensors
    ]
    problems += [
        f"{clip(n, 300)} is in {bs.label} but not in {ft.label}"
        for n in bs.tensors
        if n not in ft.tensors
    ]
    problems += [
        f"{clip(n, 300)}: shape {list(i.shape)} in {ft.label} but {list(bs.tensors[n].shape)} in {bs.label}"
        for n, i in ft.tensors.items()
        if n in bs.tensors and i.shape != bs.tensors[n].shape
    ]
    if problems:
        raise PlanError(
            problems[:50]
            + [
                "hint: give the model this fine-tune started from; a resized vocabulary "
                "cannot be expressed as a LoRA of the base"
            ]
        )
    factored: dict[str, str] = {}  # module -> its weight's name
    for name, info in ft.tensors.items():
        mod, _, param = name.rpartition(".")
        if (
            info.is_float
            and len(info.shape) == 2
            and param == "weight"
            and mod
            and mod.rsplit(".", 1)[-1] not in EMBEDDING_NAMES
        ):
            factored[mod] = name
    notes: list[str] = []
    whole: list[str] = []
    with TensorReader() as reader:
        for (
            name,
            info,
        ) in ft.tensors.items():  # what else changed (reads the small tensors, and embeddings)
            mod = name.rpartition(".")[0]
            if factored.get(mod) == name:
                continue
            if not torch.equal(reader.read(info), reader.read(bs.tensors[name])):
                whole.append(name)
                if mod in factored:  # PEFT cannot adapt a module and also store it whole
                    notes.append(
                        f"{mod}: its {name.rpartition('.')[2]} changed too, so the module is stored whole"
                    )
        for mod in {n.rpartition(".")[0] for n in whole} & set(factored):
            whole.append(factored.pop(mod))
        if not factored and not whole:
            raise PlanError([f"{ft.label} equals {bs.label}: there is nothing to extract"])
        if not factored:  # PEFT loads no adapter without a target module
            raise PlanError(
                [
                    f"{ft.label}: no 2-D module can be factored: every changed weight's module "
                    f"changed its bias too ({len(whole)} changed tensor(s)), and a PEFT adapter "
                    "cannot both adapt a module and store it whole; an adapter with no target "
                    "module does not load",
                    "hint: soupkit does not write lora_bias adapters yet; fold-free options: "
                    "merge the full fine-tune, or train the adapter with PEFT",
                ]
            )
        outputs: list[OutputTensor] = []
        ranks: dict[str, int] = {}
        for mod, name in factored.items():
            rows, cols = ft.tensors[name].shape
            k = ranks[mod] = min(rank, rows, cols)
            outputs += [
                OutputTensor(f"{PREFIX}{mod}.lora_A.weight", code, (k, cols)),
                OutputTensor(f"{PREFIX}{mod}.lora_B.weight", code, (rows, k)),
            ]
        whole.sort(key=list(ft.tensors).index)
        outputs += [
            OutputTensor(PREFIX + n, ft.tensors[n].dtype, ft.tensors[n].shape) for n in whole
        ]
        errors: dict[str, float] = {}
        norms: dict[str, tuple[float, float]] = {}
        pending: dict[str, torch.Tensor] = {}

        def produce(o: OutputTensor) -> torch.Tensor:
            if o.name in pending:
                return pending.pop(o.name)
            rel = o.name[len(PREFIX) :]
            if rel in ft.tensors:
                return reader.read(ft.tensors[rel]).reshape(o.shape)
            is_a = rel.endswith(".lora_A.weight")
            mod = rel.removesuffix(".lora_A.weight" if is_a else ".lora_B.weight")
            w = factored[mod]
            d = reader.read(ft.tensors[w]).to(torch.float32) - reader.read(bs.tensors[w]).to(
                torch.float32
            )
            rows, cols = ft.tensors[w].shape
            if not all_finite(
                d
            ):  # no SVD of NaN: refuse (or, allowed, write NaN factors; no error figure)
                finite.fail(o.name, d)
                a = torch.full((ranks[mod], cols), math.nan, dtype=DTYPES[code][0])
                b = torch.full((rows, ranks[mod]), math.nan, dtype=DTYPES[code][0])
            else:
                a, b, resid, total = _svd_factors(
                    d.reshape(rows, cols), ranks[mod], DTYPES[code][0]
                )
                errors[mod] = resid / total if total > 0 else 0.0
                norms[mod] = (resid, total)
            pending[f"{PREFIX}{mod}.lora_{'B' if is_a else 'A'}.weight"] = b if is_a else a
            return a if is_a else b

        def sources(n: str) -> list[tuple[str, TensorInfo]]:
            rel = n[len(PREFIX) :]
            w = factored.get(rel.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight"), rel)
            return [(f"fine-tune {ft.label}", ft.tensors[w]), (f"base {bs.label}", bs.tensors[w])]

        def files(dst: OutputWriter, hashes: dict[str, str]) -> None:
            small = {m: k for m, k in ranks.items() if k != rank}
            saves = sorted({n.rpartition(".")[0] for n in whole}) or None
            cfg = {
                "peft_type": "LORA",
                "task_type": None,
                "base_model_name_or_path": bs.label,
                "r": rank,
                "lora_alpha": rank,
                "target_modules": sorted(factored),
                "modules_to_save": saves,
                "rank_pattern": small,
                "alpha_pattern": dict(small),
                "use_rslora": False,
                "fan_in_fan_out": False,
                "bias": "none",
                "lora_dropout": 0.0,
                "init_lora_weights": True,
                "use_dora": False,
                "lora_bias": False,
                "inference_mode": True,
            }
            dst.write(ADAPTER_CONFIG, json_bytes(cfg))
            tot_r = math.sqrt(sum(r * r for r, _ in norms.values()))
            tot = math.sqrt(sum(t * t for _, t in norms.values()))
            svd = {
                "relative_frobenius_error": {m: round(e, 8) for m, e in sorted(errors.items())},
                "max": max(errors.values(), default=0.0),
                "overall": tot_r / tot if tot > 0 else 0.0,
            }
            front = card_front_matter(
                [str(base), str(fine_tuned)],
                tags=["lora", "peft", "extract"],
                library_name="peft",
                relation="adapter",
            )
            body = [
                f"# {Path(out).name}",
                "",
                f"A rank-{rank} LoRA adapter of `{bs.label}` extracted from the fine-tune `{ft.label}` by "
                f"[soupkit](https://pypi.org/project/soupkit/) {__version__}: the truncated SVD of each "
                f"module's weight difference ({len(factored)} module(s)); {len(whole)} other changed "
                f"tensor(s) stored whole. Relative Frobenius error: overall {svd['overall']:.3g}, "
                f"max {svd['max']:.3g} (per module in soupkit-report.json).",
            ]
            dst.write_card(render_card(front, body))
            report = {
                **report_header(),
                "lora": {
                    "operation": "extract",
                    "rank": rank,
                    "out_dtype": out_dtype or "float32",
                    "modules": len(factored),
                    "stored_whole": whole,
                    "svd": svd,
                },
                "inputs": {
                    "fine_tuned": {"label": ft.label, "files": _file_hashes([ft])},
                    "base": {"label": bs.label, "files": _file_hashes([bs])},
                },
                "outputs": [{"file": f, "sha256": h} for f, h in hashes.items()],
                "nonfinite_tensors": list(finite.found),
                "notes": notes,
            }
            dst.write_report(report)
            result_report.update(report)

        result_report: dict[str, Any] = {}
        finite = _FiniteCheck(allow_nonfinite, reader, sources)
        _write(
            Path(out),
            outputs,
            produce,
            force=force,
            max_shard_size="1000TB",
            files=files,
            progress=progress,
            desc=f"extract lora (rank {rank})",
            stem="adapter_model",
            finite=finite,
            inputs=[ft, bs],
        )
    return LoraResult(
        Path(out), "adapter", tuple(sorted(factored)), errors, tuple(notes), result_report
    )
