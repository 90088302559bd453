"""The files of a Hugging Face model folder: their names, the shard index, and the config and
tokenizer files carried to an output.

Every path is found by the link rule of `soupkit.io.links` (nothing leads out of the model
folder, except a Hugging Face cache snapshot's links into its ``blobs/``).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from soupkit.errors import CheckpointFormatError, shown
from soupkit.io.links import resolve_model_file

__all__ = [
    "CARRY_FILES",
    "INDEX_NAME",
    "MAX_CARRY_BYTES",
    "PICKLE_INDEX_NAME",
    "PICKLE_SINGLE_NAME",
    "PICKLE_SUFFIXES",
    "SINGLE_NAME",
    "carried_files",
    "read_index",
    "regular_file",
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


def regular_file(folder: Path, name: str, what: str = "file") -> Path | None:
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


def read_index(folder: Path, name: str = INDEX_NAME) -> dict[str, str]:
    idx = folder / name
    real = regular_file(folder, name, "index") or idx
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
