"""Resolve what a user calls "a model" into validated headers, from headers alone.

Accepted forms:

- a ``.safetensors`` file;
- a folder with ``model.safetensors``;
- a sharded folder with ``model.safetensors.index.json`` (Hugging Face layout);
- a folder holding exactly one ``*.safetensors`` file.

Pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can run code when loaded and are
refused with `UnsafeFormatError` unless the caller opts in (``allow_pickle=True``); then they
are loaded only through ``torch.load(weights_only=True)`` (see `soupkit.io.pickle_ckpt`) as a
single file, a folder with ``pytorch_model.bin`` or exactly one pickle, or a sharded folder
with ``pytorch_model.bin.index.json``.

Every path an index names is checked to stay inside the model folder (no ``..``, no absolute
paths, no symlinks that lead out: the rule of `soupkit.io.links`, which lets a Hugging Face
cache snapshot's links into its ``blobs/`` through), and the index must agree with the shards'
own headers. `carried_files` applies the same rule to the config and tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointFormatError, UnsafeFormatError, shown
from soupkit.io.header import FileStamp, TensorInfo, dtype_code, file_stamp, read_safetensors_header
from soupkit.io.hub import HubSource, parse_hub_ref, resolve_hub_model
from soupkit.io.links import resolve_model_file
from soupkit.io.pickle_ckpt import load_pickle_state_dict

__all__ = [
    "CARRY_FILES",
    "Checkpoint",
    "MAX_CARRY_BYTES",
    "PICKLE_SUFFIXES",
    "carried_files",
    "in_memory_checkpoint",
    "open_checkpoint",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAME = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_INDEX_BYTES = 50_000_000

# Files carried from the base (or first) model folder into the output: configuration and
# tokenizer. Never code (*.py): a merged model must not smuggle remote code along.
CARRY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


# A config or tokenizer file larger than this is refused when the merge is planned, before it is
# read (the largest tokenizer.json files of current models are about 35 MB).
MAX_CARRY_BYTES = 100_000_000


def carried_files(folder: Path) -> dict[str, Path]:
    """The config and tokenizer files (`CARRY_FILES`) of ``folder`` that go to the output.

    Each is found by the link rule (`resolve_model_file`), must be a regular file and at most
    `MAX_CARRY_BYTES`; checked from ``stat`` alone, nothing is read.

    Returns:
        File name -> resolved path, for the files that exist.

    Raises:
        CheckpointFormatError: a file that breaks the link rule, is not a regular file, or is too
            large; the message names it and the limit.
    """
    out: dict[str, Path] = {}
    for name in CARRY_FILES:
        f = resolve_model_file(folder, name, what="carried file")
        if f is None:
            continue
        try:
            st = f.stat()
        except OSError as e:
            raise CheckpointFormatError(
                f"{shown(folder / name)}: cannot read ({e.strerror})"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointFormatError(
                f"{shown(folder / name)}: is not a regular file (a folder, FIFO "
                "or device); it would be copied to the output\nhint: remove it"
            )
        if st.st_size > MAX_CARRY_BYTES:
            raise CheckpointFormatError(
                f"{shown(folder / name)}: {st.st_size:,} bytes; config and tokenizer files larger than "
                f"{MAX_CARRY_BYTES:,} bytes are not carried to the output\nhint: the file is corrupt "
                "or hostile; remove it, or give `tokenizer_source:` a folder with sane files"
            )
        out[name] = f
    return out


@dataclass(frozen=True)
class Checkpoint:
    """One input model, known from its headers.

    Attributes:
        label: how messages name it (the path as the user wrote it).
        path: the resolved path (file or folder); None for in-memory models.
        folder: the folder holding config/tokenizer files, if any.
        files: the safetensors files that hold its tensors.
        tensors: tensor name -> `TensorInfo`, in storage order.
        notes: things a user should know about how it was read (e.g. a Lightning nesting).
        hub: for a model named by Hub id, the revision and files it resolved to.
        stamps: each file's identity (`soupkit.io.header.file_stamp`) when its header was read:
            a run refuses a file that no longer matches (rewritten after planning).
    """

    label: str
    path: Path | None
    folder: Path | None
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo] = field(repr=False)
    notes: tuple[str, ...] = ()
    hub: HubSource | None = None
    stamps: Mapping[Path, FileStamp] = field(default_factory=dict, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())


def _refuse_pickle(p: Path) -> UnsafeFormatError:
    return UnsafeFormatError(
        f"{shown(p)}: is a pickle checkpoint ({p.suffix}); loading a pickle can execute arbitrary "
        "code hidden in the file, so soupkit refuses it by default\n"
        "hint: convert it to safetensors, or if you trust the file opt in with "
        "--allow-pickle (it is then loaded only with torch.load(weights_only=True))"
    )


def _regular(folder: Path, name: str, what: str = "file") -> Path | None:
    """``folder/name`` resolved by the link rule if it is a regular file, else None."""
    f = resolve_model_file(folder, name, what=what)
    return f if f is not None and f.is_file() else None


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_index(folder: Path, name: str = INDEX_NAME) -> dict[str, str]:
    idx = folder / name
    real = _regular(folder, name, "index") or idx
    try:
        size = real.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise CheckpointFormatError(
                f"{shown(idx)}: {size} bytes; an index larger than "
                f"{MAX_INDEX_BYTES} bytes is refused"
            )
        obj = json.loads(real.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise CheckpointFormatError(
            f"{shown(idx)}: names key {shown(e.args[0], quote=True)} twice in one object\n"
            "hint: the index is ambiguous; it is corrupt or hostile"
        ) from None
    except RecursionError:
        raise CheckpointFormatError(f"{shown(idx)}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, huge integer literals
        raise CheckpointFormatError(f"{shown(idx)}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointFormatError(f"{shown(idx)}: cannot read ({e.strerror})") from None
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
    ):
        raise CheckpointFormatError(
            f"{shown(idx)}: expected an object with a 'weight_map' of tensor name -> shard file name"
        )
    return wm


def _shard_paths(folder: Path, idx: Path, wm: Mapping[str, str]) -> dict[str, Path]:
    """Resolve the shard names of a weight_map by the link rule (`resolve_model_file`)."""
    shards: dict[str, Path] = {}
    for fname in dict.fromkeys(wm.values()):
        try:
            shard = resolve_model_file(folder, fname, what="shard")
        except CheckpointFormatError as e:
            raise CheckpointFormatError(
                f"{shown(idx)}: weight_map points outside the model folder: {shown(fname, quote=True)}\n"
                "hint: shard names must be plain file names inside the folder (no '..', no "
                "absolute paths, no symlinks that lead out except a Hugging Face cache snapshot's into "
                "its blobs/); a hostile index may try to read "
                f"other files\n({e})"
            ) from None
        if shard is None or not shard.is_file():
            raise CheckpointFormatError(
                f"{shown(idx)}: shard {shown(fname, quote=True)} listed in weight_map does not exist"
            )
        shards[fname] = shard
    return shards


def _open_sharded(folder: Path, label: str) -> Checkpoint:
    wm = _read_index(folder)
    idx = folder / INDEX_NAME
    shards = _shard_paths(folder, idx, wm)
    tensors: dict[str, TensorInfo] = {}
    problems: list[str] = []
    stamps: dict[Path, FileStamp] = {}
    for fname, shard in shards.items():
        header = read_safetensors_header(shard)
        stamps[shard] = header.stamp
        for name, info in header.tensors.items():
            if name in tensors:
                first = tensors[name].file
                problems.append(
                    f"tensor {shown(name, quote=True)} is stored in two shards "
                    f"({shown(first.name) if first is not None else '?'} and {shown(fname)})"
                )
            elif wm.get(name) != fname:
                where = wm.get(name)
                problems.append(
                    f"tensor {shown(name, quote=True)} is in shard {shown(fname)} but the index says "
                    f"{where if where else 'nothing'}"
                )
            tensors[name] = info
    for name, fname in wm.items():
        if name not in tensors:
            problems.append(
                f"index maps {shown(name, quote=True)} to {shown(fname)}, but that shard has no such tensor"
            )
    if problems:
        listed = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise CheckpointFormatError(
            f"{shown(idx)}: index and shard headers disagree:\n"
            + "\n".join(f"  - {m}" for m in listed)
        )
    # storage order: by index order of shards, then offset
    order = {f: i for i, f in enumerate(shards.values())}
    ordered = sorted(tensors.values(), key=lambda t: (order[t.file] if t.file else 0, t.start))
    return Checkpoint(
        label, folder, folder, tuple(shards.values()), {t.name: t for t in ordered}, stamps=stamps
    )


def _stamp(p: Path) -> FileStamp:
    try:
        return file_stamp(os.stat(p))
    except OSError as e:
        raise CheckpointFormatError(f"{shown(p)}: cannot read ({e.strerror})") from None


def _open_pickle(p: Path, label: str, folder: Path) -> Checkpoint:
    stamp = _stamp(p)  # before loading: a rewrite while it loads is caught too
    state, note = load_pickle_state_dict(p)
    ck = in_memory_checkpoint(state, label)
    return dataclasses.replace(
        ck, path=p, folder=folder, files=(p,), notes=(note,) if note else (), stamps={p: stamp}
    )


def _open_pickle_sharded(folder: Path, label: str) -> Checkpoint:
    idx = folder / PICKLE_INDEX_NAME
    wm = _read_index(folder, PICKLE_INDEX_NAME)
    shards = _shard_paths(folder, idx, wm)
    state: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    problems: list[str] = []
    stamps = {shard: _stamp(shard) for shard in shards.values()}
    for fname, shard in shards.items():
        part, note = load_pickle_state_dict(shard)
        if note:
            notes.append(note)
        for name, t in part.items():
            if name in state:
                problems.append(f"tensor {shown(name, quote=True)} is stored in two shards")
            elif wm.get(name) != fname:
                problems.append(
                    f"tensor {shown(name, quote=True)} is in shard {shown(fname)} but the index says "
                    f"{wm.get(name) or 'nothing'}"
                )
            state[name] = t
    problems += [
        f"index maps {shown(n, quote=True)} to {shown(f)}, but that shard has no such tensor"
        for n, f in wm.items()
        if n not in state
    ]
    if problems:
        listed = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise CheckpointFormatError(
            f"{shown(idx)}: index and shards disagree:\n" + "\n".join(f"  - {m}" for m in listed)
        )
    ck = in_memory_checkpoint(state, label)
    return dataclasses.replace(
        ck,
        path=folder,
        folder=folder,
        files=tuple(shards.values()),
        notes=tuple(notes),
        stamps=stamps,
    )


def open_checkpoint(
    path: str | os.PathLike[str],
    *,
    label: str | None = None,
    allow_pickle: bool = False,
) -> Checkpoint:
    """Resolve ``path`` into a `Checkpoint`, reading and validating headers only.

    Args:
        path: a ``.safetensors`` file, or a model folder (single file or sharded with an index),
            or a Hub id (``owner/name[@revision]``) that is not a local path (see
            `soupkit.io.hub`: cache first, downloaded unless ``HF_HUB_OFFLINE`` is set).
        label: how error messages name this model (default: the path as given).
        allow_pickle: accept PyTorch pickle checkpoints, loaded only through
            ``torch.load(weights_only=True)`` into memory-mapped in-memory tensors.

    Raises:
        CheckpointFormatError: the path does not exist (nor resolves as a Hub id), holds no
            checkpoint, or is malformed.
        UsageError: a Hub id without huggingface_hub installed (the ``hub`` extra).
        UnsafeFormatError: the path is a pickle checkpoint and ``allow_pickle`` is false, or
            the pickle holds more than a plain state dict.
    """
    p = Path(path)
    lab = label if label is not None else str(path)
    if "\x00" in str(path):
        raise CheckpointFormatError(f"{shown(lab, quote=True)}: a path cannot contain a NUL byte")
    if not p.exists():
        ref = parse_hub_ref(str(path))
        if ref is None:
            raise CheckpointFormatError(f"{shown(lab)}: no such file or folder")
        # not a local path but a Hub id: the cache's snapshot (downloaded if allowed), opened as a folder
        folder, src = resolve_hub_model(*ref, label=lab)
        ck = open_checkpoint(folder, label=lab)
        return dataclasses.replace(ck, notes=(*ck.notes, src.note(lab)), hub=src)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(p)
            return _open_pickle(p, lab, p.parent)
        header = read_safetensors_header(p)
        return Checkpoint(lab, p, p.parent, (p,), header.tensors, stamps={p: header.stamp})
    if not p.is_dir():
        # a FIFO, a device or a socket: opening it could block forever or read without end
        raise CheckpointFormatError(
            f"{shown(lab)}: is not a regular file or a folder\n"
            "hint: give a .safetensors file or a model folder"
        )
    # every file below is found by name inside the folder: the link rule applies (io/links.py)
    if _regular(p, INDEX_NAME, "index"):
        return _open_sharded(p, lab)
    single = _regular(p, SINGLE_NAME)
    if single is not None:
        header = read_safetensors_header(single)
        return Checkpoint(lab, p, p, (single,), header.tensors, stamps={single: header.stamp})
    try:
        names = sorted(x.name for x in p.iterdir())
    except OSError as e:
        raise CheckpointFormatError(
            f"{shown(lab)}: cannot list the folder ({e.strerror})"
        ) from None
    candidates = [
        f for n in names if n.endswith(".safetensors") and (f := _regular(p, n)) is not None
    ]
    if len(candidates) == 1:
        header = read_safetensors_header(candidates[0])
        return Checkpoint(
            lab, p, p, (candidates[0],), header.tensors, stamps={candidates[0]: header.stamp}
        )
    pickles: list[Path] = []
    pickle_index = None
    if (
        not candidates
    ):  # pickles are looked at (and their links checked) only when they would be used
        pickles = [
            f
            for n in names
            if Path(n).suffix in PICKLE_SUFFIXES and (f := _regular(p, n)) is not None
        ]
        pickle_index = _regular(p, PICKLE_INDEX_NAME, "index")
    if not candidates and (pickles or pickle_index):
        if not allow_pickle:
            raise _refuse_pickle(pickles[0] if pickles else p / PICKLE_INDEX_NAME)
        if pickle_index:
            return _open_pickle_sharded(p, lab)
        pickle_single = _regular(p, PICKLE_SINGLE_NAME)
        if pickle_single is not None:
            return _open_pickle(pickle_single, lab, p)
        if len(pickles) == 1:
            return _open_pickle(pickles[0], lab, p)
        raise CheckpointFormatError(
            f"{shown(lab)}: folder holds {len(pickles)} pickle files "
            f"({', '.join(x.name for x in pickles[:5])}) and no index, so it is unclear which "
            f"is the model\nhint: give the file itself, or add {PICKLE_INDEX_NAME}"
        )
    found = ", ".join(x.name for x in candidates[:5]) or "none"
    raise CheckpointFormatError(
        f"{shown(lab)}: folder holds no checkpoint soupkit can read (safetensors files: {found})\n"
        f"hint: expected {SINGLE_NAME}, a sharded folder with {INDEX_NAME}, or exactly one "
        "*.safetensors file"
    )


def in_memory_checkpoint(state: Mapping[str, torch.Tensor], label: str) -> Checkpoint:
    """Wrap an in-memory state dict as a `Checkpoint` (for the Python API).

    Tensors are made contiguous CPU tensors; nothing is copied if they already are.
    """
    tensors: dict[str, TensorInfo] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointFormatError(
                f"{shown(label)}: entry {shown(name, quote=True)} is a {type(t).__name__}, expected a torch.Tensor"
            )
        t = t.detach().to("cpu").contiguous()
        try:
            code = dtype_code(t.dtype)
        except ValueError:
            raise CheckpointFormatError(
                f"{shown(label)}: tensor {shown(name, quote=True)} has dtype {t.dtype}, which "
                "safetensors cannot store"
            ) from None
        nbytes = t.numel() * t.element_size()
        tensors[name] = TensorInfo(name, code, tuple(t.shape), None, 0, nbytes, data=t)
    return Checkpoint(label, None, None, (), tensors)
