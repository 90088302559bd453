"""The engine: runs plans. Read -> float32 method -> cast -> write, streamed with bounded
memory, in a thread pipeline; runs the pre-passes methods declare; diagnoses non-finite values.

Layer: imports `soupkit.planning` and below.
"""
