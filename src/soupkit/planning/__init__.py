"""Planning: headers + recipe -> a complete `MergePlan` (per-tensor jobs, output header,
offsets, memory estimate), with every problem reported before any data moves.

Layer: imports `soupkit.recipe`, `soupkit.io`, `soupkit.methods` and below. It never reads
tensor data.
"""
