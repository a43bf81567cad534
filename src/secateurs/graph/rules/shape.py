"""Rules for ops that move elements without mixing them: views, permutes, cat, split, indexing, writes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..probes import place, replay
from ..registry import UnknownCall, arg, rule

if TYPE_CHECKING:
    from ..trace import Tracer

# replayed on label probes (see ..probes): no rule of their own is needed
_REPLAYED = ("view", "reshape", "_unsafe_view", "unflatten", "squeeze", "expand", "repeat", "movedim", "moveaxis",
             "narrow", "select", "__getitem__", "unbind", "tensor_split", "flip", "roll", "repeat_interleave", "tile")
rule(*(p + n for p in ("torch.Tensor.", "torch.") for n in _REPLAYED),
     *("torch." + n for n in ("stack", "hstack", "vstack", "split_with_sizes")),
     *(p + n for p in ("torch.nn.functional.", "torch.")
       for n in ("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle")))(replay)


@rule("torch.cat", "torch.concat", "torch.concatenate")
def cat(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """The cat dim's labels follow each other; every other dim is coupled across the inputs."""
    tensors_ = list(arg(args, kwargs, 0, "tensors"))
    dim = arg(args, kwargs, 1, "dim", 0)
    tensors_ = [t for t in tensors_ if not (t.dim() == 1 and t.numel() == 0)]  # legacy empty inputs
    if not tensors_ or any(t.dim() != out.dim() for t in tensors_):
        raise UnknownCall
    dim %= out.dim()
    labels = [tr.get(t) for t in tensors_]
    merged = []
    for d in range(out.dim()):
        if d == dim:
            merged.append(torch.cat([lab[d] for lab in labels]))
        else:
            for lab in labels[1:]:
                tr.couple(labels[0][d], lab[d])
            merged.append(labels[0][d])
    tr.set(out, merged)


