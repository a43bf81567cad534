"""The tracer's rules: an open registry of what each op does to channels.

A *rule* tells the tracer how an op maps the channel labels of its inputs onto
its outputs. It is called after the op ran, as ``rule(tracer, func, args,
kwargs, out)``: ``func`` is the op (call it again on other tensors to replay
it, as the view/indexing rules do), ``args``/``kwargs`` the arguments it got
and ``out`` what it returned. The rule must label every tensor in ``out`` with
``tracer.set(t, labels)`` (one integer tensor per dim; label 0 means "fixed")
and can tie dims together with ``tracer.couple(a, b)`` or keep them with
``tracer.freeze(labels)``. Raising :class:`UnknownCall` (or any of the usual
``TypeError``/``ValueError``...) means "cannot follow this call": everything
through it is kept whole, which is always safe.

Rules are keyed by the op's name as :func:`torch.overrides.resolve_name` gives
it (``"torch.nn.functional.linear"``, ``"torch.Tensor.view"``, a custom
``torch.library`` op as ``"mylib.op"``); a Python function that takes part in
``__torch_function__`` (``torch.overrides.wrap_torch_function``) and that torch
does not name is keyed ``"module.qualname"``. Pass the op itself to
:func:`rule` and the key is worked out for you.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor
from torch.overrides import resolve_name

from ..errors import SecateursError

if TYPE_CHECKING:
    from .trace import Tracer

__all__ = ["Rule", "UnknownCall", "op_name", "remove_rule", "rule"]


class UnknownCall(Exception):
    """Raised by a rule for a call whose effect on channels it cannot follow."""


class Rule(Protocol):
    """``rule(tracer, func, args, kwargs, out)``: label every tensor in ``out``."""

    def __call__(self, tracer: Tracer, func: Callable, args: Sequence, kwargs: dict, out: Any) -> None: ...


RULES: dict[str, Rule] = {}
IN_PLACE: set[str] = set()  # ops that return nothing and change their first argument (``x[i] = v``)


def op_name(op: str | Callable) -> str:
    """The registry key of ``op``: its name for ``torch.overrides``, else ``module.qualname``.

    >>> import torch
    >>> op_name(torch.nn.functional.linear), op_name(torch.Tensor.view)
    ('torch.nn.functional.linear', 'torch.Tensor.view')
    """
    if isinstance(op, str):
        return op
    try:
        name = resolve_name(op)
    except TypeError:  # an object resolve_name cannot look at
        name = None
    if name:
        return name
    module, qualname = getattr(op, "__module__", None), getattr(op, "__qualname__", None)
    if not (module and qualname):
        raise SecateursError(f"cannot name the op {op!r} for a tracer rule: pass its name as a string, "
                             "e.g. rule('mylib.my_op')")
    return f"{module}.{qualname}"


def _keys(ops: tuple[str | Callable, ...]) -> list[str]:
    if not ops:
        raise SecateursError("rule() needs at least one op: e.g. @rule('mylib.my_op') or @rule(my_function)")
    keys = []
    for op in ops:
        if not (isinstance(op, str) and op) and not callable(op):
            raise SecateursError(f"rule() takes op names or callables, got {op!r}")
        keys.append(op_name(op))
    return keys


def rule(*ops: str | Callable, replace: bool = False, in_place: bool = False) -> Callable[[Rule], Rule]:
    """Teach the tracer what ``ops`` do to channels (a decorator; returns the rule unchanged).

    Args:
        *ops: op names (``"torch.nn.functional.linear"``) or the ops themselves.
        replace: allow replacing a rule already registered for one of ``ops``
            (without it that is an error: two rules for one op would silently
            shadow each other).
        in_place: the op changes its first argument and returns no tensor
            (``Tensor.__setitem__``): call the rule anyway, with ``out=None``.

    Returns:
        A decorator registering the rule for every op.

    Example: a model calls an op the tracer does not know, so every channel
    through it is kept; one rule saying "same shape, same channels" makes its
    layers prunable again.

    >>> import torch
    >>> from torch import nn
    >>> from secateurs.graph import build_graph, remove_rule, rule
    >>> @torch.overrides.wrap_torch_function(lambda x: (x,))
    ... def squash(x):
    ...     return x / (1 + x.abs())
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         return self.b(squash(self.a(x)))
    >>> model, x = Net(), torch.randn(3, 4)
    >>> len(build_graph(model, x).groups)  # 'squash' is not understood: the 8 hidden channels are kept
    0
    >>> @rule(squash)
    ... def same_channels(tracer, func, args, kwargs, out):
    ...     tracer.set(out, tracer.get(args[0]))
    >>> [g.size for g in build_graph(model, x).groups]
    [8]
    >>> rule(squash)(same_channels)
    Traceback (most recent call last):
    ...
    secateurs.errors.SecateursError: a tracer rule for 'secateurs.graph.registry.squash' is already registered ...
    >>> remove_rule(squash)
    """
    keys = _keys(ops)

    def register(fn: Rule) -> Rule:
        if not callable(fn):
            raise SecateursError(f"@rule(...) decorates a function (tracer, func, args, kwargs, out), got {fn!r}")
        taken = [k for k in keys if k in RULES]
        if taken and not replace:
            raise SecateursError(
                f"a tracer rule for {taken[0]!r} is already registered ({_describe(RULES[taken[0]])}): "
                "pass replace=True to override it"
            )
        for k in keys:
            RULES[k] = fn
            if in_place:
                IN_PLACE.add(k)
            else:
                IN_PLACE.discard(k)
        return fn

    return register


def remove_rule(*ops: str | Callable) -> None:
    """Forget the rules for ``ops`` (the tracer then keeps every tensor through them)."""
    for k in _keys(ops):
        if k not in RULES:
            raise SecateursError(f"no tracer rule is registered for {k!r}")
        del RULES[k]
        IN_PLACE.discard(k)


def _describe(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


# ---- helpers shared by the rules ------------------------------------------------------------


def arg(args: Sequence, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, passed by position or as ``name=``."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def tensors(items: Any) -> list[Tensor]:
    """Every tensor in ``items``, however nested in lists and tuples, in order."""
    found: list[Tensor] = []
    stack = list(items) if isinstance(items, (list, tuple)) else [items]
    while stack:
        item = stack.pop(0)
        if isinstance(item, Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack[:0] = list(item)
    return found
