"""Where the engine's outputs go: a `Sink` receives each output chunk in the output dtype.

`FileSink` writes the plan's shards at their offsets; `MemorySink` fills in-memory tensors (the
Python API's in-memory forms). Both see exactly the same chunks, so a streamed merge and an
in-memory merge agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from soupkit.io.header import DTYPES
from soupkit.io.writer import Journal, ShardWriter, write_index
from soupkit.planning.plan import MergePlan, TensorJob

__all__ = ["FileSink", "MemorySink", "Sink"]


class Sink(Protocol):
    """Where output tensors go: ``write`` receives a flat chunk in the output dtype."""

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None: ...


class FileSink:
    """Writes the plan's shards into ``folder`` (header first, tensors at their offsets).

    Each shard is closed and hashed (sha256) as soon as its last byte is written; with a
    ``journal`` it is then recorded there, so an interrupted run can resume after it.

    Args:
        plan: the plan.
        folder: where the shards go.
        done: shards already finished and verified (filename -> sha256): not written again.
        journal: where to record each shard as it finishes (resumable runs).
    """

    def __init__(
        self,
        plan: MergePlan,
        folder: Path,
        *,
        done: Mapping[str, str] | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.folder = folder
        self.plan = plan
        self.journal = journal
        self.hashes: dict[str, str] = dict(done or {})
        self._done = frozenset(self.hashes)
        self._writers: list[ShardWriter] = []
        self._of: dict[str, ShardWriter] = {}
        try:
            for layout in plan.shards:
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
        return frozenset(
            t.name for s in self.plan.shards if s.filename in self._done for t in s.tensors
        )

    def _finish(self, w: ShardWriter) -> None:
        self.hashes[w.layout.filename] = w.close()
        if self.journal is not None:
            self.journal.record(w.layout, self.hashes[w.layout.filename])

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None:
        w = self._of[job.name]
        w.write(job.name, data, element_offset)
        if w.complete:
            self._finish(w)

    def close(self) -> None:
        for w in self._writers:
            if w.layout.filename not in self.hashes:
                self._finish(w)
        write_index(self.folder, self.plan.shards)

    def abort(self) -> None:
        for w in self._writers:
            w.abort()


class MemorySink:
    """Collects the outputs as in-memory tensors (name -> tensor of the planned shape)."""

    def __init__(self, plan: MergePlan) -> None:
        self.tensors: dict[str, torch.Tensor] = {
            j.name: torch.empty(j.shape, dtype=DTYPES[j.out_dtype][0]) for j in plan.jobs
        }

    def write(self, job: TensorJob, data: torch.Tensor, element_offset: int) -> None:
        flat = self.tensors[job.name].view(-1)
        flat[element_offset : element_offset + data.numel()] = data