@rule("torch.permute", "torch.Tensor.permute")
def permute(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    dims = args[1:] if len(args) > 2 else arg(args, kwargs, 1, "dims")
    if isinstance(dims, int):
        dims = [dims]
    lx = tr.get(x)
    tr.set(out, [lx[d % x.dim()] for d in dims])


@rule("torch.transpose", "torch.Tensor.transpose", "torch.swapaxes", "torch.Tensor.swapaxes", "torch.swapdims",
      "torch.Tensor.swapdims", "torch.t", "torch.Tensor.t")
def transpose(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    lx = list(tr.get(x))
    if x.dim() < 2:
        tr.set(out, lx)
        return
    a, b = (arg(args, kwargs, 1, "dim0", 0), arg(args, kwargs, 2, "dim1", 1)) if len(args) > 1 or kwargs else (0, 1)
    a, b = a % x.dim(), b % x.dim()
    lx[a], lx[b] = lx[b], lx[a]
    tr.set(out, lx)


@rule("torch.unsqueeze", "torch.Tensor.unsqueeze")
def unsqueeze(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    dim = arg(args, kwargs, 1, "dim") % (x.dim() + 1)
    lx = list(tr.get(x))
    lx.insert(dim, torch.zeros(1, dtype=torch.long))
    tr.set(out, lx)


@rule("torch.flatten", "torch.Tensor.flatten")
def flatten(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """Index j of the merged dim comes from index (j // inner) of its one prunable dim."""
    x = args[0]
    start = arg(args, kwargs, 1, "start_dim", 0) % max(x.dim(), 1)
    end = arg(args, kwargs, 2, "end_dim", -1) % max(x.dim(), 1)
    lx = tr.get(x)
    if x.dim() == 0 or end < start:
        raise UnknownCall
    merged_dims = list(range(start, end + 1))
    sizes = [x.shape[d] for d in merged_dims]
    grid = None
    chosen = None
    for pos, d in enumerate(merged_dims):
        if x.shape[d] > 1 and bool((lx[d] != 0).any()):
            if chosen is not None:
                replay(tr, func, args, kwargs, out)  # two channel dims merged: the generic rule decides
                return
            chosen = pos
    total = 1
    for s_ in sizes:
        total *= s_
    if chosen is None:
        grid = torch.zeros(total, dtype=torch.long)
    else:
        inner = 1
        for s_ in sizes[chosen + 1 :]:
            inner *= s_
        outer = total // (sizes[chosen] * inner)
        grid = lx[merged_dims[chosen]].repeat_interleave(inner).repeat(outer)
    tr.set(out, list(lx[:start]) + [grid] + list(lx[end + 1 :]))


@rule("torch.Tensor.chunk", "torch.chunk")
def chunk(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``chunk(n)`` re-splits evenly after pruning: prune the same position in every part."""
    x = args[0]
    chunks = arg(args, kwargs, 1, "chunks")
    dim = arg(args, kwargs, 2, "dim", 0) % x.dim()
    lx = tr.get(x)
    parts = list(out)
    if x.shape[dim] % chunks or len(parts) != chunks:
        raise UnknownCall
    grid = lx[dim].view(chunks, -1)
    tr.couple(grid, grid[0])
    for i, part in enumerate(parts):
        labels = list(lx)
        labels[dim] = grid[i]
        tr.set(part, labels)


@rule("torch.split", "torch.Tensor.split", "torch.functional.split")
def split(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``x.split(size, dim)`` with a size that divides the dim: equal parts, like ``chunk``.

    The size is often a module attribute (GPT-2's ``split_size``, Res2Net's
    ``width``): after pruning every part the same way, it must say the new width.
    Other splits (a list of sizes, a ragged last part) are replayed on probes.
    """
    x = args[0]
    size = arg(args, kwargs, 1, "split_size_or_sections", kwargs.get("split_size"))
    dim = arg(args, kwargs, 2, "dim", 0)
    if not isinstance(size, int) or not isinstance(dim, int) or x.shape[dim % x.dim()] % size:
        replay(tr, func, args, kwargs, out)
        if isinstance(size, (list, tuple)) and isinstance(dim, int) and all(type(s) is int for s in size):
            # split([key_dim, key_dim, val_dim]) (LeViT): each size is an attribute that must say its
            # part's new width; parts pruned alike (q and k, contracted together) give it the same value
            for part, s in zip(out, size, strict=True):
                tr.link_size(s, tr.get(part)[dim % x.dim()])
        return
    dim %= x.dim()
    chunks = x.shape[dim] // size
    chunk(tr, func, (x, chunks, dim), {}, out)
    tr.link_size(size, tr.get(out[0])[dim])


@rule("torch.gather", "torch.Tensor.gather")
def gather(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``gather(x, dim, index)``: positions along ``dim`` are picked by data, so that dim of ``x`` is kept;
    other dims pass through where ``index`` spans them whole."""
    x, dim, index = args[0], arg(args, kwargs, 1, "dim"), arg(args, kwargs, 2, "index")
    if not isinstance(dim, int) or not isinstance(index, Tensor):
        raise UnknownCall
    dim %= x.dim()
    lx, li = tr.get(x), tr.get(index)
    tr.freeze(lx[dim])
    labels = []
    for d in range(out.dim()):
        if d != dim and x.shape[d] == out.shape[d]:
            tr.couple(lx[d], li[d])
            labels.append(lx[d])
        else:
            labels.append(li[d])
    tr.set(out, labels)


@rule("torch.nn.functional.pad")
def pad(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``F.pad``: dims padded by (0, 0) keep their labels; padded dims are new."""
    x = args[0]
    widths = list(arg(args, kwargs, 1, "pad"))
    lx = tr.get(x)
    labels = [torch.zeros(s, dtype=torch.long) for s in out.shape]
    for d in range(x.dim()):
        k = x.dim() - 1 - d  # pad pairs run from the last dim backwards
        before, after = (widths[2 * k], widths[2 * k + 1]) if 2 * k + 1 < len(widths) else (0, 0)
        if before == 0 and after == 0:
            labels[d] = lx[d]
        elif bool((lx[d] != 0).any()):
            tr.freeze(lx[d])  # padding a channel dim: its size is a constant
    tr.set(out, labels)


@rule(*(p + n for p in ("torch.Tensor.", "torch.") for n in ("view_as", "reshape_as")))
def shaped_as(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``x.reshape_as(y)``, ``view_as``: ``x``'s elements in ``y``'s shape.

    ``y`` lends only its shape, so its channels do not flow into the output
    (replaying it would find them nowhere and freeze them). But the output's
    shape follows ``y``'s after pruning: each output dim is coupled with ``y``'s
    (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``).
    """
    _as(tr, func, args, kwargs, out, broadcast=False)


@rule("torch.Tensor.expand_as", "torch.expand_as")
def expanded_as(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``x.expand_as(y)``: like :func:`shaped_as`, and a dim ``x`` broadcasts takes ``y``'s labels."""
    _as(tr, func, args, kwargs, out, broadcast=True)


def _as(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Tensor, broadcast: bool) -> None:
    x, other = args[0], arg(args, kwargs, 1, "other")
    if not isinstance(other, Tensor) or out.shape != other.shape:
        raise UnknownCall
    replay(tr, func, args, kwargs, out, follow=[x])
    labels, lo = list(tr.get(out)), tr.get(other)
    for d in range(out.dim()):
        xd = d - (out.dim() - x.dim())
        if broadcast and (xd < 0 or x.shape[xd] != out.shape[d]):
            labels[d] = lo[d]
        else:
            tr.couple(labels[d], lo[d])  # a fixed side (label 0) keeps the other side whole
    tr.set(out, labels)


@rule("torch.Tensor.__setitem__", in_place=True)
def setitem(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``target[index] = value``: where ``value``'s channels land in ``target``.

    A tensor made from sizes to be filled (``torch.zeros((n, C, 7, 7))`` that RoI
    pooling over several feature levels writes into, level by level) takes the
    labels written into it, and further writes are coupled with them. Any other
    target keeps its own labels: a channel written where the target's dim is
    fixed is frozen, since the target's size will not follow it.
    """
    target, index, value = args[0], args[1], args[2]
    if not isinstance(value, Tensor):
        return  # a scalar fill: the layout is unchanged
    current = tr.get(target)
    is_blank = id(target) in tr.blank
    written: list[Tensor | None] = [None] * target.dim()
    landed = torch.zeros(0, dtype=torch.bool)
    for d, ld in enumerate(tr.get(value)):
        if not bool((ld != 0).any()):
            continue
        shape = [1] * value.dim()
        shape[d] = value.shape[d]
        probe = torch.full(target.shape, -1.0, dtype=torch.float64)
        probe[index] = torch.arange(value.shape[d], dtype=torch.float64).view(shape).expand(value.shape)
        landed = torch.zeros(ld.numel(), dtype=torch.bool)
        place(tr, target, probe.round().long(), ld, d, value, landed, written, func)
    labels = list(current)
    for e, lab in enumerate(written):
        if lab is None:
            continue
        new = lab != 0
        both = new & (current[e] != 0)
        if bool(both.any()):
            tr.couple(current[e][both], lab[both])
        if is_blank:
            labels[e] = torch.where(new & (current[e] == 0), lab, current[e])
        elif bool((new & (current[e] == 0)).any()):
            tr.freeze(lab[new & (current[e] == 0)])
    tr.set(target, labels)
    if is_blank:
        tr.blank.add(id(target))
