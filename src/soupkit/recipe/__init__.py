"""Recipes: the YAML schema a user writes (mergekit's where the meaning is the same) and the
resolution of per-tensor parameter values (scalars, gradients, filters).

Layer: imports `soupkit.methods`, `soupkit.io` and below.
"""
