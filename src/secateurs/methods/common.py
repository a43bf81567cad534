"""Helpers shared by the pruning methods."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..importance.channel import ChannelImportance
from ..importance.elementwise import ElementImportance
from ..masks import lowest_k  # noqa: F401  (re-exported: it lived here before masks)
from .report import LayerReport

__all__ = ["config_to_dict", "keep_count", "lowest_k", "layer_report", "make_generator"]


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly dict of a config dataclass (callables are recorded by name)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (ChannelImportance, ElementImportance)):
            value = value.name  # a criterion is recorded by its name
        elif isinstance(value, Callable):  # type: ignore[arg-type]
            value = getattr(value, "__qualname__", repr(value))
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def layer_report(name: str, mask: Tensor) -> LayerReport:
    return LayerReport(
        name=name, shape=list(mask.shape), numel=mask.numel(), zeros=mask.numel() - int(mask.count_nonzero())
    )


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(0 if seed is None else seed)
    return g


def keep_count(n: int, remove_fraction: float, multiple: int) -> int:
    """Channels a group of ``n`` keeps when ``remove_fraction`` of them go, a multiple of ``multiple``
    (at least one multiple, never more than ``n``).

    Example:
        >>> keep_count(64, 0.5, 1), keep_count(64, 0.3, 8), keep_count(3, 0.9, 1)
        (32, 48, 1)
    """
    keep = max(1, n - math.floor(remove_fraction * n + 0.5))  # nearest: steps compound without drift
    if multiple > 1:
        keep = max(multiple, int(round(keep / multiple)) * multiple)
        keep = min(keep, n)
    return keep
