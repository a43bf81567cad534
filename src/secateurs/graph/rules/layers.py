"""Rules for ops with weights (convolution, linear, matmul, normalisation, embedding) and pooling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..registry import UnknownCall, arg, rule, tensors

if TYPE_CHECKING:
    from ..trace import Tracer


def _conv(transposed: bool) -> Callable:
    def conv(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
        x, w = args[0], arg(args, kwargs, 1, "weight")
        bias = arg(args, kwargs, 2, "bias")
        groups = arg(args, kwargs, 6, "groups", 1)  # conv: (.., dilation, groups); transposed: (.., groups, dilation)
        lx, lw = tr.get(x), tr.get(w)
        batched = x.dim() == w.dim()
        cdim = 1 if batched else 0
        in_lab = lx[cdim]
        # weight: conv (out, in/g, *k); transposed (in, out/g, *k)
        w_in, w_out = (lw[0], lw[1]) if transposed else (lw[1], lw[0])
        for kernel_dim in lw[2:]:
            tr.freeze(kernel_dim)  # kernel size is not a channel
        out_labels = [torch.zeros(s, dtype=torch.long) for s in out.shape]
        if batched:
            out_labels[0] = lx[0]
        per_group_in = in_lab.numel() // groups
        if transposed:
            # output channel j of group g is weight[:, j] for every group; in = weight dim 0
            tr.couple(in_lab, w_in)
            out_lab = w_out.repeat(groups) if groups > 1 else w_out
            if groups > 1:
                tr.couple(in_lab.view(groups, -1), in_lab.view(groups, -1)[0])
        elif groups == 1:
            tr.couple(in_lab, w_in)
            out_lab = w_out
        elif per_group_in == 1:
            # depthwise: input channel c feeds output channels c*k .. c*k+k-1 only
            tr.couple(w_out.view(groups, -1), in_lab.view(groups, 1))
            tr.freeze(w_in)
            out_lab = w_out
        else:
            # grouped: prune the same position in every group, so groups stay equal
            tr.couple(in_lab.view(groups, per_group_in), w_in)
            tr.couple(w_out.view(groups, -1), w_out.view(groups, -1)[0])
            out_lab = w_out
        out_labels[cdim] = out_lab
        if bias is not None:
            tr.couple(tr.get(bias)[0], out_lab)
        tr.set(out, out_labels)

    conv.__qualname__ = "conv_transpose" if transposed else "conv"
    return conv


conv = rule(*(f"{p}conv{n}d" for n in (1, 2, 3) for p in ("torch.nn.functional.", "torch.")))(_conv(False))
conv_transpose = rule(*(f"{p}conv_transpose{n}d" for n in (1, 2, 3)
                        for p in ("torch.nn.functional.", "torch.")))(_conv(True))


@rule("torch.nn.functional.linear")
def linear(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x, w = args[0], arg(args, kwargs, 1, "weight")
    bias = arg(args, kwargs, 2, "bias")
    lx, lw = tr.get(x), tr.get(w)
    tr.couple(lx[-1], lw[1])
    if bias is not None:
        tr.couple(tr.get(bias)[0], lw[0])
    tr.set(out, list(lx[:-1]) + [lw[0]])


@rule("torch.matmul", "torch.Tensor.matmul", "torch.Tensor.__matmul__", "torch.bmm", "torch.Tensor.bmm", "torch.mm",
      "torch.Tensor.mm")
def matmul(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    a, b = args[0], args[1]
    if a.dim() < 2 or b.dim() < 2:
        raise UnknownCall
    la, lb = tr.get(a), tr.get(b)
    tr.couple(la[-1], lb[-2])
    batch = out.dim() - 2
    labels: list[Tensor] = []
    for i in range(batch):
        cands = []
        for t, lab in ((a, la), (b, lb)):
            j = i - (batch - (t.dim() - 2))
            if j >= 0 and t.shape[j] != 1:
                cands.append(lab[j])
        if len(cands) == 2:
            tr.couple(cands[0], cands[1])
        labels.append(cands[0] if cands else torch.zeros(out.shape[i], dtype=torch.long))
    tr.set(out, labels + [la[-2], lb[-1]])


@rule("torch.addmm", "torch.Tensor.addmm", "torch.baddbmm", "torch.Tensor.baddbmm")
def addmm(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``addmm(bias, a, b)`` / ``baddbmm``: a matmul plus a broadcast addend (GPT-2's Conv1D)."""
    bias, a, b = args[0], args[1], args[2]
    matmul(tr, func, (a, b), {}, out)
    labels = tr.get(out)
    lb = tr.get(bias)
    for d in range(bias.dim()):
        od = out.dim() - bias.dim() + d
        if bias.shape[d] == out.shape[od]:
            tr.couple(lb[d], labels[od])


