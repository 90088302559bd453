"""The output folder: the one writer of every model folder soupkit makes.

Merges (`soupkit.merge`, `soupkit.api.multi.merge_many`), LoRA folds and merges
(`soupkit.adapters.lora`) and `save_state_dict` all write through `OutputWriter`:

- the refusal to write into (or over) one of the inputs, checked before anything is created;
- the hidden partial folder and the atomic rename (`soupkit.io.writer.OutputFolder`), with
  ``force`` replacing a non-empty destination, and for a resumable run the journal of finished
  shards (`resume`) under a fingerprint of everything that makes the output (`run_fingerprint`);
- the shards, header first, and the index (`ShardFiles`, also the engine's sink for merges);
- the files carried from an input folder (config and tokenizer; ``config.json`` rewritten
  with the dtype written and the plan's updates), the model card, extra files and the JSON
  report, each recorded with its sha256.

A folder appears only when all of this is done; on any failure nothing that looks complete is
left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._version import __version__
from soupkit.errors import CheckpointFormatError, UsageError, shown
from soupkit.io.carry import updated_config
from soupkit.io.checkpoint import Checkpoint
from soupkit.io.folder import INDEX_NAME, MAX_CARRY_BYTES
from soupkit.io.header import dtype_code
from soupkit.io.names import as_state_dict
from soupkit.io.writer import (
    Journal,
    OutputFolder,
    OutputTensor,
    ShardLayout,
    ShardWriter,
    copy_file,
    io_failure,
    layout_shards,
    parse_size,
    write_index,
)

__all__ = [
    "CARD_NAME",
    "REPORT_NAME",
    "OutputWriter",
    "ShardFiles",
    "check_not_input",
    "run_fingerprint",
    "json_bytes",
    "report_header",
    "save_state_dict",
]

REPORT_NAME = "soupkit-report.json"
CARD_NAME = "README.md"


def json_bytes(obj: Any) -> bytes:
    """Pretty JSON as UTF-8 bytes with a trailing newline (reports, configs beside tensors)."""
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def report_header() -> dict[str, Any]:
    """The fields every report opens with: the soupkit and torch versions and the time."""
    return {
        "soupkit_version": __version__,
        "torch_version": torch.__version__,
        "created_unix": int(time.time()),
    }


def write_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` (errors as `MergeIOError`) and return its sha256."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise io_failure(f"{path}: cannot write", e) from None
    return hashlib.sha256(data).hexdigest()


def check_not_input(
    out: Path, inputs: Sequence[Checkpoint], carry_from: Path | None = None
) -> None:
    """Refuse an output that is, holds, or sits inside one of the inputs (symlinks resolved).

    With ``force`` an existing output is replaced, so an output folder that contains an input
    would destroy it; an output inside a model folder would change what that folder holds.
    ``carry_from`` is the folder config and tokenizer files are copied from.

    Raises:
        UsageError: naming the input.
    """
    try:
        dest = out.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise UsageError(f"{out}: not a usable output path ({e})") from None
    hint = "hint: inputs are never modified; choose an output folder outside every input"
    for c in inputs:
        for f in c.files:
            fr = f.resolve()
            if fr == dest:
                raise UsageError(f"{out}: the output is input {f} ({c.label})\n{hint}")
            if dest in fr.parents:
                raise UsageError(
                    f"{out}: the output folder holds input {f} ({c.label}); writing "
                    f"(or --force replacing) it would destroy that input\n{hint}"
                )
        if c.path is not None and c.path.is_dir():
            cr = c.path.resolve()
            if dest == cr or cr in dest.parents:
                raise UsageError(
                    f"{out}: the output would be inside the input model folder {c.path} "
                    f"({c.label})\n{hint}"
                )
    if carry_from is not None:
        cr = carry_from.resolve()
        if dest == cr or dest in cr.parents:
            raise UsageError(
                f"{out}: the output would replace or hold {carry_from}, where the "
                f"config and tokenizer files come from\n{hint}"
            )


def run_fingerprint(dest: Path, identity: Mapping[str, Any], shards: Sequence[ShardLayout]) -> str:
    """What makes two runs produce the same output: the soupkit and torch versions, the
    destination, ``identity`` (recipe, inputs' states, ...) and the shards' headers."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "soupkit": __version__,
                "torch": torch.__version__,
                "dest": str(dest.absolute()),
                **identity,
            },
            sort_keys=True,
        ).encode("utf-8")
    )
    for s in shards:
        h.update(s.filename.encode("utf-8"))
        h.update(s.header)
    return h.hexdigest()


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class ShardFiles:
    """Writes shards into ``folder`` (header first, tensors at their offsets), then the index.

    The engine's sink for merges (``write(job, data, element_offset)``) and the writer of whole
    tensors for LoRA folds and state dicts. Each shard is closed and hashed (sha256) as soon as
    its last byte is written; with a ``journal`` it is then recorded there, so an interrupted
    run can resume after it.

    Args:
        folder: where the shards go.
        shards: the layouts.
        done: shards already finished and verified (filename -> sha256): not written again.
        journal: where to record each shard as it finishes (resumable runs).
    """

    def __init__(
        self,
        folder: Path,
        shards: Sequence[ShardLayout],
        *,
        done: Mapping[str, str] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.folder = folder
        self.shards = tuple(shards)
        self.journal = journal
        self.hashes: dict[str, str] = dict(done or {})
        self._done = frozenset(self.hashes)
        self._writers: list[ShardWriter] = []
        self._of: dict[str, ShardWriter] = {}
        try:
            for layout in self.shards:
                if layout.filename in self.hashes:
                    continue
                w = ShardWriter(folder, layout)
                self._writers.append(w)
                for t in layout.tensors:
                    self._of[t.name] = w
                if w.complete:  # a shard of empty tensors only
                    self._finish(w)
        except BaseException:
            self.abort()
            raise

    @property
    def skip(self) -> frozenset[str]:
        """Names of the tensors that live in already finished shards."""
        return frozenset(t.name for s in self.shards if s.filename in self._done for t in s.tensors)

    def _finish(self, w: ShardWriter) -> None:
        self.hashes[w.layout.filename] = w.close()
        if self.journal is not None:
            self.journal.record(w.layout, self.hashes[w.layout.filename])

    def write(self, tensor: _Named, data: torch.Tensor, element_offset: int) -> None:
        """Write ``data`` (in the output dtype) of ``tensor`` (anything with its ``name``: a
        plan's job, an `OutputTensor`) at element ``element_offset``."""
        w = self._of[tensor.name]
        w.write(tensor.name, data, element_offset)
        if w.complete:
            self._finish(w)

    def close(self) -> None:
        """Finish every shard and write the index (for more than one shard)."""
        for w in self._writers:
            if w.layout.filename not in self.hashes:
                self._finish(w)
        write_index(self.folder, self.shards)

    def abort(self) -> None:
        for w in self._writers:
            w.abort()


class OutputWriter:
    """One output folder being written; it appears at ``dest`` when the ``with`` block ends.

    Usage::

        with OutputWriter(dest, force=force, inputs=checkpoints) as out:
            hashes = out.write_tensors(shards, produce)   # or ShardFiles(out.tmp, ...) + engine
            out.carry(files)
            out.write_card(text)
            out.write_report(report)

    Args:
        dest: the destination folder.
        force: replace ``dest`` if it exists and is not empty.
        inputs: checkpoints the output must not be, hold or sit inside (`check_not_input`).
        carry_from: the folder carried files come from (the output must not replace it).
        fingerprint: make the run resumable under this `run_fingerprint` (see `resume`).
        extra_names: names of extra files the caller will write: each must be a plain file
            name other than the report's and the card's.

    Raises:
        UsageError: the output is an input, or an extra file name is not plain.
        OutputExistsError: ``dest`` exists and is not an empty folder, and ``force`` is false.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        *,
        force: bool = False,
        inputs: Sequence[Checkpoint] = (),
        carry_from: Path | None = None,
        fingerprint: str | None = None,
        extra_names: Iterable[str] = (),
    ) -> None:
        self.dest = Path(dest)
        check_not_input(self.dest, inputs, carry_from)
        for fname in extra_names:
            if Path(fname).name != fname or fname in (REPORT_NAME, CARD_NAME):
                raise UsageError(
                    f"extra output file {fname!r}: expected a plain file name other than "
                    f"{REPORT_NAME} and {CARD_NAME}"
                )
        self.fingerprint = fingerprint
        self.folder = OutputFolder(
            self.dest, force=force, resume_key=fingerprint[:16] if fingerprint else None
        )
        self.others: dict[str, str] = {}  # sha256 of every file beside the shards, as written
        self._tmp: Path | None = None

    @property
    def tmp(self) -> Path:
        """The partial folder everything is written into."""
        if self._tmp is None:
            raise RuntimeError("OutputWriter used outside its `with` block")
        return self._tmp

    def __enter__(self) -> OutputWriter:
        self._tmp = self.folder.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.folder.__exit__(et, ev, tb)

    def resume(self, shards: Sequence[ShardLayout]) -> tuple[dict[str, str], Journal | None]:
        """For a resumable run: the shards an earlier run finished (verified by sha256) and
        the journal to record new ones in; ``({}, None)`` otherwise."""
        if self.fingerprint is None:
            return {}, None
        journal = Journal(self.tmp, self.fingerprint)
        done = journal.verified(shards) if self.folder.resumed else {}
        journal.start(done, shards)
        return done, journal

    def write_tensors(
        self, shards: Sequence[ShardLayout], produce: Callable[[OutputTensor], torch.Tensor]
    ) -> dict[str, str]:
        """Write every tensor of ``shards`` in order, each made by ``produce`` when its turn
        comes, then the index; returns each shard's sha256."""
        files = ShardFiles(self.tmp, shards)
        try:
            for layout in shards:
                for o in layout.tensors:
                    files.write(o, produce(o).reshape(-1), 0)
            files.close()
        except BaseException:
            files.abort()
            raise
        return files.hashes

    def record_index(self) -> None:
        """Record the shard index's sha256 among the other files (when there is one)."""
        index = self.tmp / INDEX_NAME
        if index.is_file():
            self.others[index.name] = hashlib.sha256(index.read_bytes()).hexdigest()

    def write(self, name: str, data: bytes) -> str:
        """Write a file beside the shards; returns (and records) its sha256."""
        self.others[name] = write_file(self.tmp / name, data)
        return self.others[name]

    def write_card(self, text: str) -> str:
        """Write the model card (``README.md``)."""
        return self.write(CARD_NAME, text.encode("utf-8"))

    def write_report(self, report: Mapping[str, Any]) -> None:
        """Write ``soupkit-report.json`` (not recorded: the report lists the other files)."""
        write_file(self.tmp / REPORT_NAME, json_bytes(report))

    def carry(
        self,
        files: Mapping[str, Path],
        *,
        config_updates: Mapping[str, Any] | None = None,
        written_dtype: str | None = None,
    ) -> dict[str, str]:
        """Copy carried files (name -> source, as `carried_files` checked them) in blocks;
        with ``config_updates`` (a merge's), ``config.json`` is rewritten with them and with
        the dtype written (see `soupkit.io.carry.updated_config`). Returns (and records) each file's sha256."""
        out: dict[str, str] = {}
        for name, src in files.items():
            if name == "config.json" and config_updates is not None:
                try:
                    data = src.read_bytes()  # at most MAX_CARRY_BYTES, checked at plan time
                except OSError as e:
                    raise CheckpointFormatError(
                        f"{shown(src)}: cannot read ({e.strerror})"
                    ) from None
                out[name] = self.write(
                    name, updated_config(src, data, config_updates, written_dtype)
                )
            else:
                out[name] = copy_file(src, self.tmp / name, MAX_CARRY_BYTES)
                self.others[name] = out[name]
        return out


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    extra_files: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a state dict as a Hugging Face style safetensors folder, atomically.

    Tensors are written in the given order with soupkit's header-first writer (sharded with an
    index above ``max_shard_size``); ``extra_files`` (name -> bytes) are written beside them.
    The folder appears only when complete.

    Raises:
        OutputExistsError: ``out`` exists and is not empty, and ``force`` is false.
        CheckpointFormatError: an entry is not a tensor or has a dtype safetensors cannot store.
        UsageError: an extra file name is not a plain file name.
    """
    tensors = {
        k: v.detach().to("cpu").contiguous() for k, v in as_state_dict(state, "state dict").items()
    }
    outputs = []
    for name, t in tensors.items():
        try:
            outputs.append(OutputTensor(name, dtype_code(t.dtype), tuple(t.shape)))
        except ValueError:
            raise CheckpointFormatError(
                f"state dict: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store"
            ) from None
    try:
        limit = parse_size(max_shard_size)
    except ValueError as e:
        raise UsageError(f"max_shard_size: {e}") from None
    for fname in extra_files or {}:
        if Path(fname).name != fname:
            raise UsageError(f"extra file {fname!r}: expected a plain file name")
    dest = Path(out)
    with OutputWriter(dest, force=force) as w:
        w.write_tensors(layout_shards(outputs, limit), lambda o: tensors[o.name])
        for fname, data in (extra_files or {}).items():
            w.write(fname, data)
    return dest
