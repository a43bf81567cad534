"""Physically remove indices from tensors and keep every layer's attributes in step.

Surgery never decides what to remove (that is the strategy's job) and never
looks at the graph: it gets a :class:`Plan` (tensor name -> dim -> indices)
and applies it. Resized parameters become new ``Parameter`` objects, set under
every name that shared the old one, so tied weights stay tied (build optimizers
after pruning). Masked layers (unstructured/N:M masks) are handled: the
stored original and its mask shrink together.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import SecateursError
from ..masks import Mask
from ..provenance import CONFIG_STALE_ATTR, SOURCE_ATTR, STRUCTURE_ATTR, attach_source, source_of
from .hf import update_hf_config_
from .layers import drop_modules_

__all__ = ["Plan", "apply_plan_", "kept_indices", "register_updater", "CONFIG_STALE_ATTR", "STRUCTURE_ATTR"]


@dataclass
class Plan:
    """Indices to remove (``remove[tensor_name][dim]``), size attributes to set (``attrs[module][name]``)
    and whole modules to delete from their ``Sequential``/``ModuleList`` (``drop``).

    Every name refers to the model as it is before the plan is applied.
    """

    remove: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    attrs: dict[str, dict[str, int]] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    _normal: bool = field(default=False, repr=False, compare=False)  # made by normalized(), never edited since

    def add(self, tensor: str, dim: int, indices: Tensor | list[int]) -> None:
        values = indices.tolist() if isinstance(indices, Tensor) else list(indices)
        current = self.remove.setdefault(tensor, {}).setdefault(dim, [])
        current.extend(values)
        self._normal = False

    def normalized(self) -> Plan:
        if self._normal:
            return self
        remove = {t: {d: sorted(set(ix)) for d, ix in dims.items() if ix} for t, dims in self.remove.items()}
        return Plan(remove, {m: dict(a) for m, a in self.attrs.items()}, sorted(set(self.drop)), _normal=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "remove": {t: {str(d): ix for d, ix in dims.items()} for t, dims in self.normalized().remove.items()},
            "attrs": self.attrs,
        }
        if self.drop:
            out["drop"] = sorted(set(self.drop))
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """Read a plan back from :meth:`to_dict`'s form, checking every type (manifests are untrusted)."""
        try:
            remove = {t: {int(d): _ints(ix) for d, ix in _named(dims).items()} for t, dims in _named(data["remove"]).items()}
            attrs = {m: dict(_named(av)) for m, av in _named(data.get("attrs", {})).items()}
            if not all(type(v) is int for av in attrs.values() for v in av.values()):
                raise TypeError
            drop = data.get("drop", [])
            if not isinstance(drop, list) or not all(isinstance(name, str) for name in drop):
                raise TypeError
            return cls(remove, attrs, list(drop))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SecateursError("a structural pruning plan in the manifest is malformed: re-save the model") from None

    def is_empty(self) -> bool:
        return not self.drop and not any(ix for dims in self.remove.values() for ix in dims.values())


def kept_indices(size: int, removed: Any) -> Tensor:
    """The indices of ``range(size)`` not in ``removed`` (a list or tensor of indices), ascending, on the CPU
    (also under ``torch.device("meta")``)."""
    keep = torch.ones(size, dtype=torch.bool, device="cpu")
    keep[removed] = False
    return keep.nonzero().flatten()


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise TypeError
    return values


def _named(mapping: Any) -> dict[str, Any]:
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise TypeError
    return mapping


Updater = Callable[[nn.Module, dict[str, tuple[int, ...]]], None]
_UPDATERS: list[tuple[type[nn.Module], Updater]] = []


def register_updater(module_type: type[nn.Module]) -> Callable[[Updater], Updater]:
    """Register how a layer type updates its attributes after its tensors shrink.

    The updater gets the module (attributes still old, tensors already new) and
    the old shapes of its tensors that changed.
    """

    def decorator(fn: Updater) -> Updater:
        _UPDATERS.append((module_type, fn))
        return fn

    return decorator


def _shape(module: nn.Module, name: str) -> tuple[int, ...] | None:
    t = getattr(module, name, None)
    return tuple(t.shape) if isinstance(t, Tensor) else None


