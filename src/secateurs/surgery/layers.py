"""Delete whole modules from their ``nn.Sequential`` / ``nn.ModuleList``.

Deleting (not wrapping behind a flag) renumbers the container, so parameter
names change and the structure is recorded for :func:`secateurs.load`. A
transformers model also gets its config and per-layer indices updated:
``num_hidden_layers``, per-layer lists such as ``layer_types``, and every
``layer_idx`` attribute (the KV cache is indexed by it), so ``save_pretrained``
output reloads with a plain ``from_pretrained`` and generation with a cache works.
"""

from __future__ import annotations

from torch import nn

from ..errors import SecateursError
from ..provenance import CONFIG_STALE_ATTR
from ..utils import is_transformers_model
from .hf import config_misfits, own_config_

__all__ = ["drop_modules_"]

CONTAINERS = (nn.Sequential, nn.ModuleList)


def name_after_drop(name: str, paths: list[str]) -> str | None:
    """The name module ``name`` has after :func:`drop_modules_` (``paths``): None if it went with them.

    Index-named containers renumber their later entries; everything else keeps its name.
    """
    dropped = set(paths)
    old: list[str] = []
    new: list[str] = []
    for part in name.split("."):
        parent = ".".join(old)
        if (f"{parent}.{part}" if parent else part) in dropped:
            return None
        siblings = [p.rpartition(".")[2] for p in dropped if p.rpartition(".")[0] == parent]
        if part.isdigit() and siblings and all(s.isdigit() for s in siblings):
            part_new = str(int(part) - sum(int(s) < int(part) for s in siblings))
        else:
            part_new = part
        old.append(part)
        new.append(part_new)
    return ".".join(new)


def drop_modules_(model: nn.Module, paths: list[str]) -> None:
    """Delete the modules at ``paths`` (names before any deletion) from their containers.

    A module that is an attribute (not a container entry) is replaced by ``nn.Identity``.

    ``ModuleList`` and index-named ``Sequential`` entries are renumbered (as
    ``del seq[i]`` does); entries of a ``Sequential`` built from an ordered dict
    keep their names.
    """
    outermost = [p for p in paths if not any(p.startswith(other + ".") for other in paths)]  # inner ones go along
    by_container: dict[str, list[str]] = {}
    for path in outermost:
        parent, _, key = path.rpartition(".")
        by_container.setdefault(parent, []).append(key)
    own_config_(model)  # the count changes below: not in a config object other models share
    config_before = _config_snapshot(model)
    # deepest containers first: renumbering an outer list must not move an inner path
    for parent in sorted(by_container, key=lambda p: p.count(".") + bool(p), reverse=True):
        keys = by_container[parent]
        container = model.get_submodule(parent) if parent else model
        if not isinstance(container, CONTAINERS):
            for key in keys:  # an attribute, not a list entry: an identity takes its place
                if not isinstance(getattr(container, key, None), nn.Module):
                    raise SecateursError(f"'{parent}.{key}' is not a module of the model")
                setattr(container, key, nn.Identity())
            continue
        names = list(container._modules)
        missing = [k for k in keys if k not in names]
        if missing:
            raise SecateursError(f"'{parent}' has no entry '{missing[0]}'")
        gone = {names.index(k) for k in keys}
        kept = [i for i in range(len(names)) if i not in gone]
        if all(k.isdigit() for k in names):
            for index in sorted(gone, reverse=True):
                del container[index]  # renumbers, as ModuleList indexing needs
        else:
            for key in keys:
                delattr(container, key)
        _renumber_layer_idx(container, kept)
        _update_config(model, len(names), sorted(gone))
    _verify_config(model, config_before)


def _config_snapshot(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    return dict(vars(config)) if config is not None else None


def _verify_config(model: nn.Module, before: dict | None) -> None:
    """A transformers config must rebuild the new layer stack; otherwise restore it and say so."""
    config = getattr(model, "config", None)
    if before is None or not is_transformers_model(model):
        return
    if config_misfits(model):
        # e.g. num_hidden_layers is an alias of the encoder's count, but the decoder lost the layer:
        # the config cannot say this, so leave it as it was and report it
        config.__dict__.clear()
        config.__dict__.update(before)
        setattr(model, CONFIG_STALE_ATTR, True)


def _renumber_layer_idx(container: nn.Module, kept: list[int]) -> None:
    """Entry ``j`` (formerly ``kept[j]``) and its submodules get ``layer_idx = j`` where it was ``kept[j]``."""
    for new, (old, entry) in enumerate(zip(kept, container, strict=True)):
        for module in entry.modules():
            if type(getattr(module, "layer_idx", None)) is int and module.layer_idx == old:
                module.layer_idx = new


def _update_config(model: nn.Module, old_length: int, dropped: list[int]) -> None:
    config = getattr(model, "config", None)
    if config is None or getattr(config, "num_hidden_layers", None) != old_length:
        return
    config.num_hidden_layers = old_length - len(dropped)
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_length and key != "num_hidden_layers":
            setattr(config, key, [v for i, v in enumerate(value) if i not in set(dropped)])
