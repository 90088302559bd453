"""Defaults that more than one layer states: one place, so they cannot drift apart."""

from __future__ import annotations

from typing import Final

#: Largest output shard, as Hugging Face's ``save_pretrained`` writes it (10^9 bytes per GB).
MAX_SHARD_SIZE: Final = "5GB"