@register_updater(nn.modules.conv._ConvNd)
def _conv(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    w = _shape(module, "weight")
    assert w is not None
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    old_w = old.get("weight", w)
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    depthwise = module.groups > 1 and old_w[in_dim] == 1 and module.groups == module.in_channels
    if depthwise and not transposed:
        multiplier = module.out_channels // module.groups
        module.groups = w[0] // multiplier
        module.in_channels = module.groups
        module.out_channels = w[0]
    elif transposed:
        module.in_channels = w[0]
        module.out_channels = w[1] * module.groups
    else:
        module.in_channels = w[1] * module.groups
        module.out_channels = w[0]


@register_updater(nn.Linear)
def _linear(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    w = _shape(module, "weight")
    assert w is not None
    module.out_features, module.in_features = w


@register_updater(nn.modules.batchnorm._NormBase)
def _norm(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    shape = _shape(module, "weight") or _shape(module, "running_mean")
    if shape is not None:
        module.num_features = shape[0]


@register_updater(nn.LayerNorm)
def _layer_norm(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    shape = _shape(module, "weight")
    if shape is not None:
        module.normalized_shape = shape


@register_updater(nn.GroupNorm)
def _group_norm(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    shape = _shape(module, "weight")
    if shape is not None:
        module.num_channels = shape[0]


@register_updater(nn.Embedding)
def _embedding(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    w = _shape(module, "weight")
    assert w is not None
    module.num_embeddings, module.embedding_dim = w


@register_updater(nn.PReLU)
def _prelu(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    module.num_parameters = module.weight.numel()


@register_updater(nn.MultiheadAttention)
def _multihead_attention(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    if "in_proj_weight" not in old or module.in_proj_weight is None:
        return
    width = module.in_proj_weight.shape[1]
    old_head_dim = module.head_dim
    module.embed_dim = module.kdim = module.vdim = width
    module.head_dim = width // module.num_heads
    if module.head_dim != old_head_dim:
        # Attention logits are scaled by 1/sqrt(head_dim): rescale the query
        # projection so the remaining dimensions produce the same logits.
        factor = (module.head_dim / old_head_dim) ** 0.5
        with torch.no_grad():
            _stored(module, "in_proj_weight")[:width].mul_(factor)
            if module.in_proj_bias is not None:
                _stored(module, "in_proj_bias")[:width].mul_(factor)


def _stored(module: nn.Module, name: str) -> Tensor:
    """The tensor actually stored for ``module.<name>`` (a masked weight's original)."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, name)


def _hf_conv1d_updater() -> None:
    hf = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(hf, "Conv1D", None)
    if cls is not None and all(t is not cls for t, _ in _UPDATERS):
        def _conv1d(module: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
            module.nf = module.weight.shape[1]

        _UPDATERS.append((cls, _conv1d))


def _slots(model: nn.Module, name: str, modules: dict[str, nn.Module]) -> tuple[nn.Module, str, list[tuple[nn.Module, str]]]:
    """The module owning ``name`` and the raw tensor slots to slice (original + masks)."""
    mod_name, _, tname = name.rpartition(".")
    module = modules.get(mod_name)
    if module is None:
        try:
            module = model.get_submodule(mod_name)  # a module reachable under a second name
        except AttributeError:
            raise SecateursError(f"the plan names '{name}', which the model does not have: wrong architecture?") from None
    if parametrize.is_parametrized(module, tname):
        plist = module.parametrizations[tname]
        slots: list[tuple[nn.Module, str]] = [(plist, "original")]
        slots += [(p, "mask") for p in plist if isinstance(p, Mask)]
        if any(not isinstance(p, Mask) for p in plist):
            raise SecateursError(f"{name} has a parametrization secateurs cannot resize: remove it first")
        return module, tname, slots
    if tname in module._parameters or tname in module._buffers:
        return module, tname, [(module, tname)]
    raise SecateursError(f"the plan names '{name}', which the model does not have: wrong architecture?")


def _slice(owner: nn.Module, attr: str, dim: int, keep: Tensor, resized: dict[int, nn.Parameter]) -> None:
    t = getattr(owner, attr)
    if t.is_meta:  # a rehearsal copy: only the shape matters (meta index_select is slow)
        new = torch.empty((*t.shape[:dim], keep.numel(), *t.shape[dim + 1 :]), dtype=t.dtype, device="meta")
    else:
        new = t.detach().index_select(dim, keep.to(t.device))
    if isinstance(t, nn.Parameter):
        t.data = new
        t.grad = None
        resized[id(t)] = t
    else:
        owner._buffers[attr] = new


def _renew_parameters(model: nn.Module, resized: dict[int, nn.Parameter]) -> None:
    """Give every resized parameter a fresh ``Parameter`` object, under all its (tied) names.

    Autograd caches a leaf's gradient accumulator together with the shape it
    had; a graph still referenced from before pruning (a ``loss`` kept in a
    variable) keeps that accumulator alive, and the next backward would then
    fail on the new shape. A new object has no accumulator. Build optimizers
    after structural pruning (their state has the old shapes anyway).
    """
    fresh: dict[int, nn.Parameter] = {}
    for key, old in resized.items():
        p = nn.Parameter(old.data, requires_grad=old.requires_grad)
        p.__dict__.update(old.__dict__)  # attributes libraries hang on parameters
        fresh[key] = p
    for module in model.modules():
        for name, value in list(module._parameters.items()):
            if value is not None and id(value) in fresh:
                module._parameters[name] = fresh[id(value)]


def _remember_source(model: nn.Module) -> None:
    """Record how to rebuild the *unpruned* architecture before the first cut.

    A transformers model's recipe is its config, which surgery updates; the
    plans replay on top of the original one.
    """
    if getattr(model, SOURCE_ATTR, None) is None and not getattr(model, STRUCTURE_ATTR, None):
        try:
            attach_source(model, source_of(model))
        except SecateursError:
            pass  # save() will ask for arch= if it is ever needed


def apply_plan_(model: nn.Module, plan: Plan) -> nn.Module:
    """Remove the plan's indices from ``model``'s tensors, update layer attributes and delete
    the plan's modules, in place."""
    _hf_conv1d_updater()
    _remember_source(model)
    plan = plan.normalized()
    changed: dict[int, tuple[nn.Module, dict[str, tuple[int, ...]]]] = {}
    done: set[tuple[int, int]] = set()
    resized: dict[int, nn.Parameter] = {}
    modules = dict(model.named_modules())
    located: dict[str, tuple[nn.Module, str]] = {}
    kept: dict[tuple[int, tuple[int, ...]], Tensor] = {}  # the members of a group share their indices
    for name, dims in plan.remove.items():
        module, tname, slots = _slots(model, name, modules)
        located[name] = (module, tname)
        old_shape = tuple(getattr(module, tname).shape)
        for dim, indices in dims.items():
            size = old_shape[dim]
            if indices and (indices[0] < 0 or indices[-1] >= size):
                raise SecateursError(f"the plan removes index {indices[-1]} of {name} dim {dim}, which has {size}")
            if len(indices) >= size:
                raise SecateursError(f"the plan would remove every index of {name} dim {dim}: keep at least one")
            same_cut = (size, tuple(indices))
            keep = kept.get(same_cut)
            if keep is None:
                keep = kept[same_cut] = kept_indices(size, indices)
            for owner, attr in slots:
                key = (id(getattr(owner, attr)), dim)
                if key in done:
                    continue  # the same tensor under a second (tied) name
                done.add(key)
                _slice(owner, attr, dim, keep, resized)
        changed.setdefault(id(module), (module, {}))[1][tname] = old_shape
    _renew_parameters(model, resized)
    for module, old in changed.values():
        for module_type, fn in _UPDATERS:
            if isinstance(module, module_type):
                fn(module, old)
                break
    sizes: dict[int, set[int]] = {}
    for mod_name, attrs in plan.attrs.items():
        module = model.get_submodule(mod_name)
        for attr, value in attrs.items():
            old_value = vars(module).get(attr)
            if attr.startswith("_") or type(old_value) is not int or not 1 <= value <= old_value:
                # a plan only shrinks sizes: it never adds attributes, replaces methods or grows a layer
                # (manifests are untrusted)
                raise SecateursError(f"the plan sets {mod_name}.{attr} = {value}, which is not a smaller value of "
                                     "a size attribute of that module")
            if old_value != value:
                sizes.setdefault(old_value, set()).add(value)  # e.g. a head count, for the HF config
            setattr(module, attr, value)
    for name, dims in plan.remove.items():
        module, tname = located[name]
        new_shape = getattr(module, tname).shape
        for dim in dims:
            old = changed[id(module)][1][tname][dim]
            sizes.setdefault(old, set()).add(new_shape[dim])
    if update_hf_config_(model, sizes) is None and getattr(model, "config", None) is not None and sizes:
        # the config cannot describe the new shapes (e.g. fewer heads but the same hidden size)
        setattr(model, CONFIG_STALE_ATTR, True)
    if plan.drop:
        drop_modules_(model, plan.drop)
    history = list(getattr(model, STRUCTURE_ATTR, []))
    history.append(plan.to_dict())
    setattr(model, STRUCTURE_ATTR, history)
    return model
