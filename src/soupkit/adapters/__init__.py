"""Adapters: PEFT LoRA adapters (read, fold, merge, extract) and mergekit's ``model+adapter``
paths, turned into plans and jobs for the same engine.

Layer: imports `soupkit.engine` and below.
"""
