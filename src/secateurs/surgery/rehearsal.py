"""Rehearse a surgery plan on a meta-device copy before touching the real model.

A model's code can keep a size where the trace cannot see it (``C // heads``
computed from a tensor's width, a constant in a reshape). Rather than guess,
every plan is first applied to a copy whose tensors live on the meta device
(no memory, no arithmetic) and the forward is run: if it fails or the output
shapes change, the groups responsible are found and kept whole.

For small models, where the copy's fixed cost dominates, :func:`apply_checked_`
applies the plan to the model itself and runs the same check with the model's
tensors swapped for meta twins; on failure it puts the model back exactly.

(Skipping the check when the trace "saw every size" was tried and withdrawn: a
plain ``if self.conv.out_channels == 16:`` in a forward is invisible to any
torch-level trace, and several trace rules drop labels the check catches.)

Some models cannot run on the meta device at all, pruned or not: detectors
whose post-processing sizes depend on values (``nonzero``, NMS), or code that
makes tensors from plain attributes (ultralytics keeps ``stride`` and anchors as
attributes, not buffers). A failed check is therefore never blamed on a group
before the *unpruned* model has passed the same check: when it does not, a
warning says so once and the checks run on real tensors instead (the example
input, one sample of it, through the model pruned in place and put back, or a
copy for models that keep state outside their modules). Output sizes that depend
on values (how many boxes a detector keeps) are told apart by running the
unpruned model on a second input, and only the fixed sizes are compared.
:func:`checked_on` says which check a model got. MACs are counted the same
way (:func:`plan_macs`, :func:`model_macs`): on a meta copy, or on real tensors
for those models, where a check that passes counts its plan's MACs in the same
forward when a MACs target asks for them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..analysis import count_macs, flop_counter_mode, no_grad_parameters
from ..errors import SecateursError
from ..graph import DependencyGraph
from ..selection import call_model
from ..utils import eval_mode, first_line, map_tensors, output_shapes
from . import Plan, apply_plan_

__all__ = ["apply_checked_", "checked_on", "feasible_groups", "macs_of", "meta_copy", "model_macs", "output_shapes",
           "plan_macs", "rehearse", "to_meta"]

log = logging.getLogger(__name__)


def _meta_twin(t: Tensor) -> Tensor:
    """``t``'s shape and dtype on the meta device, a ``Parameter`` if ``t`` is one."""
    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
    return nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy whose tensors live on the meta device: surgery rehearsals cost no memory."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in memo:
            memo[id(t)] = _meta_twin(t)
    return _clone(model, memo)


