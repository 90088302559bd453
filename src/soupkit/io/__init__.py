"""Bytes in and out: safetensors headers, checkpoint resolution, reading and writing."""

from soupkit.io.checkpoint import Checkpoint, in_memory_checkpoint, open_checkpoint
from soupkit.io.header import SafetensorsHeader, TensorInfo, read_safetensors_header
from soupkit.io.reader import TensorReader
from soupkit.io.writer import OutputFolder, OutputTensor, ShardLayout, ShardWriter, layout_shards

__all__ = [
    "Checkpoint",
    "OutputFolder",
    "OutputTensor",
    "SafetensorsHeader",
    "ShardLayout",
    "ShardWriter",
    "TensorInfo",
    "TensorReader",
    "in_memory_checkpoint",
    "layout_shards",
    "open_checkpoint",
    "read_safetensors_header",
]
