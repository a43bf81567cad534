"""Rules for element-wise ops, reductions and new tensors made from sizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..registry import UnknownCall, arg, rule, tensors

if TYPE_CHECKING:
    from ..trace import Tracer

POINTWISE = """
add sub mul div true_divide floor_divide remainder fmod pow rsub __add__ __radd__ __iadd__ __sub__
__rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __pow__ __rpow__
__neg__ __abs__ __invert__ __and__ __or__ __xor__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__
neg abs exp exp2 expm1 log log2 log10 log1p sqrt rsqrt sigmoid tanh sin cos erf erfc reciprocal
sign clamp clamp_min clamp_max clip maximum minimum where masked_fill lerp addcmul addcdiv
eq ne lt le gt ge logical_not logical_and logical_or bitwise_not isnan isinf nan_to_num square
relu relu_ relu6 gelu silu mish hardswish hardsigmoid hardtanh hardtanh_ leaky_relu elu selu celu
softplus softsign tanhshrink threshold logsigmoid sigmoid_ tanh_ mul_ add_ sub_ div_ clamp_
masked_fill_ detach_
dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout
""".split()
ROUNDING = "floor ceil round trunc frac".split()  # torch.* and Tensor.* only

IDENTITY = "contiguous clone detach float half bfloat16 double to type type_as zero_ fill_ requires_grad_".split()


def _names(prefixes: Sequence[str], names: Sequence[str]) -> list[str]:
    return [p + n for p in prefixes for n in names]


@rule(*_names(("torch.", "torch.Tensor.", "torch.nn.functional.", "torch.special."), POINTWISE),
      *_names(("torch.", "torch.Tensor."), ROUNDING))
def pointwise(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """Operands broadcast against each other: dims that meet index by index are coupled."""
    outs = tensors([out])
    if len(outs) != 1:
        raise UnknownCall
    res = outs[0]
    inputs = [t for t in tensors(list(args) + list(kwargs.values())) if t is not res or id(t) in tr.labels]
    labels: list[Tensor | None] = [None] * res.dim()
    for t in inputs:
        lab = tr.get(t)
        offset = res.dim() - t.dim()
        if offset < 0:
            raise UnknownCall
        for d, ld in enumerate(lab):
            od = d + offset
            if t.shape[d] == 1 and res.shape[od] != 1:
                continue  # broadcast: no correspondence
            if labels[od] is None:
                labels[od] = ld
            else:
                tr.couple(labels[od], ld)
    tr.set(res, [ld if ld is not None else torch.zeros(res.shape[i], dtype=torch.long) for i, ld in enumerate(labels)])


@rule(*_names(("torch.", "torch.Tensor.", "torch.nn.functional."),
              ("softmax", "log_softmax", "cumsum", "cumprod", "normalize")),
      *_names(("torch.",), ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like")),
      *_names(("torch.Tensor.", "torch."), IDENTITY))
def identity(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """Output has the shape and channel layout of the first tensor argument.

    Casts and copies, ``zeros_like(x)`` and friends, and softmax/cumsum (which
    mix values only along one dim) all keep the layout.
    """
    src = tensors(list(args))[0]
    for t in tensors([out]):
        if t.shape != src.shape:
            raise UnknownCall
        tr.set(t, list(tr.get(src)))


@rule(*_names(("torch.",), ("arange", "tensor", "as_tensor", "rand", "randn", "randint", "linspace", "eye", "tril",
                            "triu")))
def constant(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """A new tensor from sizes and values in the code (positions, masks): fixed, carries nothing."""
    for t in tensors([out]):
        tr.frozen(t)
    for t in tensors(list(args)):
        tr.freeze_tensor(t)  # e.g. tril(x): a fixed-size pattern over x


@rule("torch.Tensor.new_tensor")
def fresh(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``x.new_tensor(data)``: ``x`` lends only dtype and device, its channels are untouched."""
    for t in tensors([out]):
        tr.frozen(t)


@rule(*_names(("torch.",), ("zeros", "empty", "full", "ones")),
      *_names(("torch.Tensor.",), ("new_zeros", "new_ones", "new_empty", "new_full")))
def blank(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``torch.zeros(sizes)``, ``x.new_empty(sizes)``...: fixed, until something is written into it."""
    fresh(tr, func, args, kwargs, out)
    for t in tensors([out]):
        tr.blank.add(id(t))


def _dims_arg(args: Sequence, kwargs: dict, ndim: int, index: int = 1) -> list[int] | None:
    dims = arg(args, kwargs, index, "dim")
    if dims is None:
        return None
    if isinstance(dims, int):
        dims = [dims]
    return [d % ndim for d in dims]


@rule(*_names(("torch.", "torch.Tensor."), ("mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod",
                                            "nansum", "nanmean", "argmax", "argmin")))
def reduction(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """Reduced dims disappear (or become size 1); the others pass through."""
    x = args[0]
    lx = tr.get(x)
    dims = _dims_arg(args, kwargs, x.dim())
    keepdim = bool(arg(args, kwargs, 2, "keepdim", False))
    outs = tensors([out])
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
            raise UnknownCall
        tr.set(t, labels)


@rule(*_names(("torch.", "torch.Tensor."), ("max", "min")))
def max_min(tr: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None:
    """``torch.max(a, b)`` is pointwise; ``x.max(dim)`` a reduction (values and indices)."""
    other = arg(args, kwargs, 1, "other")
    if isinstance(other, Tensor):
        pointwise(tr, func, args, kwargs, out)
    else:
        reduction(tr, func, args, kwargs, out)