_IMMUTABLE = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _clone(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, minus the cost of deep-copying every module's empty hook dicts.

    Rehearsals copy the whole model once or more per prune; ``deepcopy`` spends most
    of that time on the dozen bookkeeping dicts each module carries. Here a module's
    own dict is rebuilt: children cloned (shared modules stay shared), parameters and
    buffers taken from ``memo``, empty containers made afresh, immutable values
    shared, and everything else (configs, lists, non-empty hook dicts) deep-copied,
    so surgery on the copy can never reach the original. Modules that customise
    copying, or hold slots, go through ``deepcopy`` itself.
    """
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    customised = (getattr(cls, "__deepcopy__", None) is not None or hasattr(cls, "__slots__")
                  or cls.__reduce_ex__ is not object.__reduce_ex__ or cls.__reduce__ is not object.__reduce__
                  or cls.__getstate__ is not nn.Module.__getstate__ or cls.__setstate__ is not nn.Module.__setstate__)
    if customised:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = {n: None if c is None else _clone(c, memo) for n, c in value.items()}
        elif key in ("_parameters", "_buffers"):
            state[key] = {n: copy.deepcopy(t, memo) for n, t in value.items()}  # the memo holds their meta twins
        elif isinstance(value, _IMMUTABLE) or (type(value) is tuple and all(isinstance(v, _IMMUTABLE) for v in value)):
            state[key] = value
        elif type(value) in (dict, set, OrderedDict) and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def macs_of(model: nn.Module, inputs: Any) -> int:
    """MACs of one forward (a meta copy and meta inputs cost nothing to count)."""
    return count_macs(model, inputs)[0]


def model_macs(model: nn.Module, inputs: Any) -> int:
    """MACs of one forward of ``model``: counted on a meta copy, or, for a model the meta device cannot
    run (a detector's NMS, tensors made from plain attributes), on the model itself and one sample of
    ``inputs`` (the whole of it where the model wants its batch as given).

    Only ratios of these counts mean anything across models the meta device cannot run: compare
    them with counts made the same way (:func:`plan_macs` does).
    """
    try:
        return macs_of(meta_copy(model), to_meta(inputs))
    except Exception:  # noqa: BLE001  # whatever the meta forward trips on, the real one settles it
        pass
    small = _one_sample(inputs)
    try:
        return macs_of(model, small)
    except Exception:  # noqa: BLE001
        if small is inputs:
            raise
    return macs_of(model, inputs)


def plan_macs(model: nn.Module, plan: Plan | None, inputs: Any, expected: Any) -> int | None:
    """MACs of one forward of ``model`` with ``plan`` applied (``None``: as it is), counted the way the
    prune whose output shapes are ``expected`` checks its plans: on a meta copy, or on real tensors (the
    model pruned in place and put back, one sample of the input) when meta cannot run the unpruned model.
    ``None`` when the plan breaks the forward."""
    real = _real_check_for(model, inputs, expected)
    if real is None:
        if plan is None:
            return macs_of(meta_copy(model), to_meta(inputs))
        rehearsal, failure = _attempt(model, plan, inputs, expected, want_copy=True)
        return None if rehearsal is None else macs_of(rehearsal, to_meta(inputs))
    if real.broken:
        raise SecateursError(f"cannot count the MACs of {type(model).__name__}: {real.broken}; check that the "
                             "model runs on --input-shape")
    real.count = True  # from now on, this prune's checks count the MACs of the plans they pass
    if plan is None:
        return macs_of(model, real.inputs)
    macs = real.macs(plan)
    if macs is None:  # not checked yet (or it failed): check it, which counts it
        _, failure = real.attempt(model, plan, want_copy=False)
        macs = real.macs(plan) if failure is None else None
    return macs


def _meta(t: Tensor) -> Tensor:
    return torch.empty_like(t, device="meta") if t.is_floating_point() else t.to("meta")


def to_meta(inputs: Any) -> Any:
    return map_tensors(inputs, _meta)


def _empty(x: Tensor, shape: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """A new meta tensor (``torch.empty_like`` on a meta tensor costs about 40x more)."""
    return torch.empty(x.shape if shape is None else shape, dtype=dtype or x.dtype, device="meta")


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
          dilation: Any = 1, groups: int = 1) -> Tensor:
    spatial = weight.dim() - 2
    if not weight.is_meta or isinstance(padding, str) or x.dim() != weight.dim() or spatial < 1:
        raise _NotFast  # unbatched input, padding='same': let PyTorch work it out

    def per_dim(v: Any) -> list[int]:
        return list(v) if isinstance(v, (list, tuple)) else [v] * spatial

    stride, padding, dilation = per_dim(stride), per_dim(padding), per_dim(dilation)
    if x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise RuntimeError(f"conv: input of shape {tuple(x.shape)} does not fit weight {tuple(weight.shape)} "
                           f"with groups={groups}")
    if bias is not None and bias.numel() != weight.shape[0]:
        raise RuntimeError(f"conv: bias of {bias.numel()} elements for {weight.shape[0]} output channels")
    out = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
           for i in range(spatial)]
    if min(out) < 1:
        raise RuntimeError(f"conv: input of shape {tuple(x.shape)} is too small for weight {tuple(weight.shape)}")
    return _empty(x, (x.shape[0], weight.shape[0], *out))


def _batch_norm(x: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                weight: Tensor | None = None, bias: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
    channels = x.shape[1] if x.dim() > 1 else 0
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"batch_norm: {name} should contain {channels} elements not {t.numel()}")
    return _empty(x)


def _unary(x: Tensor, *args: Any, inplace: bool = False, **kwargs: Any) -> Tensor:
    if len(args) >= 1 and isinstance(args[-1], bool):
        inplace = args[-1]  # F.relu(x, True), F.hardtanh(x, 0, 6, True)
    return x if inplace else _empty(x)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if not weight.is_meta or weight.dim() not in (1, 2):
        return torch.nn.functional.linear(x, weight, bias)
    if x.dim() == 0 or x.shape[-1] != weight.shape[-1]:
        raise RuntimeError(f"linear: input of shape {tuple(x.shape)} cannot be multiplied by weight "
                           f"{tuple(weight.shape)}")
    out = (weight.shape[0],) if weight.dim() == 2 else ()
    if bias is not None and tuple(bias.shape) not in ((), (1,), out):
        raise RuntimeError(f"linear: bias of shape {tuple(bias.shape)} does not match {out}")
    return _empty(x, (*x.shape[:-1], *out))


def _layer_norm(x: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                *args: Any, **kwargs: Any) -> Tensor:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise RuntimeError(f"layer_norm: input of shape {tuple(x.shape)} does not end with {shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(f"layer_norm: {name} of shape {tuple(t.shape)} is not {shape}")
    return _empty(x)


def _same_shape(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    if any(isinstance(a, Tensor) for a in (*args, *kwargs.values())):
        raise _NotFast  # tensor bounds broadcast: let PyTorch check them
    dtype = kwargs.get("dtype")  # softmax(x, dim, dtype=torch.float32)
    # contiguous: never stricter than the real strides
    return _empty(x, dtype=dtype if isinstance(dtype, torch.dtype) else None)


class _NotFast(Exception):
    pass


def _fast_kernels() -> dict[Any, Any]:
    F = torch.nn.functional
    fast: dict[Any, Any] = {F.batch_norm: _batch_norm, F.linear: _linear, torch._C._nn.linear: _linear,
                            F.layer_norm: _layer_norm, torch.conv1d: _conv, torch.conv2d: _conv, torch.conv3d: _conv}
    for fn in (F.normalize, F.softmax, F.log_softmax, torch.softmax, Tensor.softmax, torch.roll, Tensor.roll,
               torch.clamp, Tensor.clamp, Tensor.clamp_min, Tensor.clamp_max, F.dropout, Tensor.contiguous):
        fast[fn] = _same_shape
    for fn in (F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.leaky_relu, F.elu,
               torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh):
        fast[fn] = _unary
    return fast


class _ShapeOnly(torch.overrides.TorchFunctionMode):
    """Answer norms and activations on meta tensors from shapes alone.

    PyTorch runs several of them on the meta device through slow Python
    decompositions; a rehearsal only needs the output shape and the size
    checks (a BatchNorm whose width no longer matches must still fail).
    """

    FAST = _fast_kernels()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        fast = self.FAST.get(func)
        if fast is not None and args and isinstance(args[0], Tensor) and args[0].is_meta:
            try:
                return fast(*args, **kwargs)
            except _NotFast:
                pass
        return func(*args, **kwargs)


class _Failure:
    """Why a rehearsal failed and in which modules (innermost last)."""

    def __init__(self, reason: str, modules: list[str]):
        self.reason, self.modules = reason, modules


def _run(model: nn.Module, inputs: Any, meta: bool = True) -> tuple[Any, list[str]]:
    """Forward ``model`` (on meta twins of ``inputs`` unless ``meta`` is False); on an exception,
    re-raise it with the stack of modules it happened in."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []

    def enter(module: nn.Module, _args: Any) -> None:
        if id(module) in names:
            stack.append(names[id(module)])

    def leave(module: nn.Module, _args: Any, _out: Any) -> None:
        if id(module) in names and stack:
            stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(enter)
    post = torch.nn.modules.module.register_module_forward_hook(leave)
    try:
        if not meta:  # the real model: its modes (and BatchNorm statistics) must be left as they were
            with torch.no_grad(), eval_mode(model):
                return call_model(model, inputs), stack
        with torch.no_grad(), _ShapeOnly():
            return call_model(model.eval(), to_meta(inputs)), stack
    except Exception as exc:  # the rehearsal exists to catch anything surgery breaks
        raise _RehearsalError(first_line(exc), list(stack)) from exc
    finally:
        pre.remove()
        post.remove()


class _RehearsalError(Exception):
    def __init__(self, reason: str, modules: list[str]):
        super().__init__(reason)
        self.failure = _Failure(reason, modules)


def _check(model: nn.Module, inputs: Any, expected: Any) -> _Failure | None:
    """Run the (meta) forward; why it fails or changes the ``expected`` output shapes, if it does."""
    try:
        out, _ = _run(model, inputs)
    except _RehearsalError as err:
        return err.failure
    return None if output_shapes(out) == expected else _Failure("the output shape would change", [])


def _attempt(model: nn.Module, plan: Plan, inputs: Any, expected: Any,
             want_copy: bool = False) -> tuple[nn.Module | None, _Failure | None]:
    """Check ``plan``: on a meta copy, or on real tensors once the meta check is known not to run the
    unpruned model. On success returns a model with the plan applied (a copy if ``want_copy``; else,
    for real checks, possibly ``model`` itself, already put back)."""
    real = _known_real_check(model, expected)
    if real is None:
        rehearsal = meta_copy(model)
        apply_plan_(rehearsal, plan)
        failure = _check(rehearsal, inputs, expected)
        if failure is None:
            return rehearsal, None
        real = _real_check_for(model, inputs, expected)
        if real is None:  # the unpruned model passes: the plan is to blame
            return None, failure
    return real.attempt(model, plan, want_copy)


@dataclass
class _RealCheck:
    """Plans checked on real tensors, for a model the meta forward cannot run even unpruned."""

    inputs: Any  # the example input (one sample of it where that is clear)
    reference: Any  # the unpruned model's output shapes on it
    variable: Any  # the same nesting; per output a tuple of flags, True where its size depends on values
    broken: str = ""  # why even the unpruned model fails on real tensors (nothing can be checked)
    # id of a plan that passed -> (the plan, the MACs counted in its check): a MACs target asks for the
    # MACs of plans it has just checked, and a real forward is too dear to run twice
    counted: dict[int, tuple[Plan, int]] = field(default_factory=dict)
    count: bool = False  # count MACs in checks (slower: every op goes through the counter); a MACs target sets it

    def fits(self, shapes: Any) -> bool:
        return _fits(shapes, self.reference, self.variable)

    def check(self, model: nn.Module, plan: Plan | None = None) -> _Failure | None:
        """Why ``model`` (with ``plan`` applied) fails the check, if it does; else its MACs are kept for ``plan``."""
        if self.broken:
            return _Failure(self.broken, [])
        counter = flop_counter_mode() if self.count and plan is not None else contextlib.nullcontext()
        try:
            with no_grad_parameters(model), counter:
                out, _ = _run(model, self.inputs, meta=False)
        except _RehearsalError as err:
            return err.failure
        if not self.fits(output_shapes(out)):
            return _Failure("the output shape would change", [])
        if isinstance(counter, FlopCounterMode):
            self.counted[id(plan)] = (plan, counter.get_total_flops() // 2)
        return None

    def macs(self, plan: Plan) -> int | None:
        """The MACs counted when ``plan`` passed its check, if it did."""
        seen = self.counted.get(id(plan))
        return seen[1] if seen is not None and seen[0] is plan else None

    def attempt(self, model: nn.Module, plan: Plan, want_copy: bool) -> tuple[nn.Module | None, _Failure | None]:
        if want_copy or getattr(model, "config", None) is not None:  # state outside the modules: a copy
            candidate = copy.deepcopy(model)
            apply_plan_(candidate, plan)
            failure = self.check(candidate, plan)
            return (None, failure) if failure is not None else (candidate, None)
        before = _ModelState(model)  # in place, always put back: no copy of the weights
        try:
            apply_plan_(model, plan)
            failure = self.check(model, plan)
        finally:
            before.restore()
        return (None, failure) if failure is not None else (model, None)


# model -> (the expected output shapes of the prune it was checked for, its real check or None when the
# meta check runs the unpruned model); weak, so a model that goes away takes its inputs with it
_CHECKS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, _RealCheck | None]] = weakref.WeakKeyDictionary()


def _known_real_check(model: nn.Module, expected: Any) -> _RealCheck | None:
    entry = _CHECKS.get(model)
    return entry[1] if entry is not None and entry[0] is expected else None


def _real_check_for(model: nn.Module, inputs: Any, expected: Any) -> _RealCheck | None:
    """None if the meta check runs the unpruned ``model`` (a failure is then the plan's); else the real
    check to use instead, made once per prune (``expected`` is that prune's) with one warning."""
    entry = _CHECKS.get(model)
    if entry is not None and entry[0] is expected:
        return entry[1]
    failure = _check(meta_copy(model), inputs, expected)
    if failure is None:
        _CHECKS[model] = (expected, None)
        return None
    log.warning("the meta-device check cannot run %s even unpruned (%s): checking plans on real tensors "
                "instead", type(model).__name__, failure.reason.split(". ")[0])
    real = _make_real_check(model, inputs)
    _CHECKS[model] = (expected, real)
    return real


def checked_on(model: nn.Module, expected: Any) -> str:
    """Which check the plans of the prune whose output shapes are ``expected`` got: ``"meta"`` (meta-device
    rehearsals) or ``"real"`` (real tensors: the meta forward could not run the unpruned model)."""
    return "real" if _known_real_check(model, expected) is not None else "meta"


def _make_real_check(model: nn.Module, inputs: Any) -> _RealCheck:
    small = _one_sample(inputs)
    try:
        try:
            out, _ = _run(model, small, meta=False)
        except _RehearsalError:
            if small is inputs:
                raise
            small = inputs  # the model wants its batch as given
            out, _ = _run(model, small, meta=False)
    except _RehearsalError as err:
        return _RealCheck(small, None, None, broken=f"the unpruned model fails on real tensors too ({err})")
    reference = output_shapes(out)
    try:  # sizes that change with the input's values (boxes kept after NMS) are not the plan's to keep
        other, _ = _run(model, _other_values(small), meta=False)
        variable = _varying(reference, output_shapes(other))
    except _RehearsalError:
        variable = _varying(reference, reference)
    return _RealCheck(small, reference, _records_vary(reference, variable))


def _records_vary(reference: Any, variable: Any) -> Any:
    """``variable`` with the first size of every tensor in a list of per-sample dicts marked as varying.

    That is the form a detector returns (per image: boxes, scores, labels, masks, keypoints), and
    the first size counts what it kept, which depends on values. Two probes do not always show it:
    a model that keeps as many as it may (``detections_per_img``) on both keeps fewer once pruned.
    """
    if not (isinstance(reference, list) and reference and all(isinstance(r, dict) for r in reference)):
        return variable
    if variable is True:
        return True
    return [{k: (True, *flags[1:]) if isinstance(flags, tuple) and flags else flags for k, flags in v.items()}
            if isinstance(v, dict) else v for v in variable]


def _one_sample(inputs: Any) -> Any:
    """``inputs`` cut to its first sample when every top-level tensor has the same batch size (else as is)."""
    items = (list(inputs.values()) if isinstance(inputs, dict)
             else list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
    tensors = [t for t in items if isinstance(t, Tensor)]
    if not tensors or len(tensors) != len(items) or any(t.dim() < 2 for t in tensors):
        return inputs
    if len({t.shape[0] for t in tensors}) != 1 or tensors[0].shape[0] <= 1:
        return inputs
    if isinstance(inputs, dict):
        return {k: v[:1] for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(v[:1] for v in inputs)
    return inputs[:1]


def _other_values(inputs: Any) -> Any:
    """The same input shapes with other values (float tensors redrawn; ids and masks kept)."""
    gen = torch.Generator().manual_seed(12345)

    def redraw(t: Tensor) -> Tensor:
        if not t.is_floating_point():
            return t
        fresh = torch.randn(t.shape, generator=gen).to(device=t.device, dtype=t.dtype)
        return fresh * t.std().clamp_min(1e-3) + t.mean() if t.numel() > 1 else fresh

    return map_tensors(inputs, redraw)


def _varying(a: Any, b: Any) -> Any:
    """Per output of ``a``: which sizes differ in ``b`` (True for a part whose structure differs)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return tuple(x != y for x, y in zip(a, b, strict=True)) if len(a) == len(b) else True
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _varying(a[k], b[k]) for k in a} if a.keys() == b.keys() else True
    if isinstance(a, list) and isinstance(b, list):
        return [_varying(x, y) for x, y in zip(a, b, strict=True)] if len(a) == len(b) else True
    return False if a == b else True


def _fits(got: Any, reference: Any, variable: Any) -> bool:
    if variable is True:
        return True
    if isinstance(reference, tuple):
        return (isinstance(got, tuple) and len(got) == len(reference)
                and all(g == r or v for g, r, v in zip(got, reference, variable, strict=True)))
    if isinstance(reference, dict):
        return (isinstance(got, dict) and got.keys() == reference.keys()
                and all(_fits(got[k], reference[k], variable[k]) for k in reference))
    if isinstance(reference, list):
        return (isinstance(got, list) and len(got) == len(reference)
                and all(_fits(g, r, v) for g, r, v in zip(got, reference, variable, strict=True)))
    return got == reference


class _ModelState:
    """What surgery can change in a model whose whole state lives in its modules: every
    module's attributes, tensors and children, and its parameters' data (resized in place)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
                        for m in model.modules()]
        self.params = [(p, p.data, p.grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, attrs, params, buffers, children in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)  # the same _parameters/_buffers/_modules dicts as before...
            for now, then in ((module._parameters, params), (module._buffers, buffers), (module._modules, children)):
                now.clear()  # ...with their entries put back
                now.update(then)
        for p, data, grad in self.params:
            p.data, p.grad = data, grad


def _swap_to_meta(model: nn.Module) -> None:
    """Replace every parameter and buffer by a meta twin (tied tensors stay tied)."""
    twins: dict[int, Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    if id(t) not in twins:
                        twins[id(t)] = _meta_twin(t)
                    table[name] = twins[id(t)]


def apply_checked_(model: nn.Module, plan: Plan, inputs: Any, expected: Any) -> str:
    """Apply ``plan`` to ``model`` itself, then check the forward on meta twins of its tensors.

    The cheap path when the plan is expected to work: no meta copy of the model and
    no second surgery. If the forward fails or the output shapes change, the model
    is put back exactly as it was and the reason is returned (``""`` on success).
    Not for models with state outside their modules (a transformers config).
    """
    real = _known_real_check(model, expected)
    if real is not None:
        return _apply_real_(model, plan, real)
    before = _ModelState(model)
    try:
        apply_plan_(model, plan)
        after = _ModelState(model)
        try:
            _swap_to_meta(model)
            failure = _check(model, inputs, expected)
        finally:
            after.restore()  # real tensors, training flags, and nothing the meta forward cached
    except BaseException:
        before.restore()
        raise
    if failure is not None:
        before.restore()
        real = _real_check_for(model, inputs, expected)
        return failure.reason if real is None else _apply_real_(model, plan, real)
    return ""


def _apply_real_(model: nn.Module, plan: Plan, real: _RealCheck) -> str:
    before = _ModelState(model)
    try:
        apply_plan_(model, plan)
        failure = real.check(model, plan)
    except BaseException:
        before.restore()
        raise
    if failure is not None:
        before.restore()
        return failure.reason
    return ""


def rehearse(model: nn.Module, plan: Plan, inputs: Any, expected: Any) -> tuple[nn.Module | None, str]:
    """Apply ``plan`` to a meta copy; return it if the forward still gives the ``expected`` output shapes.

    On failure returns ``(None, reason)``.
    """
    rehearsal, failure = _attempt(model, plan, inputs, expected, want_copy=True)
    return rehearsal, failure.reason if failure else ""


def feasible_groups(model: nn.Module, graph: DependencyGraph, plan_of: Callable[[set[int]], Plan],
                    ids: list[int], inputs: Any, expected: Any) -> tuple[set[int], dict[int, str]]:
    """The groups of ``ids`` that can be pruned together; the rest with the reason.

    When the rehearsal fails, the suspects are the groups with a tensor in the
    innermost module that raised (widening to outer modules until one is
    found), those with the most tensors in that module first: the code that
    failed usually reads a size its own layers define (``x.split(self.width // 2)``,
    ``C // self.num_heads``), and that width's group owns most of the module.
    One culprit at a time is then found by a galloping search over growing
    prefixes of the suspects, which costs one rehearsal when the first suspect
    is the culprit and about 2·log2(i) when it is the i-th. Suspects that fail
    only together are all kept.
    """
    members = {g.id: [m.tensor for m in g.members] for g in graph.groups}
    pending = list(ids)
    failed: dict[int, str] = {}
    while pending:
        ok, failure = _attempt(model, plan_of(set(pending)), inputs, expected)
        if ok is not None:
            break
        assert failure is not None
        suspects = _suspects(pending, members, failure.modules)
        if len(suspects) == 1:
            failed[suspects[0]] = failure.reason
            culprits = suspects
        else:
            culprits = _find_culprit(model, plan_of, suspects, inputs, expected, failed)
        if not culprits:  # they fail only in combination: keep all of them
            culprits = suspects
            failed.update({gid: failure.reason for gid in suspects})
        pending = [gid for gid in pending if gid not in culprits]
    return set(pending), failed


def _suspects(pending: list[int], members: dict[int, list[str]], modules: list[str]) -> list[int]:
    """Groups with a tensor inside the innermost failing module, most tensors there first."""
    for module in reversed(modules):
        prefix = module + "." if module else ""
        inside = {gid: sum(t.startswith(prefix) for t in members[gid]) for gid in pending}
        found = [gid for gid in pending if inside[gid]]
        if found:
            return sorted(found, key=lambda gid: -inside[gid])  # stable: ties keep the graph's order
    return list(pending)


def _find_culprit(model: nn.Module, plan_of: Callable[[set[int]], Plan], suspects: list[int], inputs: Any,
                  expected: Any, failed: dict[int, str]) -> list[int]:
    """One suspect whose plan fails on its own (recorded in ``failed``), or none.

    Prefixes of 1, 2, 4... suspects are rehearsed until one fails; a bisection
    over the prefix length then finds the shortest failing prefix, whose last
    suspect is the culprit if it also fails alone.
    """

    def fails(k: int) -> str | None:
        _, failure = _attempt(model, plan_of(set(suspects[:k])), inputs, expected)
        return None if failure is None else failure.reason

    passing, k = 0, 1
    while (reason := fails(k)) is None:
        if k == len(suspects):
            return []  # even all of them pass: the failure needs groups outside the suspects
        passing, k = k, min(2 * k, len(suspects))
    while k - passing > 1:  # suspects[:passing] passes, suspects[:k] fails
        mid = (passing + k) // 2
        if (r := fails(mid)) is None:
            passing = mid
        else:
            k, reason = mid, r
    culprit = suspects[k - 1]
    if k > 1:
        _, failure = _attempt(model, plan_of({culprit}), inputs, expected)
        if failure is None:
            return []  # it fails only together with the suspects before it
        reason = failure.reason
    failed[culprit] = reason
    return [culprit]
