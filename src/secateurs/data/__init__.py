"""Datasets that install offline from PyPI (no downloads at run time)."""

from .bundled import DATASETS, load_dataset

__all__ = ["DATASETS", "load_dataset"]
