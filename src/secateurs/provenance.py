"""What a model records about where it came from, as attributes set on the model object.

Loading records the *source* (how to rebuild the unpruned architecture without
pickle), structural surgery appends every plan it applies, and a transformers
model whose config can no longer describe its shapes is marked stale. Saving
and loading read these back. This module imports nothing of the package but its
error type, so surgery and io can both use it without importing each other.

A source is a small JSON-able dict:

- ``{"kind": "torchvision", "name": "resnet18"}``
- ``{"kind": "timm", "name": "resnet18"}``
- ``{"kind": "factory", "target": "package.module:callable"}``
- ``{"kind": "hf", "class": "LlamaForCausalLM", "config": {...}}``
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .errors import SecateursError

__all__ = ["CONFIG_STALE_ATTR", "SOURCE_ATTR", "STRUCTURE_ATTR", "attach_source", "describe", "parse_arch",
           "source_of"]

SOURCE_ATTR = "_secateurs_source"  # the source dict
STRUCTURE_ATTR = "_secateurs_structure"  # the structural plans applied so far, as dicts, in order
CONFIG_STALE_ATTR = "_secateurs_config_stale"  # True: the transformers config no longer describes the shapes


def attach_source(model: nn.Module, source: dict[str, Any]) -> nn.Module:
    """Record ``source`` on ``model`` (returned, for chaining)."""
    setattr(model, SOURCE_ATTR, source)
    return model


def parse_arch(spec: str) -> dict[str, Any]:
    """Turn an architecture spec string into a source dict (nothing is built).

    Example:
        >>> parse_arch("torchvision:resnet18")
        {'kind': 'torchvision', 'name': 'resnet18'}
    """
    if spec.startswith("torchvision:"):
        return {"kind": "torchvision", "name": spec.split(":", 1)[1]}
    if spec.startswith("timm:"):
        return {"kind": "timm", "name": spec.split(":", 1)[1]}
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        if mod and attr and all(part.isidentifier() for part in mod.split(".")):
            return {"kind": "factory", "target": spec}
    raise SecateursError(
        f"unknown architecture spec '{spec}': use torchvision:NAME, timm:NAME or package.module:factory"
    )


def _hf_source(model: nn.Module) -> dict[str, Any]:
    return {"kind": "hf", "class": type(model).__name__, "config": model.config.to_dict()}


def source_of(model: nn.Module, arch: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe to rebuild ``model``'s architecture.

    Order: an explicit ``arch``; the source recorded when secateurs loaded the
    model; a transformers model's config; an importable class whose constructor
    needs no arguments. Anything else is an error asking for ``arch``.
    """
    if isinstance(arch, dict):
        return arch
    if isinstance(arch, str):
        return parse_arch(arch)
    recorded = getattr(model, SOURCE_ATTR, None)
    if recorded is not None:
        return recorded
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return _hf_source(model)
    cls = type(model)
    if cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__:
        params = inspect.signature(cls.__init__).parameters.values()
        required = [
            p
            for p in list(params)[1:]
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not required:
            return {"kind": "factory", "target": f"{cls.__module__}:{cls.__qualname__}"}
    raise SecateursError(
        f"cannot tell how to rebuild {cls.__name__} without pickle: pass arch='package.module:factory' "
        "(a callable that returns the unpruned architecture)"
    )


def describe(source: dict[str, Any]) -> str:
    """A source in a few words, for messages (``torchvision:resnet18``)."""
    kind = source.get("kind")
    if kind in ("torchvision", "timm"):
        return f"{kind}:{source.get('name')}"
    if kind == "factory":
        return str(source.get("target"))
    return f"transformers {source.get('class')}"
