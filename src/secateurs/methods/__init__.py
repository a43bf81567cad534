"""Pruning methods: one module per method, each registering its config with ``prune_``."""

from . import channels, layers, nm, oneshot, unstructured  # noqa: F401  (import registers the methods)
from .channels import Channels
from .layers import Layers
from .nm import NM
from .oneshot import SparseGPT, Wanda
from .registry import config_class, method_names, prune_, register_method
from .report import LayerReport, PruneReport
from .unstructured import Unstructured

__all__ = [
    "Channels",
    "Layers",
    "NM",
    "SparseGPT",
    "Unstructured",
    "Wanda",
    "LayerReport",
    "PruneReport",
    "config_class",
    "method_names",
    "prune_",
    "register_method",
]
