"""Layers as matrices: a Linear's or convolution's weight as (out, in-features), its input as rows of patches.

Least-squares refits (:mod:`secateurs.surgery.reconstruct`) and the
reconstruction-aware channel criterion (:mod:`secateurs.importance.channel`)
both see a convolution as a Linear layer over its unfolded input patches: input
channel ``c`` of a ``k x k`` convolution owns columns ``c*k*k .. c*k*k + k*k - 1``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .selection import input_dim

__all__ = ["input_rows", "is_transposed_linear", "output_rows", "patch_size", "refit_blocker", "weight_matrix"]

_CONVS = (nn.Conv1d, nn.Conv2d)


def refit_blocker(layer: nn.Module) -> str | None:
    """Why the weights of ``layer`` cannot be refitted by least squares (None: they can)."""
    if hasattr(layer, "parametrizations"):
        return "its weight is masked (unstructured/N:M pruning): refit before masking"
    if isinstance(layer, _CONVS):
        if layer.groups != 1:
            return (f"a grouped convolution (groups={layer.groups}) mixes channels only within its groups, "
                    "so only its bias is corrected")
        if layer.padding_mode != "zeros":
            return f"padding mode '{layer.padding_mode}' is not supported by the refit, so only its bias is corrected"
        return None
    if isinstance(layer, nn.Linear) or is_transposed_linear(layer):
        return None
    return f"{type(layer).__name__} is not a Linear or convolution, so only its bias is corrected"


def is_transposed_linear(layer: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear that stores its weight as (in, out)."""
    w = getattr(layer, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 2 and type(layer).__name__ == "Conv1D" and input_dim(layer) == 0


def patch_size(layer: nn.Module) -> int:
    """Columns of :func:`weight_matrix` per input channel (the kernel's size; 1 for a Linear)."""
    w = layer.weight
    return 1 if w.dim() == 2 else int(w[0, 0].numel())


def weight_matrix(layer: nn.Module) -> Tensor:
    """The weight as (out, in-features) in the layout :func:`input_rows` produces."""
    w = layer.weight.detach()
    if is_transposed_linear(layer):
        return w.T
    return w.reshape(w.shape[0], -1)


def _pad(layer: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x`` padded as the conv would pad it (string paddings included); the padding left to unfold."""
    if not isinstance(layer.padding, str):
        return x, tuple(layer.padding)
    if layer.padding == "valid":
        return x, (0,) * len(layer.kernel_size)
    pads: list[int] = []  # 'same': F.pad's order is last dim first
    for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads), (0,) * len(layer.kernel_size)


def input_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows of features, one row per output position (conv: unfolded patches)."""
    if isinstance(layer, _CONVS):
        x, padding = _pad(layer, x)
        if isinstance(layer, nn.Conv1d):
            cols = F.unfold(x.unsqueeze(2), (1, *layer.kernel_size), dilation=(1, *layer.dilation),
                            padding=(0, *padding), stride=(1, *layer.stride))
        else:
            cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def output_rows(layer: nn.Module, y: Tensor) -> Tensor:
    """The layer's output as rows (out features last), in :func:`input_rows`' row order."""
    if isinstance(layer, _CONVS) or (isinstance(layer, nn.modules.conv._ConvNd) and y.dim() > 2):
        return y.movedim(1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])
