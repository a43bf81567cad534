"""Persistent masks for unstructured and N:M sparsity.

A mask is a ``torch.nn.utils.parametrize`` parametrization: the module's
``weight`` becomes ``original * mask``. The original ``Parameter`` object is
kept, so optimizers built before pruning keep working, and because the mask
multiplies the *output* of the parametrization, a pruned entry is zero after
any number of optimizer steps (its gradient is zero too). ``finalize_`` bakes
the masks in and removes every trace of the bookkeeping.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .errors import SecateursError
from .utils import is_transformers_model

__all__ = [
    "Mask",
    "unparametrize_",
    "get_mask",
    "masked_original",
    "set_mask_",
    "masked_tensors",
    "finalize_",
    "effective_state_dict",
    "effective_parameters",
    "mask_tied_",
    "tied_modules",
    "weight_key",
    "load_effective_state_",
    "plain_name",
    "bake_on_save_pretrained",
    "lowest_k",
    "nm_mask",
    "pack_bits",
    "unpack_bits",
]


class Mask(nn.Module):
    """Parametrization that zeroes the entries where ``mask`` is False."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        # a select rather than a multiply: inf/nan in a pruned slot stays out (and no inverted copy of the mask)
        return torch.where(self.mask, x, 0)


def _mask_module(module: nn.Module, name: str) -> Mask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, Mask):
            return p
    return None


def get_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    """Return the boolean keep-mask of ``module.<name>``, or None if unmasked."""
    m = _mask_module(module, name)
    return None if m is None else m.mask


def masked_original(module: nn.Module, name: str = "weight") -> Tensor:
    """The tensor stored for ``module.<name>``: under a mask its parametrization's original (whose pruned
    entries are zero), otherwise the attribute itself; never a masked copy computed just to be read."""
    if _mask_module(module, name) is not None:
        return module.parametrizations[name].original
    return getattr(module, name)


def set_mask_(module: nn.Module, mask: Tensor, name: str = "weight") -> Tensor:
    """Mask ``module.<name>`` in place; an existing mask is intersected (zeros stay zero).

    Returns the mask now in force.
    """
    current = masked_original(module, name)
    if mask.shape != current.shape:
        raise SecateursError(
            f"mask of shape {tuple(mask.shape)} does not fit {name} of shape {tuple(current.shape)}"
        )
    mask = mask.to(device=current.device, dtype=torch.bool)
    existing = _mask_module(module, name)
    if existing is not None:
        existing.mask.logical_and_(mask)
        mask = existing.mask
    else:
        # unsafe: skips evaluating the new parametrization once to check that it keeps the shape and dtype (a
        # masked copy of the weight, which a Mask always keeps)
        parametrize.register_parametrization(module, name, Mask(mask), unsafe=True)
    # Keep the stored original consistent with what the model computes (in place, no inverted mask).
    with torch.no_grad():
        original = module.parametrizations[name].original
        torch.where(mask, original, torch.zeros((), dtype=original.dtype, device=original.device), out=original)
    return mask


def masked_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor]]:
    """Yield ``(qualified_name, module, tensor_name, mask)`` for every masked tensor."""
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tname in module.parametrizations:
            m = _mask_module(module, tname)
            if m is not None:
                full = f"{mod_name}.{tname}" if mod_name else tname
                yield full, module, tname, m.mask


def finalize_(model: nn.Module) -> nn.Module:
    """Bake every mask into its weight and remove the parametrizations, in place.

    Returns the model. Afterwards the state dict has its plain keys again, the
    layers are of their original classes, and no pruning bookkeeping remains.
    The weight stays the same ``Parameter`` object, so optimizers keep working.
    """
    for full, module, tname, mask in list(masked_tensors(model)):
        if not parametrize.is_parametrized(module):
            continue  # baked with another tensor of its module
        if any(len(plist) != 1 or not isinstance(plist[0], Mask) for plist in module.parametrizations.values()):
            raise SecateursError(
                f"{full} has other parametrizations besides a pruning mask; "
                "remove those first (torch.nn.utils.parametrize.remove_parametrizations)"
            )
        unparametrize_(module, tname, mask)
    return model


