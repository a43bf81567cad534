"""Find which dimensions of which tensors must be pruned together.

Why a runtime trace at the ``__torch_function__`` level: symbolic tracing
(torch.fx) fails on the control flow real models have, and the ATen
(dispatch) level has already lowered ``x.chunk(2)`` and ``x.view(b, t, -1, d)``
into constant-size splits and views, losing what the code will do once a
tensor is smaller. At the torch-function level we see every call the forward
actually makes, with its Python arguments (-1 included), and calls into
composite functions (attention, layer norm) arrive as one call.

The analysis gives every index of every tensor dimension an integer *label*.
Parameters and buffers get fresh labels per index of each dimension; data
and anything we cannot follow get label 0, which means "fixed". Each call
either maps its inputs' labels onto its outputs (a convolution's output
channels carry its weight's dim-0 labels) or records that two labels must be
removed together (an addition couples its operands index by index). When the
forward is done, connected components of those couplings are the prunable
channels; a component linked to label 0 is frozen (model inputs and outputs,
ignored layers and calls we do not understand end up there, and are reported).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, resolve_name

from ..errors import SecateursError
from ..selection import call_model
from ..utils import eval_mode, first_line, output_shapes

__all__ = ["LabelTrace", "trace_labels"]

FROZEN = 0


@dataclass
class LabelTrace:
    """The result of tracing: labels of every parameter/buffer dimension and the couplings."""

    num_labels: int
    tensor_labels: dict[str, list[Tensor]]  # tensor name -> one label array per dim
    edges_a: list[Tensor] = field(default_factory=list)
    edges_b: list[Tensor] = field(default_factory=list)
    unknown_calls: dict[str, int] = field(default_factory=dict)
    attribute_links: list[tuple[str, str, Tensor]] = field(default_factory=list)  # module, attr, labels
    output_shapes: Any = None  # shapes of the model's output on the example inputs

    def components(self) -> Tensor:
        """Root label of each label's component (0 for frozen components)."""
        parent = torch.arange(self.num_labels)
        if not self.edges_a:
            return parent
        a = torch.cat(self.edges_a)
        b = torch.cat(self.edges_b)
        while True:
            pa, pb = parent[a], parent[b]
            low = torch.minimum(pa, pb)
            new = parent.clone()
            new.scatter_reduce_(0, pa, low, reduce="amin")
            new.scatter_reduce_(0, pb, low, reduce="amin")
            while True:  # pointer jumping: every label points at its current root
                jumped = new[new]
                if torch.equal(jumped, new):
                    break
                new = jumped
            if torch.equal(new, parent):
                return parent
            parent = new


