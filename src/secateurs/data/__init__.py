"""Datasets that install offline from PyPI (no downloads at run time), and calibration batches."""

from .bundled import DATASETS, load_dataset
from .loaders import DATA_HELP, batches, dataset

__all__ = ["DATASETS", "DATA_HELP", "batches", "dataset", "load_dataset"]
