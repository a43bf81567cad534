"""The package's own version (a module without imports, so every layer may read it)."""

__version__ = "0.1.0"