class _Tracer(TorchFunctionMode):
    def __init__(self, named_tensors: dict[int, str], module_stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.names = named_tensors
        self.module_stack = module_stack
        self.next_label = 1
        self.labels: dict[int, list[Tensor]] = {}
        self.keep: list[Tensor] = []  # keep traced tensors alive so ids are not reused
        self.tensor_labels: dict[str, list[Tensor]] = {}
        self.edges_a: list[Tensor] = []
        self.edges_b: list[Tensor] = []
        self.unknown: dict[str, int] = {}
        self.links: list[tuple[str, str, Tensor]] = []

    # -- labels ---------------------------------------------------------------------------
    def fresh(self, n: int) -> Tensor:
        out = torch.arange(self.next_label, self.next_label + n)
        self.next_label += n
        return out

    def get(self, t: Tensor) -> list[Tensor]:
        key = id(t)
        if key in self.labels:
            return self.labels[key]
        name = self.names.get(key)
        if name is not None:
            labels = [self.fresh(s) for s in t.shape]
            self.tensor_labels[name] = labels
        else:  # data, constants, anything we did not see being made
            labels = [torch.zeros(s, dtype=torch.long) for s in t.shape]
        self.set(t, labels)
        return labels

    def set(self, t: Tensor, labels: list[Tensor]) -> None:
        self.labels[id(t)] = labels
        self.keep.append(t)

    def frozen(self, t: Tensor) -> None:
        self.set(t, [torch.zeros(s, dtype=torch.long) for s in t.shape])

    def couple(self, a: Tensor, b: Tensor) -> None:
        if a.numel() and b.numel():
            if a.shape != b.shape:
                a, b = torch.broadcast_tensors(a, b)
            self.edges_a.append(a.reshape(-1).clone())
            self.edges_b.append(b.reshape(-1).clone())

    def freeze(self, labels: Tensor) -> None:
        self.couple(labels, torch.zeros_like(labels))

    def freeze_tensor(self, t: Tensor) -> None:
        for lab in self.get(t):
            self.freeze(lab)

    def link_sizes(self, sizes: list[Any], out: Tensor) -> None:
        """Remember module attributes that hold the size of a prunable output dim.

        ``x.reshape(n, self.hidden_dim, -1)`` keeps 768 in ``hidden_dim``: after
        pruning that dim, the attribute must say the new width. A ``-1`` stands
        for the size it resolved to: ``view(b, t, -1, self.head_dim)`` leaves the
        head count to ``-1``, and other code reads it from ``num_heads``.
        """
        if len(sizes) != out.dim():
            return
        labels = self.labels.get(id(out))
        if labels is None:
            return
        given = {s for s in sizes if isinstance(s, int) and s != -1}
        for e, size in enumerate(sizes):
            if size == -1 and out.shape[e] in given:
                # view(b, t, -1, self.head_dim) with 8 heads of 8: an attribute equal to the head count
                # may as well be the head width given beside it; linking it would shrink it with the heads
                continue
            self.link_size(out.shape[e] if size == -1 else size, labels[e])

    def link_size(self, size: Any, labels: Tensor) -> None:
        """Link the module attributes equal to ``size`` to the dim labelled ``labels``.

        The innermost module on the call stack that has such attributes wins;
        all of its attributes with that value are linked (GPT-2 keeps the same
        width as ``embed_dim`` and ``split_size``). The meta rehearsal catches
        a coincidence that breaks the forward.
        """
        if not isinstance(size, int) or size <= 1 or not bool((labels != 0).any()):
            return
        for mod_name, module in reversed(self.module_stack):
            attrs = [k for k, v in vars(module).items() if type(v) is int and v == size and not k.startswith("_")]
            for attr in attrs:
                self.links.append((mod_name, attr, labels.clone()))
            if attrs:
                return

    # -- dispatch -------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._current_func = _probe_func(func, args, kwargs)
        name = _name_of(func) or getattr(func, "__name__", repr(func))
        if not _has_tensor(out):
            return out  # size(), dim(), dtype, shape: nothing to label
        rule = RULES.get(name)
        try:
            if rule is None:
                raise _Unknown
            rule(self, args, kwargs, out)
            if name.endswith(_SIZED) and isinstance(out, Tensor):
                self.link_sizes(_size_args(args, kwargs), out)
        except (_Unknown, AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError):
            # A call a rule cannot follow (or an unusual signature) is treated as unknown:
            # everything through it is kept, which is always safe.
            self.unknown[name] = self.unknown.get(name, 0) + 1
            for t in _tensors(args) + _tensors(list(kwargs.values())):
                self.freeze_tensor(t)
            for t in _tensors([out]):
                self.frozen(t)
        return out


_SIZED = (".view", ".reshape", ".expand", ".new_zeros", ".new_ones", ".new_empty", ".new_full", ".unflatten")


def _size_args(args: Sequence, kwargs: dict) -> list[Any]:
    rest = list(args[1:])
    if len(rest) >= 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0])
    if "size" in kwargs:
        return list(kwargs["size"])
    return rest


class _Unknown(Exception):
    """A call whose effect on channels we cannot follow."""


