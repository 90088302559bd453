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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soupkit.errors import CheckpointFormatError, UnsafeFormatError, shown
from soupkit.io.folder import (
    CARRY_FILES,
    INDEX_NAME,
    MAX_CARRY_BYTES,
    PICKLE_INDEX_NAME,
    PICKLE_SINGLE_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    carried_files,
    read_index,
    regular_file,
)
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
    wm = read_index(folder)
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
    wm = read_index(folder, PICKLE_INDEX_NAME)
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
    if regular_file(p, INDEX_NAME, "index"):
        return _open_sharded(p, lab)
    single = regular_file(p, SINGLE_NAME)
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
        f for n in names if n.endswith(".safetensors") and (f := regular_file(p, n)) is not None
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
            if Path(n).suffix in PICKLE_SUFFIXES and (f := regular_file(p, n)) is not None
        ]
        pickle_index = regular_file(p, PICKLE_INDEX_NAME, "index")
    if not candidates and (pickles or pickle_index):
        if not allow_pickle:
            raise _refuse_pickle(pickles[0] if pickles else p / PICKLE_INDEX_NAME)
        if pickle_index:
            return _open_pickle_sharded(p, lab)
        pickle_single = regular_file(p, PICKLE_SINGLE_NAME)
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
