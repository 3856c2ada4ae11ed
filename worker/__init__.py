"""twoway: turns one-way leads into two-way prospects."""

__version__ = "0.1.0"