def _tensors(items: Any) -> list[Tensor]:
    found: list[Tensor] = []
    stack = list(items) if isinstance(items, (list, tuple)) else [items]
    while stack:
        item = stack.pop(0)
        if isinstance(item, Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack[:0] = list(item)
    return found


def _has_tensor(obj: Any) -> bool:
    return bool(_tensors([obj]))


# ---- rules ----------------------------------------------------------------------------------
# A rule gets (tracer, args, kwargs, out) and must label every tensor in ``out``.


def _arg(args: Sequence, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _pointwise(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    outs = _tensors([out])
    if len(outs) != 1:
        raise _Unknown
    res = outs[0]
    inputs = [t for t in _tensors(list(args) + list(kwargs.values())) if t is not res or id(t) in tr.labels]
    labels: list[Tensor | None] = [None] * res.dim()
    for t in inputs:
        lab = tr.get(t)
        offset = res.dim() - t.dim()
        if offset < 0:
            raise _Unknown
        for d, ld in enumerate(lab):
            od = d + offset
            if t.shape[d] == 1 and res.shape[od] != 1:
                continue  # broadcast: no correspondence
            if labels[od] is None:
                labels[od] = ld
            else:
                tr.couple(labels[od], ld)
    tr.set(res, [ld if ld is not None else torch.zeros(res.shape[i], dtype=torch.long) for i, ld in enumerate(labels)])


def _identity(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    """Output has the shape and channel layout of the first tensor argument.

    Casts and copies, ``zeros_like(x)`` and friends, and softmax/cumsum (which
    mix values only along one dim) all keep the layout.
    """
    src = _tensors(list(args))[0]
    for t in _tensors([out]):
        if t.shape != src.shape:
            raise _Unknown
        tr.set(t, list(tr.get(src)))


def _constant(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    """A new tensor from sizes and values in the code (positions, masks): fixed, carries nothing."""
    for t in _tensors([out]):
        tr.frozen(t)
    for t in _tensors(list(args)):
        tr.freeze_tensor(t)  # e.g. tril(x): a fixed-size pattern over x


def _fresh(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    """``x.new_zeros(sizes)`` and friends: ``x`` lends only dtype and device, its channels are untouched."""
    for t in _tensors([out]):
        tr.frozen(t)


def _einsum(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``einsum("bhid,bhjd->bhij", q, k)``: dims with the same letter are one dimension.

    Contracted letters couple the operands like a matmul's inner dim; output
    letters carry the labels of the operands' dims with that letter.
    """
    equation = args[0]
    operands = _tensors(list(args[1:]))
    if not isinstance(equation, str) or "..." in equation or "->" not in equation:
        raise _Unknown
    lhs, rhs = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise _Unknown
    by_letter: dict[str, list[Tensor]] = {}
    for term, t in zip(terms, operands, strict=True):
        if len(term) != t.dim():
            raise _Unknown
        for letter, lab in zip(term, tr.get(t), strict=True):
            by_letter.setdefault(letter, []).append(lab)
    full: dict[str, Tensor] = {}
    for letter, labs in by_letter.items():
        size = max(lab.numel() for lab in labs)
        labs = [lab for lab in labs if lab.numel() == size]  # size-1 dims broadcast
        for lab in labs[1:]:
            tr.couple(labs[0], lab)
        full[letter] = labs[0]
    if len(rhs) != out.dim() or any(full[c].numel() != n for c, n in zip(rhs, out.shape, strict=True)):
        raise _Unknown
    tr.set(out, [full[c] for c in rhs])


def _conv(transposed: bool) -> Callable:
    def rule(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
        x, w = args[0], _arg(args, kwargs, 1, "weight")
        bias = _arg(args, kwargs, 2, "bias")
        groups = _arg(args, kwargs, 6, "groups", 1)  # conv: (.., dilation, groups); transposed: (.., groups, dilation)
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

    return rule


def _linear(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    bias = _arg(args, kwargs, 2, "bias")
    lx, lw = tr.get(x), tr.get(w)
    tr.couple(lx[-1], lw[1])
    if bias is not None:
        tr.couple(tr.get(bias)[0], lw[0])
    tr.set(out, list(lx[:-1]) + [lw[0]])


def _matmul(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    a, b = args[0], args[1]
    if a.dim() < 2 or b.dim() < 2:
        raise _Unknown
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


def _addmm(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``addmm(bias, a, b)`` / ``baddbmm``: a matmul plus a broadcast addend (GPT-2's Conv1D)."""
    bias, a, b = args[0], args[1], args[2]
    _matmul(tr, (a, b), {}, out)
    labels = tr.get(out)
    lb = tr.get(bias)
    for d in range(bias.dim()):
        od = out.dim() - bias.dim() + d
        if bias.shape[d] == out.shape[od]:
            tr.couple(lb[d], labels[od])


def _batch_norm(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    lx = tr.get(x)
    names = ("running_mean", "running_var", "weight", "bias")
    for i, name in enumerate(names, start=1):
        t = _arg(args, kwargs, i, name)
        if isinstance(t, Tensor):
            tr.couple(tr.get(t)[0], lx[1])
    tr.set(out, list(lx))


def _layer_norm(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    lx = tr.get(x)
    weight = _arg(args, kwargs, 2, "weight")
    bias = _arg(args, kwargs, 3, "bias")
    affine = [t for t in (weight, bias) if isinstance(t, Tensor)]
    for k in range(n):
        d = x.dim() - n + k
        if not affine:
            tr.freeze(lx[d])  # the shape is a constant in the call: keep it
        for t in affine:
            tr.couple(tr.get(t)[k], lx[d])
    tr.set(out, list(lx))


def _rms_norm(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    shape = _arg(args, kwargs, 1, "normalized_shape")
    weight = _arg(args, kwargs, 2, "weight")
    lx = tr.get(x)
    n = len(shape)
    for k in range(n):
        d = x.dim() - n + k
        if isinstance(weight, Tensor):
            tr.couple(tr.get(weight)[k], lx[d])
        else:
            tr.freeze(lx[d])
    tr.set(out, list(lx))


def _group_norm(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    groups = _arg(args, kwargs, 1, "num_groups")
    lx = tr.get(x)
    for i, name in ((2, "weight"), (3, "bias")):
        t = _arg(args, kwargs, i, name)
        if isinstance(t, Tensor):
            tr.couple(tr.get(t)[0], lx[1])
    if groups > 1:  # keep every group the same size
        tr.couple(lx[1].view(groups, -1), lx[1].view(groups, -1)[0])
    tr.set(out, list(lx))


def _embedding(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    ids, w = args[0], args[1]
    lw = tr.get(w)
    tr.freeze(lw[0])  # rows are addressed by token id
    tr.set(out, list(tr.get(ids)) + [lw[1]])


def _prelu(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x, w = args[0], args[1]
    lx = tr.get(x)
    if w.numel() > 1:
        tr.couple(tr.get(w)[0], lx[1])
    tr.set(out, list(lx))


def _channels_kept(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    """Pooling and resizing: batch and channel dims pass through, the rest is new."""
    x = args[0]
    lx = tr.get(x)
    for o in _tensors([out]):  # max_pool(return_indices=True) gives (values, indices)
        if o.dim() != x.dim() or x.dim() < 3:
            raise _Unknown
        # (N, C, *spatial) or unbatched (C, *spatial): the first two dims are never
        # resized by pooling/resizing (for unbatched inputs the second is spatial and fixed)
        labels = [lx[0], lx[1]] + [torch.zeros(s, dtype=torch.long) for s in o.shape[2:]]
        tr.set(o, labels)


def _pad(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``F.pad``: dims padded by (0, 0) keep their labels; padded dims are new."""
    x = args[0]
    pad = list(_arg(args, kwargs, 1, "pad"))
    lx = tr.get(x)
    labels = [torch.zeros(s, dtype=torch.long) for s in out.shape]
    for d in range(x.dim()):
        k = x.dim() - 1 - d  # pad pairs run from the last dim backwards
        before, after = (pad[2 * k], pad[2 * k + 1]) if 2 * k + 1 < len(pad) else (0, 0)
        if before == 0 and after == 0:
            labels[d] = lx[d]
        elif bool((lx[d] != 0).any()):
            tr.freeze(lx[d])  # padding a channel dim: its size is a constant
    tr.set(out, labels)


def _dims_arg(args: Sequence, kwargs: dict, ndim: int, index: int = 1) -> list[int] | None:
    dims = _arg(args, kwargs, index, "dim")
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


def _reduction(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    x = args[0]
    lx = tr.get(x)
    dims = _dims_arg(args, kwargs, x.dim())
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    outs = _tensors([out])
    if dims is None:
        for t in outs:
            tr.frozen(t)
        return
    labels = []
    for d in range(x.dim()):
        if d in dims:
            if keepdim:
                labels.append(torch.zeros(1, dtype=torch.long))
        else:
            labels.append(lx[d])
    for t in outs:
        if len(labels) != t.dim():
            raise _Unknown
        tr.set(t, labels)


def _cat(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    tensors = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0)
    tensors = [t for t in tensors if not (t.dim() == 1 and t.numel() == 0)]  # legacy empty inputs
    if not tensors or any(t.dim() != out.dim() for t in tensors):
        raise _Unknown
    dim %= out.dim()
    labels = [tr.get(t) for t in tensors]
    merged = []
    for d in range(out.dim()):
        if d == dim:
            merged.append(torch.cat([lab[d] for lab in labels]))
        else:
            for lab in labels[1:]:
                tr.couple(labels[0][d], lab[d])
            merged.append(labels[0][d])
    tr.set(out, merged)


def _permute(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    dims = args[1:] if len(args) > 2 else _arg(args, kwargs, 1, "dims")
    if isinstance(dims, int):
        dims = [dims]
    lx = tr.get(x)
    tr.set(out, [lx[d % x.dim()] for d in dims])


def _transpose(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    lx = list(tr.get(x))
    if x.dim() < 2:
        tr.set(out, lx)
        return
    a, b = (_arg(args, kwargs, 1, "dim0", 0), _arg(args, kwargs, 2, "dim1", 1)) if len(args) > 1 or kwargs else (0, 1)
    a, b = a % x.dim(), b % x.dim()
    lx[a], lx[b] = lx[b], lx[a]
    tr.set(out, lx)


def _unsqueeze(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim") % (x.dim() + 1)
    lx = list(tr.get(x))
    lx.insert(dim, torch.zeros(1, dtype=torch.long))
    tr.set(out, lx)


def _flatten(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    x = args[0]
    start = _arg(args, kwargs, 1, "start_dim", 0) % max(x.dim(), 1)
    end = _arg(args, kwargs, 2, "end_dim", -1) % max(x.dim(), 1)
    lx = tr.get(x)
    if x.dim() == 0 or end < start:
        raise _Unknown
    merged_dims = list(range(start, end + 1))
    sizes = [x.shape[d] for d in merged_dims]
    # index j of the merged dim comes from index (j // inner) of its first prunable dim
    grid = None
    chosen = None
    for pos, d in enumerate(merged_dims):
        if x.shape[d] > 1 and bool((lx[d] != 0).any()):
            if chosen is not None:
                _movement(tr, args, kwargs, out)  # two channel dims merged: the generic rule decides
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


def _multi_head_attention(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    """``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` runs).

    Its code requires the projection width to equal the model width and to be
    divisible by the head count. So the model dim is coupled index by index to
    the query/key/value/output projection dims, and position d of every head is
    one unit: pruning it narrows every head (head_dim shrinks, heads stay).
    """
    names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
    a = {n: _arg(args, kwargs, i, n) for i, n in enumerate(names)}
    separate = _arg(args, kwargs, 17, "use_separate_proj_weight", False)
    if separate or a["bias_k"] is not None or a["in_proj_weight"] is None:
        raise _Unknown
    q, k, v = a["query"], a["key"], a["value"]
    heads = int(a["num_heads"])
    width = q.shape[-1]
    lq = tr.get(q)
    for t in (k, v):
        tr.couple(tr.get(t)[-1], lq[-1])
    lw = tr.get(a["in_proj_weight"])
    tr.couple(lw[1], lq[-1])
    if a["in_proj_bias"] is not None:
        tr.couple(tr.get(a["in_proj_bias"])[0], lw[0])
    model_grid = lq[-1].view(heads, -1)
    for part in range(3):
        grid = lw[0][part * width : (part + 1) * width].view(heads, -1)
        tr.couple(grid, model_grid)  # projection width follows the model width
        tr.couple(grid, grid[0])  # the same position in every head
    lo = tr.get(a["out_proj_weight"])
    tr.couple(lo[1], lw[0][2 * width :])
    if a["out_proj_bias"] is not None:
        tr.couple(tr.get(a["out_proj_bias"])[0], lo[0])
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    attn = outs[0]
    tr.set(attn, list(lq[:-1]) + [lo[0]])
    for extra in outs[1:]:
        if isinstance(extra, Tensor):
            tr.frozen(extra)


def _sdpa(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``F.scaled_dot_product_attention(q, k, v)``: (..., heads, tokens, dim) each.

    q and k contract over their last dim; heads pair up (with grouped-query
    attention, key/value head h serves query heads h*g .. h*g+g-1, so removing
    a KV head removes its query group). The output takes q's heads and tokens
    and v's last dim.
    """
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = _arg(args, kwargs, 3, "attn_mask")
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        raise _Unknown
    lq, lk, lv = tr.get(q), tr.get(k), tr.get(v)
    tr.couple(lq[-1], lk[-1])
    tr.couple(lk[-2], lv[-2])
    for d in range(q.dim() - 2):
        hq, hk = lq[d], lk[d]
        tr.couple(hk, lv[d])
        if hq.numel() == hk.numel():
            tr.couple(hq, hk)
        elif hk.numel() > 1 and hq.numel() % hk.numel() == 0:
            tr.couple(hq.view(hk.numel(), -1), hk.unsqueeze(1))
        elif hk.numel() != 1:
            raise _Unknown
    if isinstance(mask, Tensor):
        lm = tr.get(mask)
        for d in range(mask.dim()):  # a mask broadcasts against (..., heads, tokens, tokens)
            od = q.dim() - mask.dim() + d
            if mask.shape[d] > 1 and 0 <= od < q.dim() - 2:
                tr.couple(lm[d], lq[od])
    tr.set(out, list(lq[:-1]) + [lv[-1]])


def _chunk(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    x = args[0]
    chunks = _arg(args, kwargs, 1, "chunks")
    dim = _arg(args, kwargs, 2, "dim", 0) % x.dim()
    lx = tr.get(x)
    parts = list(out)
    if x.shape[dim] % chunks or len(parts) != chunks:
        raise _Unknown
    grid = lx[dim].view(chunks, -1)
    # chunk(n) re-splits evenly after pruning: prune the same position in every part.
    tr.couple(grid, grid[0])
    for i, part in enumerate(parts):
        labels = list(lx)
        labels[dim] = grid[i]
        tr.set(part, labels)


def _split(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    """``x.split(size, dim)`` with a size that divides the dim: equal parts, like ``chunk``.

    The size is often a module attribute (GPT-2's ``split_size``, Res2Net's
    ``width``): after pruning every part the same way, it must say the new width.
    Other splits (a list of sizes, a ragged last part) are replayed by ``_movement``.
    """
    x = args[0]
    size = _arg(args, kwargs, 1, "split_size_or_sections", kwargs.get("split_size"))
    dim = _arg(args, kwargs, 2, "dim", 0)
    if not isinstance(size, int) or not isinstance(dim, int) or x.shape[dim % x.dim()] % size:
        _movement(tr, args, kwargs, out)
        return
    dim %= x.dim()
    chunks = x.shape[dim] // size
    _chunk(tr, (x, chunks, dim), {}, out)
    tr.link_size(size, tr.get(out[0])[dim])


def _gather(tr: _Tracer, args: Sequence, kwargs: dict, out: Tensor) -> None:
    """``gather(x, dim, index)``: positions along ``dim`` are picked by data, so that dim of ``x`` is kept;
    other dims pass through where ``index`` spans them whole."""
    x, dim, index = args[0], _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "index")
    if not isinstance(dim, int) or not isinstance(index, Tensor):
        raise _Unknown
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


def _movement(tr: _Tracer, args: Sequence, kwargs: dict, out: Any) -> None:
    """Views, permutes, cat, indexing...: replay the call on label tensors.

    For each dimension of each tensor argument, a tensor of that argument's
    shape holding the dimension's labels (and -1 in every other argument) is
    pushed through the same call. Where the labels land in the output tells
    which output dimension carries which labels.
    """
    func = tr._current_func
    inputs = _tensors(list(args) + list(kwargs.values()))
    outs = _tensors([out])
    out_labels: list[list[Tensor | None]] = [[None] * t.dim() for t in outs]
    for ti, t in enumerate(inputs):
        if not t.is_floating_point():
            continue  # index tensors say where to look, they carry no channels
        lab = tr.get(t)
        for d, ld in enumerate(lab):
            if not bool((ld != 0).any()):
                continue  # fixed dims (batch, spatial, tokens) carry nothing to follow
            probe_args, probe_kwargs = _substitute(args, kwargs, inputs, ti, d, ld)
            try:
                probed = [p.round().long() for p in _tensors([func(*probe_args, **probe_kwargs)])]
            except (RuntimeError, TypeError, ValueError, IndexError):
                raise _Unknown from None
            landed_anywhere = torch.zeros(ld.numel(), dtype=torch.bool)
            for oi, (o, p) in enumerate(zip(outs, probed, strict=True)):
                _place(tr, o, p, ld, d, t, landed_anywhere, out_labels[oi], func)
            if ld.numel() > 1 and not bool(landed_anywhere.all()):
                tr.freeze(ld)  # constant indices select a subset: they would shift after pruning
    for o, labels in zip(outs, out_labels, strict=True):
        tr.set(o, [lab if lab is not None else torch.zeros(o.shape[i], dtype=torch.long)
                   for i, lab in enumerate(labels)])


def _substitute(args: Sequence, kwargs: dict, inputs: list[Tensor], ti: int, d: int, ld: Tensor) -> tuple[Any, Any]:
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


def _place(tr: _Tracer, o: Tensor, p: Tensor, ld: Tensor, d: int, src: Tensor, landed: Tensor,
           labels: list[Tensor | None], func: Callable) -> None:
    if p.shape != o.shape:
        raise _Unknown
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


def _merge(tr: _Tracer, labels: list[Tensor | None], e: int, mapped: Tensor, mask: Tensor) -> None:
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


POINTWISE = """
add sub mul div true_divide floor_divide remainder fmod pow rsub __add__ __radd__ __iadd__ __sub__
__rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __pow__ __rpow__
__neg__ __abs__ __invert__ __and__ __or__ __xor__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__
neg abs exp exp2 expm1 log log2 log10 log1p sqrt rsqrt sigmoid tanh sin cos erf erfc reciprocal
sign clamp clamp_min clamp_max clip maximum minimum where masked_fill lerp addcmul addcdiv
eq ne lt le gt ge logical_not logical_and logical_or bitwise_not isnan isinf nan_to_num square
relu relu_ relu6 gelu silu mish hardswish hardsigmoid hardtanh hardtanh_ leaky_relu elu selu celu
softplus softsign tanhshrink threshold logsigmoid sigmoid_ tanh_ mul_ add_ sub_ div_ clamp_
masked_fill_ detach_ requires_grad_
dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
""".split()

IDENTITY = "contiguous clone detach float half bfloat16 double to type type_as zero_ fill_ requires_grad_".split()


def _build_rules() -> dict[str, Callable]:
    rules: dict[str, Callable] = {}
    for prefix in ("torch.", "torch.Tensor.", "torch.nn.functional.", "torch.special."):
        for name in POINTWISE:
            rules[prefix + name] = _pointwise
    for name in ("softmax", "log_softmax", "cumsum", "cumprod", "normalize"):
        for prefix in ("torch.", "torch.Tensor.", "torch.nn.functional."):
            rules[prefix + name] = _identity
    for name in ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"):
        rules["torch." + name] = _identity
    for name in ("arange", "tensor", "as_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint",
                 "linspace", "eye", "tril", "triu"):
        rules["torch." + name] = _constant
    for name in ("mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "nansum", "nanmean"):
        rules["torch." + name] = _reduction
        rules["torch.Tensor." + name] = _reduction
    for name in ("view", "reshape", "_unsafe_view", "permute", "transpose", "swapaxes", "swapdims", "t",
                 "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "repeat",
                 "movedim", "moveaxis", "narrow", "select", "__getitem__", "unbind", "split",
                 "tensor_split", "flip", "roll", "view_as", "reshape_as", "repeat_interleave", "tile"):
        rules["torch.Tensor." + name] = _movement
        rules["torch." + name] = _movement
    for name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "split_with_sizes"):
        rules["torch." + name] = _movement
    rules["torch.functional.split"] = _movement
    for name in ("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"):
        rules["torch.nn.functional." + name] = _movement
        rules["torch." + name] = _movement
    for name in ("cat", "concat", "concatenate"):
        rules["torch." + name] = _cat
    for name in ("torch.permute", "torch.Tensor.permute"):
        rules[name] = _permute
    for name in ("torch.transpose", "torch.Tensor.transpose", "torch.swapaxes", "torch.Tensor.swapaxes",
                 "torch.swapdims", "torch.Tensor.swapdims", "torch.t", "torch.Tensor.t"):
        rules[name] = _transpose
    for name in ("torch.unsqueeze", "torch.Tensor.unsqueeze"):
        rules[name] = _unsqueeze
    for name in ("torch.flatten", "torch.Tensor.flatten"):
        rules[name] = _flatten
    for name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
        rules["torch.Tensor." + name] = _fresh
    rules["torch.einsum"] = rules["torch.functional.einsum"] = _einsum
    rules["torch.nn.functional.multi_head_attention_forward"] = _multi_head_attention
    rules["torch.nn.functional.scaled_dot_product_attention"] = _sdpa
    rules["torch._C._nn.scaled_dot_product_attention"] = _sdpa
    for name in ("torch.split", "torch.Tensor.split", "torch.functional.split"):
        rules[name] = _split
    rules["torch.gather"] = rules["torch.Tensor.gather"] = _gather
    rules["torch.Tensor.chunk"] = _chunk
    rules["torch.chunk"] = _chunk
    for n in (1, 2, 3):
        for prefix in ("torch.nn.functional.", "torch."):
            rules[f"{prefix}conv{n}d"] = _conv(False)
            rules[f"{prefix}conv_transpose{n}d"] = _conv(True)
    rules["torch.nn.functional.linear"] = _linear
    for name in ("torch.matmul", "torch.Tensor.matmul", "torch.Tensor.__matmul__", "torch.bmm",
                 "torch.Tensor.bmm", "torch.mm", "torch.Tensor.mm"):
        rules[name] = _matmul
    for name in ("torch.addmm", "torch.Tensor.addmm", "torch.baddbmm", "torch.Tensor.baddbmm"):
        rules[name] = _addmm
    rules["torch.nn.functional.batch_norm"] = _batch_norm
    rules["torch.nn.functional.instance_norm"] = _batch_norm  # same argument layout
    rules["torch.nn.functional.layer_norm"] = _layer_norm
    rules["torch.nn.functional.rms_norm"] = _rms_norm
    rules["torch.nn.functional.group_norm"] = _group_norm
    rules["torch.nn.functional.embedding"] = _embedding
    rules["torch.nn.functional.prelu"] = _prelu
    for name in ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                 "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
                 "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool2d", "interpolate", "upsample",
                 "upsample_nearest", "upsample_bilinear", "max_pool2d_with_indices"):
        rules["torch.nn.functional." + name] = _channels_kept
    rules["torch.max_pool2d"] = _channels_kept
    rules["torch.nn.functional.pad"] = _pad
    rules["torch.avg_pool1d"] = _channels_kept
    for name in IDENTITY:
        rules["torch.Tensor." + name] = _identity
        rules["torch." + name] = _identity  # torch.clone, torch.detach
    return rules


RULES = _build_rules()


def trace_labels(model: nn.Module, example_inputs: Any, *, frozen_tensors: Sequence[str] = ()) -> LabelTrace:
    """Trace ``model`` on ``example_inputs`` and return labels and couplings.

    Args:
        model: the model; it is run in eval mode under ``torch.no_grad`` (and once
            more in training mode if some parameters were not used, e.g. auxiliary
            heads; buffers are restored afterwards).
        example_inputs: a tensor, tuple or kwargs dict the model accepts.
        frozen_tensors: parameter/buffer names whose every dimension must stay.
    """
    names: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers(remove_duplicate=True)):
        names.setdefault(id(t), name)
    stack: list[tuple[str, nn.Module]] = []
    tracer = _Tracer(names, stack)
    def enter(name: str, module: nn.Module) -> None:
        stack.append((name, module))

    def leave() -> None:
        if stack:
            stack.pop()

    hooks = []
    for mod_name, module in model.named_modules():
        # hooks must return None: a value would replace the module's inputs/outputs
        hooks.append(module.register_forward_pre_hook(lambda m, a, n=mod_name: enter(n, m)))
        hooks.append(module.register_forward_hook(lambda m, a, o: leave()))
    try:
        with torch.no_grad(), eval_mode(model), tracer:
            out = call_model(model, example_inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        for h in hooks:
            h.remove()
        raise SecateursError(
            f"tracing the model failed ({first_line(exc)}): check the example inputs (--input-shape)"
        ) from None
    shapes = output_shapes(out)
    for t in _tensors(_flatten_output(out)):
        tracer.freeze_tensor(t)
    if any(n not in tracer.tensor_labels for n, _ in model.named_parameters()):
        # Some layers only run in training (auxiliary heads): trace that too, so
        # their inputs are coupled, and put the BatchNorm statistics back after.
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        try:
            with torch.no_grad(), eval_mode(model, training=True), tracer:
                out = call_model(model, example_inputs)
            for t in _tensors(_flatten_output(out)):
                tracer.freeze_tensor(t)
        except (RuntimeError, ValueError, TypeError, IndexError):
            pass  # the model cannot run in training mode on these inputs; eval trace stands
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])
    for h in hooks:
        h.remove()
    for t in _tensors(list(example_inputs.values()) if isinstance(example_inputs, dict) else [example_inputs]):
        tracer.freeze_tensor(t)
    for name in frozen_tensors:
        for lab in tracer.tensor_labels.get(name, []):
            tracer.freeze(lab)
    return LabelTrace(
        num_labels=tracer.next_label,
        tensor_labels=tracer.tensor_labels,
        edges_a=tracer.edges_a,
        edges_b=tracer.edges_b,
        unknown_calls=tracer.unknown,
        attribute_links=tracer.links,
        output_shapes=shapes,
    )


def _flatten_output(out: Any) -> list[Any]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict) or (hasattr(out, "keys") and hasattr(out, "values")):
        return list(out.values())
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


_NAMES: dict[Any, str] = {}


def _name_of(func: Callable) -> str:
    """``torch.overrides.resolve_name``, remembered: it enters a warnings filter on every call."""
    try:
        return _NAMES[func]
    except KeyError:
        name = _NAMES[func] = resolve_name(func) or ""
        return name
    except TypeError:  # an unhashable callable
        return resolve_name(func) or ""


def _probe_func(func: Callable, args: Sequence, kwargs: dict) -> Callable:
    """The callable replayed on label tensors, annotated with the -1 position of views."""

    def probe(*a: Any, **k: Any) -> Any:
        return func(*a, **k)

    name = _name_of(func)
    if name.endswith((".view", ".reshape")) and len(args) > 1:
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple, torch.Size)) else args[1:]
        sizes = list(sizes)
        if sizes.count(-1) == 1 and all(isinstance(s, int) for s in sizes):
            probe._secateurs_inferred = sizes.index(-1)  # type: ignore[attr-defined]
    return probe

