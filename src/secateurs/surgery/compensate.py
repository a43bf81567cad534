"""Fold what removed input channels contributed on average into the layer that read them.

Removing input channel ``c`` of a layer drops ``W[:, c] * x_c`` from every
output. Its average, ``W[:, c] * E[x_c]``, is not noise: for channels after a
ReLU it is a large positive shift that the next BatchNorm has never seen. Adding
it back to the layer's bias (or taking it off the following BatchNorm's running
mean, for bias-free convs) keeps the output distribution centred. This is the
bias compensation of data-free/one-shot pruning work; it changes no shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import Plan
from .reconstruct import apply_shift_

__all__ = ["compensate_"]


def compensate_(model: nn.Module, plan: Plan, means: dict[str, Tensor], followers: dict[str, str]) -> list[str]:
    """Apply compensation for every layer whose input channels ``plan`` removes; return the layers changed.

    Call it on the model *before* the plan is applied (indices refer to the
    current shapes). ``means`` maps a layer name to the mean of its input per
    channel; ``followers`` maps a bias-free layer to the BatchNorm reading its output.
    """
    modules = dict(model.named_modules())
    changed = []
    with torch.no_grad():
        for name, mean in means.items():
            layer = modules[name]
            removed = plan.remove.get(f"{name}.weight" if name else "weight", {}).get(1)
            if not removed:
                continue
            weight = layer.weight.detach()  # masked layers: the effective weight
            idx = torch.tensor(removed, dtype=torch.long, device=weight.device)
            per_channel = weight.index_select(1, idx).flatten(2).sum(2) if weight.dim() > 2 else weight[:, idx]
            delta = per_channel.float() @ mean.to(per_channel.device)[idx]
            follower = modules[followers[name]] if name in followers else None
            if apply_shift_(layer, delta, follower):
                changed.append(name)
    return changed
