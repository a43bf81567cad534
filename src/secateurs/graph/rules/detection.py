"""Rules for detection ops: RoI pooling keeps channels; NMS, anchor grids and rankings are coordinates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..registry import UnknownCall, arg, rule, tensors
from .elementwise import constant

if TYPE_CHECKING:
    from ..trace import Tracer

rule("torchvision.nms", "torch.meshgrid", "torch.functional.meshgrid", "torch.Tensor.nonzero", "torch.nonzero",
     "torch.where_nonzero")(constant)


@rule("torchvision.roi_align", "torchvision.roi_pool", "torchvision._roi_align")
def roi_pool(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``torchvision.ops.roi_align(input, boxes, ...)`` and ``roi_pool``: one (C, h, w) crop per box.

    The crops keep the feature map's channels; the boxes are coordinates and stay.
    """
    x, boxes = args[0], args[1]
    lx = tr.get(x)
    for t in tensors([boxes]):
        tr.freeze_tensor(t)
    for o in tensors([out]):  # roi_pool gives (crops, argmax)
        if o.dim() != 4 or x.dim() != 4 or o.shape[1] != x.shape[1]:
            raise UnknownCall
        tr.set(o, [torch.zeros(o.shape[0], dtype=torch.long), lx[1],
                   *(torch.zeros(s, dtype=torch.long) for s in o.shape[2:])])


@rule("torch.topk", "torch.Tensor.topk")
def topk(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``x.topk(k, dim)``: other dims pass through; the chosen dim is new
    (a channel dim ranked there keeps its size: frozen)."""
    _ranked(tr, args, kwargs, out, arg(args, kwargs, 2, "dim", -1))


@rule("torch.sort", "torch.Tensor.sort", "torch.argsort", "torch.Tensor.argsort")
def sort(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``x.sort(dim)`` / ``argsort``: like :func:`topk`, with ``dim`` second."""
    _ranked(tr, args, kwargs, out, arg(args, kwargs, 1, "dim", -1))


def _ranked(tr: Tracer, args: Sequence, kwargs: dict, out: Any, dim: Any) -> None:
    x = args[0]
    lx = tr.get(x)
    if not isinstance(dim, int) or x.dim() == 0:
        raise UnknownCall
    dim %= x.dim()
    tr.freeze(lx[dim])
    for o in tensors([out]):
        if o.dim() != x.dim():
            raise UnknownCall
        tr.set(o, [torch.zeros(o.shape[d], dtype=torch.long) if d == dim else lx[d] for d in range(o.dim())])
