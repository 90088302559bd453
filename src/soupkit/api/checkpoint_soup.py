"""`CheckpointSoup`: average the last N snapshots of a training run without writing checkpoints.

A checkpoint soup (the uniform soup of the last checkpoints of *one* run; see
``soupkit soup-checkpoints`` for the file-based form) smooths the end of training much as SWA
or an EMA does. In a training loop::

    soup = soupkit.CheckpointSoup(last=5, every=500)
    for step, batch in enumerate(loader):
        ...
        soup.update(model, step)          # takes a CPU snapshot when step % every == 0
    model.load_state_dict(soup.state_dict())
    soup.save("./soup")                   # safetensors folder, written atomically

Two ways to keep the soup (``mode``); the precision trade-off:

- ``"exact"`` (default): a ring buffer of the last N snapshots on CPU. `state_dict` averages
  them with soupkit's engine (float32, summed oldest first, then divided), so the result is
  *bit-identical* to `soupkit.merge_state_dicts` / ``soupkit soup-checkpoints`` of the same N
  snapshots. Memory: N copies of the weights; `state_dict` costs one pass over them.
- ``"running"``: a float64 running sum. Each update adds the new snapshot and, once N are held,
  subtracts the one that leaves the window, so `state_dict` is O(1) per element and
  ``last=None`` (the average of *every* snapshot, SWA-style) needs no ring buffer at all
  (memory: one float64 copy, 2x a float32 model). A float64 sum of float32 (or bf16) values is
  exact as long as the values of one element span fewer than about 29 binary orders of
  magnitude, which snapshots of one run practically always do; then subtracting the dropped
  snapshot is exact too and nothing drifts, and the mean is rounded once to the weights' dtype,
  which can differ from ``"exact"`` mode (which rounds after each float32 addition) by one unit
  in the last place. With a finite window the ring buffer is still needed for the subtraction,
  so ``last=N`` saves time, not memory.

Integer tensors (step counters such as BatchNorm's ``num_batches_tracked``) are not averaged:
the newest snapshot's value is kept.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from soupkit._util.defaults import MAX_SHARD_SIZE
from soupkit._version import __version__
from soupkit.api.merging import merge_state_dicts
from soupkit.errors import CheckpointFormatError, UsageError
from soupkit.io.names import as_state_dict
from soupkit.io.output import json_bytes, save_state_dict

__all__ = ["CheckpointSoup"]

Snapshot = dict[str, torch.Tensor]


class CheckpointSoup:
    """A running soup of the last ``last`` snapshots, taken every ``every`` steps.

    Args:
        last: how many snapshots the soup averages (the window); None averages every snapshot
            taken (``mode="running"`` only, since a ring buffer would grow without bound).
        every: take a snapshot when ``step % every == 0``.
        mode: ``"exact"`` (ring buffer, bit-identical to the file-based uniform soup) or
            ``"running"`` (float64 running sum); see the module docstring.
        device: where snapshots are kept (default CPU, so GPU memory is not used).

    Raises:
        UsageError: ``last`` or ``every`` below 1, an unknown mode, or ``last=None`` with
            ``mode="exact"``.
    """

    def __init__(
        self,
        last: int | None = 5,
        every: int = 1,
        *,
        mode: Literal["exact", "running"] = "exact",
        device: str | torch.device = "cpu",
    ) -> None:
        if mode not in ("exact", "running"):
            raise UsageError(f"CheckpointSoup mode {mode!r}: expected 'exact' or 'running'")
        if last is not None and last < 1:
            raise UsageError(
                f"CheckpointSoup(last={last}): the window must hold at least 1 snapshot"
            )
        if last is None and mode == "exact":
            raise UsageError(
                "CheckpointSoup(last=None) averages every snapshot, which needs "
                "mode='running' (a ring buffer of all snapshots would grow without bound)"
            )
        if every < 1:
            raise UsageError(
                f"CheckpointSoup(every={every}): expected a step interval of at least 1"
            )
        self.last = last
        self.every = every
        self.mode = mode
        self.device = torch.device(device)
        self._ring: deque[tuple[int, Snapshot]] = deque()
        self._sum: dict[str, torch.Tensor] = {}
        self._count = 0
        self._newest: Snapshot = {}
        self._meta: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._steps: list[int] = []
        self._calls = 0
        self._config_json: str | None = None

    # ----------------------------------------------------------------------------- updates
    def __len__(self) -> int:
        """How many snapshots the soup currently averages."""
        return self._count

    @property
    def steps(self) -> list[int]:
        """The steps of the snapshots in the soup, oldest first (every step in running mode
        with ``last=None``)."""
        return list(self._steps)

    def _snapshot(self, model: Any) -> Snapshot:
        state = as_state_dict(model, "CheckpointSoup.update")
        if not self._meta:
            self._meta = {k: (v.shape, v.dtype) for k, v in state.items()}
        else:
            missing = [k for k in self._meta if k not in state]
            extra = [k for k in state if k not in self._meta]
            changed = [
                f"{k} {list(self._meta[k][0])}/{self._meta[k][1]} -> {list(v.shape)}/{v.dtype}"
                for k, v in state.items()
                if k in self._meta and (v.shape, v.dtype) != self._meta[k]
            ]
            if missing or extra or changed:
                parts = (
                    ([f"missing {missing[:5]}"] if missing else [])
                    + ([f"new {extra[:5]}"] if extra else [])
                    + ([f"changed {changed[:5]}"] if changed else [])
                )
                raise CheckpointFormatError(
                    "CheckpointSoup.update: the model's tensors changed since the first snapshot: "
                    + "; ".join(parts)
                    + "\nhint: a checkpoint soup averages snapshots of one "
                    "architecture; start a new CheckpointSoup after changing the model"
                )
        return {k: v.detach().to(self.device, copy=True) for k, v in state.items()}

    def update(
        self, model: torch.nn.Module | Mapping[str, torch.Tensor], step: int | None = None
    ) -> bool:
        """Offer the current weights; a snapshot is taken when ``step % every == 0``.

        Args:
            model: the model (or its state dict). Its tensors are copied to ``device``.
            step: the training step; default: the number of earlier `update` calls.

        Returns:
            Whether a snapshot was taken.
        """
        if step is None:
            step = self._calls
        self._calls += 1
        if step % self.every != 0:
            return False
        to_json = getattr(getattr(model, "config", None), "to_json_string", None)
        if callable(to_json) and self._config_json is None:  # a transformers model: keep its config
            self._config_json = str(to_json())
        snap = self._snapshot(model)
        self._newest = {k: v for k, v in snap.items() if not v.is_floating_point()}
        floats = {k: v for k, v in snap.items() if v.is_floating_point()}
        full = self.last is not None and len(self._ring) == self.last
        if self.mode == "exact":
            if full:
                self._ring.popleft()
                self._steps.pop(0)
            self._ring.append((step, floats))
            self._count = len(self._ring)
        else:
            if not self._sum:
                self._sum = {
                    k: torch.zeros(v.shape, dtype=torch.float64, device=self.device)
                    for k, v in floats.items()
                }
            for k, v in floats.items():
                self._sum[k] += v.to(torch.float64)
            if full:
                _, dropped = self._ring.popleft()
                self._steps.pop(0)
                for k, v in dropped.items():
                    self._sum[k] -= v.to(torch.float64)
            else:
                self._count += 1
            if self.last is not None:
                self._ring.append((step, floats))
        self._steps.append(step)
        return True

    # ----------------------------------------------------------------------------- results
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The soup: the mean of the snapshots in the window (new tensors, in the model's dtypes).

        Raises:
            UsageError: no snapshot has been taken yet.
        """
        if self._count == 0:
            raise UsageError(
                "CheckpointSoup.state_dict: no snapshot yet\n"
                f"hint: call update(model, step) at least once with step % {self.every} == 0"
            )
        if self.mode == "exact":
            floats = (
                merge_state_dicts([s for _, s in self._ring], "linear") if self._ring[0][1] else {}
            )
        else:
            floats = {k: (v / self._count).to(self._meta[k][1]) for k, v in self._sum.items()}
        return {k: (floats[k] if k in floats else self._newest[k].clone()) for k in self._meta}

    def save(
        self,
        out: str | os.PathLike[str],
        *,
        force: bool = False,
        max_shard_size: int | str = MAX_SHARD_SIZE,
    ) -> Path:
        """Write the soup as a safetensors folder (atomically), with ``soupkit-report.json`` and,
        when the model was a transformers model, its ``config.json``.

        Returns:
            The output folder.
        """
        state = self.state_dict()
        report: dict[str, Any] = {
            "soupkit_version": __version__,
            "torch_version": torch.__version__,
            "checkpoint_soup": {
                "mode": self.mode,
                "last": self.last,
                "every": self.every,
                "steps": self.steps,
                "snapshots": self._count,
            },
        }
        files = {"soupkit-report.json": json_bytes(report)}
        if self._config_json is not None:
            files["config.json"] = self._config_json.encode("utf-8")
        return save_state_dict(
            state, out, force=force, max_shard_size=max_shard_size, extra_files=files
        )

    def __repr__(self) -> str:
        return (
            f"CheckpointSoup(last={self.last}, every={self.every}, mode={self.mode!r}, "
            f"snapshots={self._count}, steps={self.steps[:3]}{'...' if len(self._steps) > 3 else ''})"
        )
