"""Example inputs for a model: float images/features or integer token ids."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..selection import declared_module
from ..utils import first_line

__all__ = ["parse_shape", "default_input", "example_inputs"]

INPUT_ATTR = "_secateurs_input"
DEFAULT_TOKENS = 128
# 1 GiB of float32: far above any input needed to trace, time or calibrate a model, and a shape
# like 100000,1,1000,1000 otherwise ends in the allocator's traceback (or the OOM killer)
MAX_INPUT_ELEMENTS = 2**28


def _check_size(dims: tuple[int, ...]) -> None:
    count = math.prod(dims)
    if count > MAX_INPUT_ELEMENTS:
        raise SecateursError(
            f"an example input of shape {','.join(map(str, dims))} has {count:,} elements, more than the "
            f"{MAX_INPUT_ELEMENTS:,} allowed: pass a smaller --input-shape (batch 1 is enough to trace a model)"
        )


def parse_shape(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or a sequence) into a tuple of positive ints."""
    try:
        dims = tuple(int(d) for d in (text.replace("x", ",").split(",") if isinstance(text, str) else text))
    except ValueError:
        raise SecateursError(
            f"input shape must be comma-separated positive integers like 1,3,224,224, got '{text}'"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise SecateursError(
            f"input shape must be comma-separated positive integers like 1,3,224,224, got '{text}'"
        )
    _check_size(dims)
    return dims


def _vocab_size(model: nn.Module) -> int | None:
    emb = declared_module(model, "get_input_embeddings")
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def default_input(model: nn.Module) -> tuple[tuple[int, ...], str]:
    """Guess ``(shape, kind)`` for a model; kind is ``"float"`` or ``"tokens"``.

    Order: what was recorded when the model was saved; timm's ``pretrained_cfg``;
    token ids for models whose input is an embedding; then the first layer's type.
    """
    recorded = getattr(model, INPUT_ATTR, None)
    if recorded and recorded.get("shape"):
        shape = tuple(recorded["shape"])
        return shape, recorded.get("kind") or _kind_for(model)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (1, *cfg["input_size"]), "float"
    if _vocab_size(model) is not None:
        config = getattr(model, "config", None)
        max_pos = getattr(config, "max_position_embeddings", None) or DEFAULT_TOKENS
        return (1, min(DEFAULT_TOKENS, int(max_pos))), "tokens"
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return (1, DEFAULT_TOKENS), "tokens"
        if isinstance(module, nn.Conv2d):
            return (1, module.in_channels, 224, 224), "float"
        if isinstance(module, nn.Conv1d):
            return (1, module.in_channels, 256), "float"
        if isinstance(module, nn.Conv3d):
            return (1, module.in_channels, 16, 112, 112), "float"
        if isinstance(module, nn.Linear):
            return (1, module.in_features), "float"
    raise SecateursError(
        f"cannot guess an input for {type(model).__name__}: pass --input-shape (e.g. 1,3,224,224)"
    )


def _kind_for(model: nn.Module) -> str:
    if _vocab_size(model) is not None:
        return "tokens"
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return "tokens"
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return "float"
    return "float"


def example_inputs(
    model: nn.Module, input_shape: Any = None, *, seed: int = 0
) -> Tensor:
    """A deterministic example input for ``model``.

    Args:
        model: the model the input is for.
        input_shape: e.g. ``"1,3,224,224"`` or ``(1, 128)``; guessed when None.
        seed: seed for the random values.

    Returns:
        A float tensor, or a tensor of token ids for language models.

    Example:
        >>> import torch, secateurs
        >>> secateurs.example_inputs(torch.nn.Conv2d(3, 8, 3)).shape
        torch.Size([1, 3, 224, 224])
    """
    if input_shape is None:
        shape, kind = default_input(model)
    else:
        shape, kind = parse_shape(input_shape), _kind_for(model)
    shape = parse_shape(shape)  # a recorded shape comes from a manifest: check it like a typed one
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        if kind == "tokens":
            vocab = _vocab_size(model)
            if vocab is None:
                vocab = next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)
            if vocab is None:
                raise SecateursError(f"token ids were asked for, but {type(model).__name__} has no embedding to "
                                     "take them: pass --input-shape for its real input")
            return torch.randint(0, vocab, shape, generator=gen).to(device)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    except (RuntimeError, MemoryError) as exc:  # out of memory (host or device) for the input alone
        raise SecateursError(
            f"cannot allocate an example input of shape {','.join(map(str, shape))} on {device} "
            f"({first_line(exc)}): pass a smaller --input-shape"
        ) from None
