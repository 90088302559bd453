"""The merge API: recipes into folders, state dicts into state dicts, one pass into several
outputs, task vectors, diagnostics and checkpoint soups. `soupkit/__init__.py` re-exports the
public names.

Layer: imports `soupkit.adapters`, `soupkit.evaluate`, `soupkit.engine` and below.
"""
