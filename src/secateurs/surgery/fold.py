"""Fold BatchNorm into the convolution or Linear layer that feeds it (for deployment).

In eval mode a BatchNorm is an affine map per channel, ``y = a * x + b`` with
``a = gamma / sqrt(var + eps)`` and ``b = beta - a * mean``. When ``x`` is the
output of a conv, scaling the conv's filters by ``a`` and setting its bias to
``a * bias + b`` gives the same result with one layer fewer, which saves a
full pass over the activation tensor.

Which BatchNorm reads which layer's output is observed on a real forward pass
(module hooks), not guessed from names or module order. A conv whose output
also feeds something else (a residual add that bypasses the norm, say) would
change that other consumer too; a final comparison of outputs catches that and
the model is restored.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..masks import masked_tensors
from ..selection import call_model, observe
from ..utils import eval_mode, first_tensor

__all__ = ["fold_batchnorm_", "foldable_pairs"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def foldable_pairs(model: nn.Module, example_inputs: Any) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names where the BatchNorm's input is exactly that layer's output.

    Layers and norms called more than once per forward (shared weights) are left out.
    """
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, int]] = {}
    alive: list[Tensor] = []  # keeps outputs alive so their ids stay unique during the pass
    calls: dict[str, int] = {}
    pairs: dict[str, str] = {}

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, Tensor):
            produced[id(output)] = (name, output._version)
            alive.append(output)

    def follow(module: nn.Module, inputs: Any) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        x = first_tensor(inputs)
        # same tensor, not modified in place since (an in-place ReLU or += in between is not foldable)
        if x is not None and id(x) in produced and produced[id(x)][1] == x._version:
            pairs[name] = produced[id(x)][0]

    hooks = []
    for module in model.modules():
        if isinstance(module, _FOLDABLE):
            hooks.append(module.register_forward_hook(record))
        elif isinstance(module, _NORMS) and module.track_running_stats and module.running_var is not None:
            hooks.append(module.register_forward_pre_hook(follow))
    observe(model, example_inputs, hooks)
    return [(layer, bn) for bn, layer in pairs.items() if calls.get(bn) == 1 and calls.get(layer) == 1]


def _fold_one(layer: nn.Module, bn: nn.Module) -> None:
    with torch.no_grad():
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - scale * bn.running_mean
        w = layer.weight
        layer.weight.mul_(scale.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(scale)
        new_bias = (scale * bias + shift).to(w.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorm_(model: nn.Module, example_inputs: Any, *, rtol: float = 1e-4) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm into its producer, in place; returns the folded pairs.

    The folded norms become ``nn.Identity``. The model must have no live masks
    (call :func:`secateurs.finalize_` first). The outputs are compared before and
    after (within ``10 * rtol`` of their largest magnitude; float rounding of the
    rescaled weights stays far below that). If they differ, some layer's output
    also feeds something besides its BatchNorm (a bypass the hooks cannot see):
    the pairs are then folded one at a time, each kept only if the outputs stay
    the same, and the others left as they were.
    """
    if any(True for _ in masked_tensors(model)):
        raise SecateursError("the model has live pruning masks: bake them in with secateurs.finalize_ before folding")
    pairs = foldable_pairs(model, example_inputs)
    if not pairs:
        return []

    def output() -> Tensor:
        with torch.no_grad(), eval_mode(model):
            return first_tensor(call_model(model, example_inputs)).float()

    before = output()
    tolerance = rtol * float(before.abs().max().clamp_min(1e-6)) * 10
    originals = {name: model.get_submodule(name) for pair in pairs for name in pair}

    def fold(layer_name: str, bn_name: str) -> None:
        layer = copy.deepcopy(originals[layer_name])
        _fold_one(layer, originals[bn_name])
        _set(model, layer_name, layer)
        _set(model, bn_name, nn.Identity())

    def undo(layer_name: str, bn_name: str) -> None:
        _set(model, layer_name, originals[layer_name])
        _set(model, bn_name, originals[bn_name])

    for pair in pairs:
        fold(*pair)
    if torch.allclose(output(), before, rtol=0, atol=tolerance):
        return pairs
    for pair in pairs:
        undo(*pair)
    folded = []
    for pair in pairs:
        fold(*pair)
        if torch.allclose(output(), before, rtol=0, atol=tolerance):
            folded.append(pair)
        else:
            undo(*pair)
    return folded