def unparametrize_(module: nn.Module, tname: str, mask: Tensor) -> None:
    """Make ``module.<tname>`` a plain parameter again, its masked-out entries zeroed, in place; the
    module's other masked tensors (fused experts' stacks, say) are baked with it."""
    # Not torch's remove_parametrizations: it deletes the property from the
    # module's generated class, and deepcopy shares that class between copies,
    # so finalizing a copy would break the original. Swapping the instance back
    # to its base class touches only this instance (and so bakes all its tensors at once).
    masks = {name: plist[0].mask for name, plist in module.parametrizations.items()}
    masks[tname] = mask
    originals = {name: module.parametrizations[name].original for name in masks}
    with torch.no_grad():
        for name, original in originals.items():
            original.masked_fill_(~masks[name], 0)
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]
    for name, original in originals.items():
        module.register_parameter(name, original)


def plain_name(key: str) -> str:
    """A parameter's name with mask bookkeeping removed: ``conv.parametrizations.weight.original`` -> ``conv.weight``."""
    return key.replace("parametrizations.", "").replace(".original", "")


def _is_bookkeeping(key: str) -> bool:
    """True for state-dict keys and module names that belong to parametrizations."""
    return "parametrizations" in key.split(".")


def effective_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Return ``(state, masks)``: the state dict with plain keys and masks applied.

    ``state`` is what ``model.state_dict()`` would be after ``finalize_``
    (tied tensors stay one tensor object under each name); ``masks`` maps the
    masked tensors' plain names to their boolean masks.
    """
    state: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if not _is_bookkeeping(key):
            state[key] = value
    computed: dict[int, Tensor] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if not parametrize.is_parametrized(module):
            continue
        for tname, plist in module.parametrizations.items():
            full = f"{mod_name}.{tname}" if mod_name else tname
            key = id(plist.original) if hasattr(plist, "original") else id(plist)
            if key not in computed:
                with torch.no_grad():
                    computed[key] = getattr(module, tname).detach()
            state[full] = computed[key]
            m = _mask_module(module, tname)
            if m is not None:
                masks[full] = m.mask
    return state, masks


def weight_key(module: nn.Module, name: str = "weight") -> int:
    """Identity of a module's weight that survives masking (for finding tied weights)."""
    if parametrize.is_parametrized(module, name):
        return id(module.parametrizations[name].original)
    return id(getattr(module, name))


