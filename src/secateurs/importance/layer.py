"""How much a whole block matters: pure functions of its input/output activations or weights.

Lower scores mean "remove first" for every criterion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LAYER_IMPORTANCE", "angular_distance", "block_influence", "cosine", "magnitude"]

LAYER_IMPORTANCE = ("block_influence", "angular", "loss", "magnitude")


def cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity of a block's input and output: per token for (batch, tokens, hidden), else per sample."""
    x, y = x.detach().float(), y.detach().float()
    if x.dim() == 3:
        return F.cosine_similarity(x, y, dim=-1).flatten()
    return F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1)


def block_influence(x: Tensor, y: Tensor) -> Tensor:
    """ShortGPT's block influence, ``1 - cos(x, y)`` averaged over tokens (Men et al. 2024)."""
    return (1 - cosine(x, y)).mean()


def angular_distance(x: Tensor, y: Tensor) -> Tensor:
    """``arccos(cos(x, y)) / pi`` averaged over tokens (Gromov et al. 2024); ``y`` may be n blocks later."""
    return (torch.arccos(cosine(x, y).clamp(-1, 1)) / math.pi).mean()


def magnitude(block: nn.Module) -> float:
    """Data-free fallback: mean |w| over the block's weight matrices and norm scales (a weak proxy)."""
    values = [p.detach().abs().mean() for name, p in block.named_parameters() if name.endswith("weight")]
    return float(torch.stack(values).mean()) if values else 0.0
