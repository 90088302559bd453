__version__ = "0.1.0"
"""soupkit's version (PEP 440), the one place it is written; the wheel's version is read here."""
