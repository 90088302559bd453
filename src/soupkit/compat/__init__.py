"""Compatibility with the rest of the ecosystem.

- `soupkit.compat.mergekit`: mergekit recipes that need more than ``models:``: layer-range
  ``slices`` (frankenmerges, passthrough) with layer renumbering.
- `soupkit.compat.training`: `CheckpointSoup`, a running soup of the last N snapshots of a
  training loop, in memory.

PEFT / LoRA adapters live in `soupkit.lora`; tensor-name mapping (Lightning, DDP, timm,
open_clip prefixes) in `soupkit.formats`.
"""

from __future__ import annotations

from soupkit.compat.training import CheckpointSoup

__all__ = ["CheckpointSoup"]
