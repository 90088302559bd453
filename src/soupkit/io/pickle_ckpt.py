"""PyTorch pickle checkpoints (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``), only on opt-in.

A pickle is a program: ``pickle.load`` runs whatever callables the file names (``os.system``
in a ``__reduce__`` is the classic). soupkit therefore refuses pickles unless the user opts in
(``--allow-pickle`` / ``allow_pickle=True``), and even then loads them only through
``torch.load(weights_only=True)``, PyTorch's restricted unpickler that builds tensors, dicts,
lists and numbers and refuses every other global. A file that needs anything more is refused
with `UnsafeFormatError`: soupkit never falls back to a full unpickle.

Zip-format files (what ``torch.save`` writes since PyTorch 1.6) are memory-mapped
(``mmap=True``), so tensors are paged in from the file as the merge reads them instead of
being copied into RAM; legacy (non-zip) files are loaded whole. Both become in-memory
checkpoints (see `soupkit.io.checkpoint.in_memory_checkpoint`).

Accepted shapes of the unpickled object:

- a state dict: a mapping of tensor name to tensor;
- a PyTorch Lightning checkpoint: a mapping whose ``state_dict`` entry is such a mapping (the
  other entries, optimizer states, epoch counters and so on, are ignored).

Anything else (non-tensor entries, sparse or quantized tensors, a bare tensor, a list) is a
`CheckpointFormatError` that names the entries and their types.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from soupkit.errors import CheckpointFormatError, UnsafeFormatError, shown
from soupkit.io.header import open_regular

__all__ = ["LIGHTNING_KEY", "load_pickle_state_dict"]

LIGHTNING_KEY = "state_dict"
_MAX_LISTED = 10


def _unsafe(path: Path, detail: str) -> UnsafeFormatError:
    return UnsafeFormatError(
        f"{path}: unsafe pickle, not a plain state dict: it asks to load {detail}; soupkit loads "
        "pickles only with torch.load(weights_only=True), which refuses anything but tensors, "
        "containers and numbers, and it never runs code from a checkpoint\n"
        "hint: if the file came from a source you trust, convert it to safetensors in a "
        "separate, trusted environment; otherwise delete it"
    )


def _refusal_detail(message: str) -> str | None:
    """The line of a weights_only refusal that names what the file wanted (None: not a refusal)."""
    for line in message.splitlines():
        low = line.lower()
        if "global" in low or "unsupported" in low or "blocked" in low or "not an allowed" in low:
            return line.strip()
    return None


def _load(path: Path) -> Any:
    try:
        fd = open_regular(path)
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot open ({e.strerror})") from None
    with open(fd, "rb") as f:
        is_zip = zipfile.is_zipfile(f)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal (if any) is
            # an exception, and a warning must not turn into one under `-W error`.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        detail = _refusal_detail(str(e))
        if detail is not None:
            raise _unsafe(path, detail) from None
        raise CheckpointFormatError(
            f"{path}: not a readable PyTorch checkpoint ({_first_line(str(e))})\n"
            "hint: the file is truncated, corrupt or not a torch.save file"
        ) from None
    except MemoryError:
        raise CheckpointFormatError(
            f"{path}: loading it needs more memory than is available"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for corrupt files
        raise CheckpointFormatError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(str(e))})\n"
            "hint: the file is truncated, corrupt or not a torch.save file"
        ) from None


def _first_line(s: str) -> str:
    for line in s.splitlines():
        if line.strip() and not line.startswith("Weights only load failed"):
            return line.strip()[:300]
    return s.strip()[:300]


def load_pickle_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Load a pickle checkpoint as a state dict, safely (``torch.load(weights_only=True)``).

    Args:
        path: the pickle file.

    Returns:
        ``(state, note)``: name -> tensor, and a note when the tensors came from a
        Lightning ``state_dict`` entry (else None).

    Raises:
        UnsafeFormatError: the pickle needs more than tensors, containers and numbers (for
            example it names ``os.system``); nothing from it was executed.
        CheckpointFormatError: the file is not a readable checkpoint, or it does not hold a
            mapping of names to dense tensors (the message lists the offending entries).
    """
    p = Path(path)
    obj = _load(p)
    note: str | None = None
    if isinstance(obj, Mapping) and isinstance(obj.get(LIGHTNING_KEY), Mapping):
        others = [str(k) for k in obj if k != LIGHTNING_KEY]
        note = (
            f"{shown(p)}: took the tensors from its {LIGHTNING_KEY!r} entry (a Lightning checkpoint)"
            + (f"; ignored {', '.join(others[:_MAX_LISTED])}" if others else "")
        )
        obj = obj[LIGHTNING_KEY]
    if isinstance(obj, torch.nn.Module):  # cannot happen with weights_only, kept as a guard
        raise _unsafe(p, "a whole nn.Module")
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{shown(p)}: holds a {type(obj).__name__}, expected a state dict (a mapping of tensor "
            "names to tensors)\nhint: save `model.state_dict()`, not the model or a list"
        )
    bad: list[str] = []
    state: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            bad.append(f"key {shown(repr(k))} ({type(k).__name__}, expected a string)")
        elif not isinstance(v, torch.Tensor):
            bad.append(f"{shown(k, quote=True)} ({type(v).__name__})")
        elif v.layout != torch.strided or v.is_quantized:
            bad.append(
                f"{shown(k, quote=True)} ({'quantized' if v.is_quantized else str(v.layout)} tensor)"
            )
        else:
            state[k] = v
    if bad:
        nested = [
            str(k)
            for k, v in obj.items()
            if isinstance(v, Mapping) and any(isinstance(x, torch.Tensor) for x in v.values())
        ]
        hint = (
            f"entry {shown(nested[0], quote=True)} looks like a state dict; save that entry alone "
            f"(e.g. torch.save(ckpt[{shown(nested[0], quote=True)}], path)) or convert to safetensors"
            if nested
            else "soupkit merges plain state dicts of dense tensors; save "
            "`model.state_dict()` only, or convert to safetensors"
        )
        listed = ", ".join(bad[:_MAX_LISTED]) + (
            f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        )
        raise CheckpointFormatError(
            f"{shown(p)}: not a plain state dict: {len(bad)} of {len(obj)} entries are not dense tensors: "
            f"{listed}\nhint: {hint}"
        )
    return state, note
