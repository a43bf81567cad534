"""Per-weight importance for unstructured and N:M pruning (higher = keep)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import SecateursError

__all__ = ["ELEMENT_IMPORTANCE", "element_scores"]


def magnitude(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return weight.detach().abs().float()


def random(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return torch.rand(weight.shape, generator=generator, dtype=torch.float32).to(weight.device)


ELEMENT_IMPORTANCE: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {
    "magnitude": magnitude,
    "random": random,
}


def element_scores(
    name: str, weight: Tensor, mask: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """Score every entry of ``weight``; entries already masked out score ``-inf``
    so they are the first to go and earlier zeros are kept."""
    try:
        fn = ELEMENT_IMPORTANCE[name]
    except KeyError:
        raise SecateursError(
            f"unknown importance '{name}': choose one of {', '.join(ELEMENT_IMPORTANCE)}"
        ) from None
    scores = fn(weight, generator)
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return scores
