"""Small helpers every layer may use: optional extras, formatting, interrupts, safe regexes.

The bottom layer: it imports only `soupkit.errors` and the standard library.
"""