@rule("torch.nn.functional.batch_norm", "torch.nn.functional.instance_norm")  # the same argument layout
def batch_norm(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    lx = tr.get(x)
    names = ("running_mean", "running_var", "weight", "bias")
    for i, name in enumerate(names, start=1):
        t = arg(args, kwargs, i, name)
        if isinstance(t, Tensor):
            tr.couple(tr.get(t)[0], lx[1])
    tr.set(out, list(lx))


@rule("torch.nn.functional.layer_norm")
def layer_norm(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    shape = arg(args, kwargs, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    lx = tr.get(x)
    weight = arg(args, kwargs, 2, "weight")
    bias = arg(args, kwargs, 3, "bias")
    affine = [t for t in (weight, bias) if isinstance(t, Tensor)]
    for k in range(n):
        d = x.dim() - n + k
        if not affine:
            tr.freeze(lx[d])  # the shape is a constant in the call: keep it
        for t in affine:
            tr.couple(tr.get(t)[k], lx[d])
    tr.set(out, list(lx))


@rule("torch.nn.functional.rms_norm")
def rms_norm(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    shape = arg(args, kwargs, 1, "normalized_shape")
    weight = arg(args, kwargs, 2, "weight")
    lx = tr.get(x)
    n = len(shape)
    for k in range(n):
        d = x.dim() - n + k
        if isinstance(weight, Tensor):
            tr.couple(tr.get(weight)[k], lx[d])
        else:
            tr.freeze(lx[d])
    tr.set(out, list(lx))


@rule("torch.nn.functional.group_norm")
def group_norm(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    groups = arg(args, kwargs, 1, "num_groups")
    lx = tr.get(x)
    for i, name in ((2, "weight"), (3, "bias")):
        t = arg(args, kwargs, i, name)
        if isinstance(t, Tensor):
            tr.couple(tr.get(t)[0], lx[1])
    if groups > 1:  # keep every group the same size
        tr.couple(lx[1].view(groups, -1), lx[1].view(groups, -1)[0])
    tr.set(out, list(lx))


@rule("torch.nn.functional.embedding")
def embedding(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    ids, w = args[0], args[1]
    lw = tr.get(w)
    tr.freeze(lw[0])  # rows are addressed by token id
    tr.set(out, list(tr.get(ids)) + [lw[1]])


@rule("torch.nn.functional.prelu")
def prelu(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x, w = args[0], args[1]
    lx = tr.get(x)
    if w.numel() > 1:
        tr.couple(tr.get(w)[0], lx[1])
    tr.set(out, list(lx))


@rule(*("torch.nn.functional." + n for n in (
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
    "max_pool2d_with_indices")), "torch.max_pool2d", "torch.avg_pool1d")
def channels_kept(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """Pooling and resizing: batch and channel dims pass through, the rest is new."""
    x = args[0]
    lx = tr.get(x)
    for o in tensors([out]):  # max_pool(return_indices=True) gives (values, indices)
        if o.dim() != x.dim() or x.dim() < 3:
            raise UnknownCall
        # (N, C, *spatial) or unbatched (C, *spatial): the first two dims are never
        # resized by pooling/resizing (for unbatched inputs the second is spatial and fixed)
        labels = [lx[0], lx[1]] + [torch.zeros(s, dtype=torch.long) for s in o.shape[2:]]
        tr.set(o, labels)
