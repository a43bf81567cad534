"""Which modules a pruning method touches.

Selection is by module type, by qualified name (exact, prefix or glob), or by a
predicate ``filter_fn(module, name) -> bool``; never by sniffing class names
of whole models. The model's output layer is found from the model itself
(``get_output_embeddings`` for transformers, otherwise the last prunable layer
that runs in the forward pass) and is left alone unless asked.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import SecateursError
from .masks import Mask, weight_key
from .utils import eval_mode

__all__ = [
    "observe",
    "Selection", "Target", "find_output_layer", "input_dim", "prunable_types", "select_targets", "weight_names",
]

FilterFn = Callable[[nn.Module, str], bool]


def prunable_types() -> tuple[type[nn.Module], ...]:
    """Weight-bearing layer types pruned by default: Linear and convolutions.

    transformers' GPT-2-style ``Conv1D`` (a Linear with a transposed weight) is
    included when transformers is already imported; we never import it here.
    """
    types: list[type[nn.Module]] = [
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.MultiheadAttention,
    ]
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and hasattr(hf, "Conv1D"):
        types.append(hf.Conv1D)
    return tuple(types)


def weight_names(module: nn.Module) -> list[str]:
    """Names of the weight matrices a layer multiplies its input by."""
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None or parametrize.is_parametrized(module, "in_proj_weight"):
            return ["in_proj_weight"]  # packed q, k, v; out_proj is a Linear of its own
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return ["weight"]


def input_dim(module: nn.Module, tensor: str = "weight") -> int:
    """The dimension of ``module.<tensor>`` that runs over input features/channels."""
    hf = sys.modules.get("transformers.pytorch_utils")
    if hf is not None and isinstance(module, getattr(hf, "Conv1D", ())):
        return 0  # Conv1D stores weight as (in_features, out_features)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 0  # (in_channels, out_channels / groups, *kernel)
    return 1


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


@dataclass(kw_only=True)
class Selection:
    """Which layers a method prunes; shared by every method's config.

    Attributes:
        ignore: names (exact, a parent prefix, or a glob like ``"*.downsample.*"``)
            of modules to leave alone.
        include: if given, only modules matching one of these names are pruned.
        filter_fn: optional predicate ``(module, name) -> bool``; False skips it.
        prune_output_layer: also prune the model's final (output) layer.
        allow_nonfinite: prune even if some parameters hold NaN or inf. Off by
            default: scores computed from them are meaningless, so the model is
            refused (CLI: ``--allow-nonfinite``).
    """

    ignore: Sequence[str] = ()
    include: Sequence[str] | None = None
    filter_fn: FilterFn | None = field(default=None, repr=False, compare=False)
    prune_output_layer: bool = False
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str):
            self.ignore = tuple(s for s in self.ignore.split(",") if s)
        if isinstance(self.include, str):
            self.include = tuple(s for s in self.include.split(",") if s)
        self.ignore = tuple(self.ignore)
        if self.include is not None:
            self.include = tuple(self.include)


def declared_module(model: nn.Module, getter: str) -> nn.Module | None:
    """A module a model declares itself (transformers' ``get_input_embeddings`` and co.)."""
    fn = getattr(model, getter, None)
    if not callable(fn):
        return None
    try:
        found = fn()
    except (NotImplementedError, AttributeError):
        return None
    return found if isinstance(found, nn.Module) else None


def find_output_layer(model: nn.Module, example_inputs: Any = None) -> str | None:
    """Qualified name of the layer that produces the model's output, if one can be found."""
    names = {id(m): n for n, m in model.named_modules()}
    out = declared_module(model, "get_output_embeddings")
    if out is not None and id(out) in names:
        return names[id(out)]
    types = prunable_types()
    if example_inputs is not None:
        order: list[str] = []
        hooks = [
            m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
            for n, m in model.named_modules()
            if isinstance(m, types)
        ]
        observe(model, example_inputs, hooks)
        if order:
            return order[-1]
    last = None
    for n, m in model.named_modules():
        if isinstance(m, types):
            last = n
    return last


def call_model(model: nn.Module, example_inputs: Any, **options: Any) -> Any:
    """Run ``model`` on example inputs given as a tensor, a tuple, or a dict of kwargs (plus ``options``)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs, **options)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs, **options)
    return model(example_inputs, **options)


def observe(model: nn.Module, example_inputs: Any, hooks: list[Any]) -> Any:
    """One forward in eval mode without gradients, watched by ``hooks`` (handles), which are removed after."""
    try:
        with torch.no_grad(), eval_mode(model):
            return call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()


@dataclass
class Target:
    """One weight tensor a method prunes: ``module.<tensor>``."""

    name: str  # the module's name, plus ``.tensor`` when that is not ``weight``
    module_name: str
    module: nn.Module
    tensor: str = "weight"

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.tensor)


def select_targets(
    model: nn.Module,
    selection: Selection,
    *,
    example_inputs: Any = None,
    types: tuple[type[nn.Module], ...] | None = None,
) -> tuple[list[Target], dict[str, str]]:
    """Return ``(targets, skipped)``.

    ``targets`` lists the weight tensors to prune in model order; ``skipped``
    maps names of candidates left out to the reason. A tensor shared by several
    layers (tied weights) is one target; the other users are reported.
    """
    types = types or prunable_types()
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    all_names = [n for n, _ in model.named_modules()]
    for pattern in selection.ignore:
        if not any(_matches(n, pattern) for n in all_names):
            raise SecateursError(
                f"ignore name '{pattern}' matches no module of the model; "
                "check the spelling against `secateurs analyze` output"
            )
    if selection.include is not None:
        for pattern in selection.include:
            if not any(_matches(n, pattern) for n, _ in candidates):
                raise SecateursError(
                    f"include name '{pattern}' matches no prunable layer; "
                    "check the spelling against `secateurs analyze` output"
                )
    output = None if selection.prune_output_layer else find_output_layer(model, example_inputs)
    targets: list[Target] = []
    skipped: dict[str, str] = {}
    owner: dict[int, str] = {}  # tensor identity -> the target that prunes it
    for mod_name, module in candidates:
        if selection.include is not None and not any(_matches(mod_name, p) for p in selection.include):
            continue
        for tensor in weight_names(module):
            name = mod_name if tensor == "weight" else f"{mod_name}.{tensor}"
            reason = _unprunable_reason(module, tensor)
            if reason is not None:
                skipped[name] = reason
            elif any(_matches(mod_name, p) for p in selection.ignore):
                skipped[name] = "ignored"
            elif selection.filter_fn is not None and not selection.filter_fn(module, mod_name):
                skipped[name] = "filter_fn returned False"
            elif mod_name == output:
                skipped[name] = "output layer (set prune_output_layer=True to prune it)"
            elif weight_key(module, tensor) in owner:
                skipped[name] = f"shares its weight with {owner[weight_key(module, tensor)]} (masked together)"
            else:
                owner[weight_key(module, tensor)] = name
                targets.append(Target(name, mod_name, module, tensor))
    if not targets:
        hint = ""
        if output is not None and output in skipped and "output layer" in skipped[output]:
            hint = " (the output layer is left alone unless prune_output_layer=True / --prune-output-layer)"
        raise SecateursError(
            f"no layer left to prune after include/ignore/filter among {len(candidates)} candidate "
            f"layers{hint}: loosen the selection"
        )
    return targets, skipped


def _unprunable_reason(module: nn.Module, tensor: str) -> str | None:
    if parametrize.is_parametrized(module, tensor):
        if any(not isinstance(p, Mask) for p in module.parametrizations[tensor]):
            return f"{tensor} has another parametrization (e.g. weight_norm): remove it first"
    elif not isinstance(module._parameters.get(tensor), nn.Parameter):
        return f"{tensor} is not a parameter"
    if not getattr(module, tensor).is_floating_point():
        return f"{tensor} is not floating point"
    return None
