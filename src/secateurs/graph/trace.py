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

What each call does is told by a *rule* (see :mod:`.registry`; the built-in
ones are in :mod:`.rules`, by kind); views and indexing are replayed on label
probes (:mod:`.probes`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import SecateursError
from ..selection import call_model
from ..utils import eval_mode, first_line, output_shapes
from . import registry
from . import rules as _builtin_rules  # noqa: F401  (importing registers the built-in rules)
from .probes import op_name_cached, probe_func
from .registry import UnknownCall, tensors

__all__ = ["LabelTrace", "Tracer", "trace_labels"]

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
        while True:
            new = parent.clone()
            # edge list by edge list: a large model's edges would take several times their own memory
            # concatenated and gathered at once (the minimum is the same in any order)
            for a, b in zip(self.edges_a, self.edges_b, strict=True):
                pa, pb = parent[a.long()], parent[b.long()]
                low = torch.minimum(pa, pb)
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


class Tracer(TorchFunctionMode):
    """Labels every tensor the forward makes; what rules read and write (see :func:`.registry.rule`).

    ``get(t)`` gives one label tensor per dim of ``t`` (fresh labels for a parameter
    or buffer, 0 for data); ``set(t, labels)`` labels an output; ``couple(a, b)``
    ties labels to be removed together; ``freeze(labels)`` keeps them.
    """

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
        self.blank: set[int] = set()  # ids of tensors made empty from sizes (zeros, empty, full), to be filled

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
            # labels fit 32 bits up to 2**31 of them: half the memory of the edges the trace keeps
            dtype = torch.int32 if self.next_label < 2**31 else torch.long
            self.edges_a.append(a.reshape(-1).to(dtype, copy=True))
            self.edges_b.append(b.reshape(-1).to(dtype, copy=True))

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
        resolved = op_name_cached(func)
        name = resolved or getattr(func, "__name__", repr(func))
        rule = registry.RULES.get(name)
        if rule is None and not resolved:
            rule = registry.RULES.get(_qualified(func))  # a Python function registered by object
        if not _has_tensor(out) and name not in registry.IN_PLACE:
            return out  # size(), dim(), dtype, shape: nothing to label
        try:
            if rule is None:
                raise UnknownCall
            rule(self, probe_func(func, args, kwargs), args, kwargs, out)
            if name.endswith(_SIZED) and isinstance(out, Tensor):
                self.link_sizes(_size_args(args, kwargs), out)
        except (UnknownCall, AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError):
            # A call a rule cannot follow (or an unusual signature) is treated as unknown:
            # everything through it is kept, which is always safe.
            self.unknown[name] = self.unknown.get(name, 0) + 1
            for t in tensors(args) + tensors(list(kwargs.values())):
                self.freeze_tensor(t)
            for t in tensors([out]):
                self.frozen(t)
        return out


def _qualified(func: Callable) -> str:
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', '')}"


_SIZED = (".view", ".reshape", ".expand", ".new_zeros", ".new_ones", ".new_empty", ".new_full", ".unflatten")


def _size_args(args: Sequence, kwargs: dict) -> list[Any]:
    rest = list(args[1:])
    if len(rest) >= 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0])
    if "size" in kwargs:
        return list(kwargs["size"])
    return rest


def _has_tensor(obj: Any) -> bool:
    return bool(tensors([obj]))


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
    tracer = Tracer(names, stack)
    def enter(name: str, module: nn.Module) -> None:
        stack.append((name, module))

    def leave() -> None:
        if stack:
            stack.pop()

    hooks = []
    try:  # the hooks go whatever the forward does
        for mod_name, module in model.named_modules():
            # hooks must return None: a value would replace the module's inputs/outputs
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=mod_name: enter(n, m)))
            hooks.append(module.register_forward_hook(lambda m, a, o: leave()))
        shapes = _trace_forward(model, example_inputs, tracer)
    finally:
        for h in hooks:
            h.remove()
    for t in tensors(list(example_inputs.values()) if isinstance(example_inputs, dict) else [example_inputs]):
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


def _trace_forward(model: nn.Module, example_inputs: Any, tracer: Tracer) -> Any:
    """Run the forward under ``tracer`` (again in training mode if some parameters were not used)."""
    try:
        with torch.no_grad(), eval_mode(model), tracer:
            out = call_model(model, example_inputs)
    except SecateursError:
        raise
    except Exception as exc:  # an assert or any error in the model's own code: one line, not a traceback
        raise SecateursError(
            f"the model's forward failed on the example inputs ({type(exc).__name__}: {first_line(exc)}): "
            "check the example inputs (--input-shape)"
        ) from None
    shapes = output_shapes(out)
    for t in tensors(_flatten_output(out)):
        tracer.freeze_tensor(t)
    if any(n not in tracer.tensor_labels for n, _ in model.named_parameters()):
        # Some layers only run in training (auxiliary heads): trace that too, so
        # their inputs are coupled, and put the BatchNorm statistics back after.
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        try:
            with torch.no_grad(), eval_mode(model, training=True), tracer:
                out = call_model(model, example_inputs)
            for t in tensors(_flatten_output(out)):
                tracer.freeze_tensor(t)
        except Exception:  # noqa: BLE001  (the model cannot run in training mode on these inputs)
            pass  # the eval trace stands
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])
    return shapes


def _flatten_output(out: Any) -> list[Any]:
    """Every tensor of a model's output, however nested (a detector's list of dicts per image, YOLO's
    ``(predictions, {"boxes": ..., "feats": [...]})``)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict) or (hasattr(out, "keys") and hasattr(out, "values")):
        return [t for v in out.values() for t in _flatten_output(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten_output(v)]
    return []