def tied_modules(model: nn.Module, name: str = "weight") -> dict[int, list[nn.Module]]:
    """Group the modules that hold ``name`` by the identity of that tensor."""
    groups: dict[int, list[nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        if parametrize.is_parametrized(module, name) or isinstance(
            getattr(module, "_parameters", {}).get(name), nn.Parameter
        ):
            bucket = groups.setdefault(weight_key(module, name), [])
            if all(m is not module for m in bucket):
                bucket.append(module)
    return groups


def mask_tied_(model: nn.Module, module: nn.Module, mask: Tensor, name: str = "weight") -> Tensor:
    """Mask ``module.<name>`` and every other module of ``model`` sharing that tensor."""
    mask = set_mask_(module, mask, name)
    for other in tied_modules(model, name).get(weight_key(module, name), []):
        if other is not module:
            set_mask_(other, mask, name)
    return mask


def effective_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(plain_name, tensor)`` for each distinct parameter, with masks applied."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        if _is_bookkeeping(mod_name):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if parametrize.is_parametrized(module):
            for tname, plist in module.parametrizations.items():
                originals = [p for n, p in plist.named_parameters(recurse=False)]
                if not originals or id(originals[0]) in seen:
                    continue
                seen.update(id(p) for p in originals)
                with torch.no_grad():
                    yield prefix + tname, getattr(module, tname).detach()
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield prefix + pname, p.detach()


def load_effective_state_(model: nn.Module, state: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Inverse of :func:`effective_state_dict`: apply ``masks`` (intersecting live ones), then copy ``state`` in.

    Parameters keep their identity, so an optimizer built on ``model`` stays valid.
    """
    for name, mask in masks.items():
        mod_name, _, tname = name.rpartition(".")
        mask_tied_(model, model.get_submodule(mod_name), mask, tname)
    targets: dict[str, Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if "parametrizations" not in parts:
            targets[key] = value
        elif parts[-1] == "original":
            i = parts.index("parametrizations")
            targets[".".join(parts[:i] + parts[i + 1 : -1])] = value
    missing = sorted(set(targets) ^ set(state))
    wrong = [k for k in targets if k in state and tuple(targets[k].shape) != tuple(state[k].shape)]
    if missing or wrong:
        raise SecateursError(
            f"the saved state does not fit this model (it differs at {(missing + wrong)[:3]}): "
            "use the model it was saved from"
        )
    with torch.no_grad():
        for key, value in targets.items():
            value.copy_(state[key])


def _save_pretrained_baked(self: nn.Module, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """``save_pretrained`` that writes the masked weights under their plain names (see below)."""
    if kwargs.get("state_dict") is None and not args and next(masked_tensors(self), None) is not None:
        kwargs["state_dict"] = effective_state_dict(self)[0]
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


_save_pretrained_baked.__name__ = "save_pretrained"  # pickle re-binds a bound method by its name


def bake_on_save_pretrained(model: nn.Module) -> nn.Module:
    """Make ``model.save_pretrained`` write masked weights with the masks applied.

    Stock transformers would save a masked weight as ``parametrizations.weight.original``
    and ``...mask`` keys, which its ``from_pretrained`` ignores: it re-initialises
    those weights at random with only a warning. On a transformers model this
    installs an instance-level ``save_pretrained`` that passes the effective state
    dict (plain names, pruned entries zero) instead; the model keeps its masks.
    Other models are returned unchanged. ``copy.deepcopy`` rebinds it to the copy.
    """
    if is_transformers_model(model) and "save_pretrained" not in vars(model):
        model.save_pretrained = types.MethodType(_save_pretrained_baked, model)
    return model


# -- building masks from scores, and storing them ---------------------------------------------------


def lowest_k(scores: Tensor, k: int) -> Tensor:
    """Boolean tensor, True at exactly ``k`` entries of lowest score (ties by position).

    Runs in linear time (``kthvalue``), which matters for global ranking over
    hundreds of millions of weights.
    """
    flat = scores.reshape(-1)
    out = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return out.view(scores.shape)
    if k >= flat.numel():
        return torch.ones_like(out).view(scores.shape)
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    out |= below
    need = k - int(below.sum())
    ties = (flat == threshold).nonzero().flatten()[:need]
    out[ties] = True
    return out.view(scores.shape)


def nm_mask(scores: Tensor, n: int, m: int, dim: int = 1) -> Tensor:
    """Boolean keep-mask with the ``n`` highest scores in every ``m`` along ``dim``."""
    moved = scores.movedim(dim, -1).contiguous()  # consecutive entries along ``dim`` form the groups
    groups = moved.reshape(-1, m)
    keep_idx = groups.topk(n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep_idx, True)
    return keep.reshape(moved.shape).movedim(-1, dim)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """A boolean ``mask`` as one uint8 per 8 entries (flattened, first entry in the high bit, zero-padded)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, shape: list[int]) -> Tensor:
    """The boolean mask of ``shape`` that :func:`pack_bits` packed into ``bits``."""
    numel = 1
    for s in shape:
        numel *= s
    unpacked = (bits.unsqueeze(1) & _BIT_WEIGHTS).ne(0).reshape(-1)
    return unpacked[:numel].reshape(shape)
