"""Which modules can be removed whole: blocks that an identity can stand in for.

Found by running the model once with hooks on every entry of every
``nn.Sequential``/``nn.ModuleList`` (a runtime trace, like the channel graph):
an entry qualifies when it runs exactly once, its output has the shape of its
input (so the next entry still gets what it expects), and it holds at least
one weight layer. Residual blocks, inverted residuals with a skip, ConvNeXt
and ViT/Swin blocks and transformers' encoder/decoder layers all qualify with
no per-model code; the method then rehearses each removal on a meta copy.

Entries are grouped into *stages*: runs of consecutive entries of one
container producing the same output shape. A stage keeps at least one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..selection import observe, prunable_types
from ..utils import first_tensor

__all__ = ["Block", "find_blocks", "first_tensor", "repeated_blocks"]

CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass
class Block:
    """An entry of a container."""

    name: str
    stage: str  # ``container#k``: the k-th run of same-shape entries of the container; "" for an attribute
    removable: bool
    reason: str = ""  # why not removable
    params: int = 0
    position: int = 0  # index among the container's entries


def find_blocks(model: nn.Module, example_inputs: Any, extra: tuple[str, ...] = ()) -> list[Block]:
    """Every entry of every container that ran, with whether it may be removed (outermost first).

    ``extra`` names other modules (attributes, not container entries) to judge
    by the same rules; removing one replaces it with ``nn.Identity``.
    """
    entries: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, CONTAINERS):
            for key, child in module.named_children():
                entries.setdefault(id(child), f"{name}.{key}" if name else key)
    modules = dict(model.named_modules())
    for name in extra:
        if name in modules and name:
            entries.setdefault(id(modules[name]), name)
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[Any, Any]] = {}

    def hook(module: nn.Module, args: Any, kwargs: dict, out: Any) -> None:
        name = entries[id(module)]
        calls[name] = calls.get(name, 0) + 1
        x, y = first_tensor(args, kwargs), first_tensor(out)
        shapes[name] = (None if x is None else tuple(x.shape), None if y is None else tuple(y.shape))

    handles = [modules[n].register_forward_hook(hook, with_kwargs=True) for n in entries.values()]
    observe(model, example_inputs, handles)
    weighted = prunable_types() + (nn.Embedding,)
    blocks: list[Block] = []
    families = [(n, list(m.named_children())) for n, m in model.named_modules() if isinstance(m, CONTAINERS)]
    for name in extra:
        parent, _, key = name.rpartition(".")
        if name in modules and name and not isinstance(modules.get(parent), CONTAINERS):
            families.append((f"{parent}.{key}" if parent else key, [("", modules[name])]))
    for container_name, children in families:
        run, last_shape = -1, object()
        for position, (key, child) in enumerate(children):
            name = f"{container_name}.{key}" if container_name and key else container_name or key
            if name not in calls:
                continue  # never ran (or not reached): not ours to judge
            x_shape, y_shape = shapes[name]
            if y_shape != last_shape or x_shape != y_shape:
                run += 1
            last_shape = y_shape
            reason = ""
            if calls[name] != 1:
                reason = f"runs {calls[name]} times per forward"
            elif x_shape is None or x_shape != y_shape:
                reason = f"changes the shape {x_shape} -> {y_shape}"
            elif not any(isinstance(m, weighted) for m in child.modules()):
                reason = "holds no weight layer"
            params = sum(p.numel() for p in child.parameters())
            stage = f"{container_name}#{run}" if key else ""
            blocks.append(Block(name, stage, not reason, reason, params, position))
    # A container whose entries are removable yields to them: a stage of blocks
    # is not one block (removing the stage would take every block at once).
    removable = [b.name for b in blocks if b.removable]
    for b in blocks:
        if b.removable and isinstance(modules[b.name], CONTAINERS) and any(
                inner.startswith(b.name + ".") for inner in removable):
            b.removable, b.reason = False, "a container of removable blocks: its blocks are the candidates"
    # only the outermost removable entries: a block inside a removable block goes with it
    removable = [b.name for b in blocks if b.removable]
    for b in blocks:
        if b.removable and any(b.name.startswith(outer + ".") for outer in removable):
            b.removable, b.reason = False, "inside a removable block"
    return blocks


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The entries of the model's largest (by parameters) ModuleList of blocks of one type: its layers.

    Found from the module tree alone, without running the model, so it works on
    a skeleton whose weights are still on the meta device.
    """
    best: list[tuple[str, nn.Module]] = []
    best_size = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(b) for b in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best = [(f"{name}.{key}" if name else key, child) for key, child in module.named_children()]
                best_size = size
    return best
