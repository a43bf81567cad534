"""Replaying a call on label probes: how the view, indexing and cat rules see where channels go.

For each dimension of each tensor argument, a tensor of that argument's shape
holding the dimension's indices (and -1 in every other argument) is pushed
through the same call. Where the indices land in the output tells which output
dimension carries which labels, whatever the call (``view(b, t, -1, d)``,
``x[:, ::2]``, ``pixel_shuffle``...), without a rule per op.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .registry import UnknownCall, tensors

if TYPE_CHECKING:
    from .trace import Tracer

__all__ = ["op_name_cached", "place", "probe_func", "replay"]


def probe_func(func: Callable, args: Sequence, kwargs: dict) -> Callable:
    """The callable replayed on label tensors, annotated with the -1 position of views."""

    def probe(*a: Any, **k: Any) -> Any:
        return func(*a, **k)

    probe.__wrapped__ = func  # type: ignore[attr-defined]

    name = op_name_cached(func)
    if name.endswith((".view", ".reshape")) and len(args) > 1:
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple, torch.Size)) else args[1:]
        sizes = list(sizes)
        if sizes.count(-1) == 1 and all(isinstance(s, int) for s in sizes):
            probe._secateurs_inferred = sizes.index(-1)  # type: ignore[attr-defined]
    return probe


_NAMES: dict[Any, str] = {}


def op_name_cached(func: Callable) -> str:
    """``torch.overrides.resolve_name``, remembered: it enters a warnings filter on every call.

    "" for a function torch does not name.
    """
    try:
        return _NAMES[func]
    except KeyError:
        name = _NAMES[func] = torch.overrides.resolve_name(func) or ""
        return name
    except TypeError:  # an unhashable callable
        return torch.overrides.resolve_name(func) or ""


def replay(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any,
           follow: Sequence[Tensor] | None = None) -> None:
    """Views, permutes, cat, indexing...: replay the call on label tensors.

    For each dimension of each tensor argument, a tensor of that argument's
    shape holding the dimension's labels (and -1 in every other argument) is
    pushed through the same call. Where the labels land in the output tells
    which output dimension carries which labels. ``follow`` limits this to some
    arguments (``x.reshape_as(y)`` takes only a shape from ``y``).
    """
    inputs = tensors(list(args) + list(kwargs.values()))
    outs = tensors([out])
    out_labels: list[list[Tensor | None]] = [[None] * t.dim() for t in outs]
    for ti, t in enumerate(inputs):
        if not t.is_floating_point():
            continue  # index tensors say where to look, they carry no channels
        if follow is not None and not any(t is f for f in follow):
            continue
        lab = tr.get(t)
        for d, ld in enumerate(lab):
            if not bool((ld != 0).any()):
                continue  # fixed dims (batch, spatial, tokens) carry nothing to follow
            probe_args, probe_kwargs = _substitute(args, kwargs, inputs, ti, d)
            try:
                probed = [p.round().long() for p in tensors([func(*probe_args, **probe_kwargs)])]
            except (RuntimeError, TypeError, ValueError, IndexError):
                raise UnknownCall from None
            landed_anywhere = torch.zeros(ld.numel(), dtype=torch.bool)
            for oi, (o, p) in enumerate(zip(outs, probed, strict=True)):
                place(tr, o, p, ld, d, t, landed_anywhere, out_labels[oi], func)
            if ld.numel() > 1 and not bool(landed_anywhere.all()):
                tr.freeze(ld)  # constant indices select a subset: they would shift after pruning
    for o, labels in zip(outs, out_labels, strict=True):
        tr.set(o, [lab if lab is not None else torch.zeros(o.shape[i], dtype=torch.long)
                   for i, lab in enumerate(labels)])


def _substitute(args: Sequence, kwargs: dict, inputs: list[Tensor], ti: int, d: int) -> tuple[Any, Any]:
    target = inputs[ti]
    # Encode "index i of dim d" as i; -1 marks entries that do not come from this dim.
    shape = [1] * target.dim()
    shape[d] = target.shape[d]
    index = torch.arange(target.shape[d], dtype=torch.float64).view(shape).expand(target.shape).contiguous()

    def swap(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            if obj is target:
                return index
            if not obj.is_floating_point():
                return obj  # indices and masks keep their values
            return torch.full(obj.shape, -1.0, dtype=torch.float64)
        if isinstance(obj, (list, tuple)):
            return type(obj)(swap(o) for o in obj)
        return obj

    return swap(list(args)), {k: swap(v) for k, v in kwargs.items()}


def place(tr: Tracer, o: Tensor, p: Tensor, ld: Tensor, d: int, src: Tensor, landed: Tensor,
          labels: list[Tensor | None], func: Callable) -> None:
    """Merge into ``labels`` (of output ``o``) where the probe ``p`` says source dim ``d``'s indices went."""
    if p.shape != o.shape:
        raise UnknownCall
    present = p >= 0
    everywhere = bool(present.all())
    if not everywhere and not bool(present.any()):
        return
    varying = []
    for e in range(p.dim()):
        n = p.shape[e]
        if n == 1:
            continue
        if everywhere:  # one comparison of neighbours tells whether the index changes along e
            if bool((p.narrow(e, 1, n - 1) != p.narrow(e, 0, n - 1)).any()):
                varying.append(e)
            continue
        hi = p.masked_fill(~present, -1).amax(dim=e)
        lo = -(-p).masked_fill(~present, -(1 << 62)).amax(dim=e)  # amin is far slower than amax on int64
        if bool(((hi != lo) & (hi >= 0)).any()):
            varying.append(e)
    landed[p.reshape(-1) if everywhere else p[present]] = True
    if not varying:
        # one index of the source dim survives into a dim-less position (select)
        if ld.numel() > 1:
            tr.freeze(ld)
        return
    if len(varying) == 1:
        e = varying[0]
        # positions along e that hold a source index; other positions (cat) are untouched
        others = [i for i in range(p.dim()) if i != e]
        idx = p.masked_fill(~present, -1).amax(dim=others) if others else p
        mask = idx >= 0
        mapped = torch.zeros(o.shape[e], dtype=torch.long)
        mapped[mask] = ld[idx[mask]]
        _merge(tr, labels, e, mapped, mask)
        return
    # The source dim was split over several output dims (e.g. channels -> heads x head_dim).
    carrier = _carrier(func, p, varying)
    e = carrier
    idx = p.masked_fill(~present, -1).movedim(e, 0).reshape(p.shape[e], -1)
    # every index along the carrier takes all the labels it holds: they go together
    # vectorised: couple every present entry of a row with the row's largest entry
    first = idx.max(dim=1).values
    rows = first.unsqueeze(1).expand_as(idx)
    present_rows = idx >= 0
    if bool(present_rows.any()):
        tr.couple(ld[idx[present_rows]], ld[rows[present_rows]])
    mask = first >= 0
    mapped = torch.zeros(o.shape[e], dtype=torch.long)
    mapped[mask] = ld[first[mask]]
    _merge(tr, labels, e, mapped, mask)


def _merge(tr: Tracer, labels: list[Tensor | None], e: int, mapped: Tensor, mask: Tensor) -> None:
    current = labels[e]
    if current is None:
        labels[e] = torch.where(mask, mapped, torch.zeros_like(mapped))
        return
    both = mask & (current != 0) & (mapped != 0)
    if bool(both.any()):
        # two sources meet at the same positions (cat's other dims, or two prunable
        # dims merged into one): they are removed together
        tr.couple(current[both], mapped[both])
    labels[e] = torch.where(mask & (current == 0), mapped, current)


def _carrier(func: Callable, probe: Tensor, varying: list[int]) -> int:
    """Which of the output dims a split dimension should be pruned along.

    The dim a view/reshape was told to infer (-1) adapts by itself after
    pruning (``view(b, t, -1, head_dim)``: heads are the unit). Otherwise the
    largest one (``view(b, groups, c // groups, h, w)``: channels per group).
    """
    inferred = getattr(func, "_secateurs_inferred", None)
    if inferred is not None and inferred in varying:
        return inferred
    return max(varying, key=lambda e: (probe.shape[e], -e))

