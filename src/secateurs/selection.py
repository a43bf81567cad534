"""Which modules a pruning method touches.

Selection is by module type, by qualified name (exact, prefix or glob), or by a
predicate ``filter_fn(module, name) -> bool``; never by sniffing class names
of whole models. The model's output layer is found from the model itself
(``get_output_embeddings`` for transformers, otherwise the last prunable layer
that runs in the forward pass) and is left alone unless asked.

Every method resolves its config's :class:`Selection` against the model once
(:meth:`Selection.resolve`): names that match no module are refused there, and
the :class:`ResolvedSelection` answers for weight tensors (unstructured, N:M,
Wanda), channel groups (structured) and blocks (layer pruning) alike.
"""

from __future__ import annotations

import fnmatch
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .cli_options import option
from .errors import SecateursError
from .masks import Mask, masked_original, weight_key
from .utils import eval_mode

if TYPE_CHECKING:
    from .graph.blocks import Block
    from .graph.groups import Group

__all__ = [
    "observe", "matches", "ResolvedSelection",
    "Selection", "Target", "find_output_layer", "input_dim", "prunable_types", "select_targets", "stacked_weight_names",
    "weight_names",
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


def matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` is ``pattern``, lies inside it (a parent prefix), or fits it as a glob.

    Example:
        >>> matches("features.0", "features"), matches("layer1.0.conv1", "*.conv1"), matches("features", "feat")
        (True, True, False)
    """
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

    ignore: Sequence[str] = option((), metavar="NAME[,NAME]", help="modules to leave alone (names, prefixes, globs)")
    include: Sequence[str] | None = option(None, metavar="NAME[,NAME]",
                                           help="only these modules (names, prefixes, globs)")
    filter_fn: FilterFn | None = field(default=None, repr=False, compare=False)
    prune_output_layer: bool = option(False, help="also prune the final layer")
    allow_nonfinite: bool = option(False, help="prune even if some weights are NaN or inf (refused by default)")

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str):
            self.ignore = tuple(s for s in self.ignore.split(",") if s)
        if isinstance(self.include, str):
            self.include = tuple(s for s in self.include.split(",") if s)
        self.ignore = tuple(self.ignore)
        if self.include is not None:
            self.include = tuple(self.include)

    def resolve(self, model: nn.Module) -> ResolvedSelection:
        """This selection checked against ``model``: a name in ``ignore`` or ``include`` that matches
        no module is refused here, once, for every method."""
        return ResolvedSelection(self, model)


class ResolvedSelection:
    """A :class:`Selection` checked against one model; answers for tensors, channel groups and blocks.

    Example:
        >>> from secateurs.zoo import DigitsCNN
        >>> chosen = Selection(include=["features.0"]).resolve(DigitsCNN())
        >>> chosen.included("features.0"), chosen.included("features.3")
        (True, False)
    """

    def __init__(self, selection: Selection, model: nn.Module) -> None:
        self.selection = selection
        self.model = model
        self.modules = dict(model.named_modules())
        for kind, patterns in (("ignore", selection.ignore), ("include", selection.include or ())):
            for pattern in patterns:
                if not any(matches(n, pattern) for n in self.modules):
                    raise SecateursError(f"{kind} name '{pattern}' matches no module of the model; check the "
                                         "spelling against `secateurs analyze` output")

    def ignored(self, name: str) -> bool:
        """Whether module ``name`` matches an ``ignore`` pattern."""
        return any(matches(name, p) for p in self.selection.ignore)

    def included(self, name: str) -> bool:
        """Whether module ``name`` is among those ``include`` asks for (all modules without ``include``)."""
        include = self.selection.include
        return include is None or any(matches(name, p) for p in include)

    def refused(self, name: str, module: nn.Module | None = None) -> str | None:
        """Why ``ignore`` or ``filter_fn`` leave module ``name`` alone (None: they do not)."""
        if self.ignored(name):
            return "ignored"
        fn = self.selection.filter_fn
        if fn is not None and not fn(module if module is not None else self.modules[name], name):
            return "filter_fn returned False"
        return None

    def frozen_tensors(self) -> dict[str, str]:
        """Parameters and buffers of the modules ``ignore``/``filter_fn`` leave alone, with the reason
        (what a channel graph keeps whole)."""
        frozen: dict[str, str] = {}
        for mod_name, module in self.modules.items():
            reason = self.refused(mod_name, module)
            if reason is None:
                continue
            for tname, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                frozen[f"{mod_name}.{tname}" if mod_name else tname] = reason
        return frozen

    def groups(self, groups: Sequence[Group]) -> list[Group]:
        """The channel groups ``include`` picks: those with a tensor of an included module.

        ``include`` names layers, and a layer's channels come with everything coupled to them.
        """
        if self.selection.include is None:
            return list(groups)
        return [g for g in groups if any(self.included(m.tensor.rpartition(".")[0]) for m in g.members)]

    def blocks(self, blocks: Sequence[Block]) -> list[Block]:
        """The removable blocks the selection allows.

        A block is left alone when any module inside it is ignored; each ``include``
        name must be a block that can go, or it is refused.
        """
        chosen = []
        for b in blocks:
            if any(self.ignored(n) for n in self.modules if n == b.name or n.startswith(b.name + ".")):
                continue
            fn = self.selection.filter_fn
            if fn is not None and not fn(self.model.get_submodule(b.name), b.name):
                continue
            if self.included(b.name) and b.removable:
                chosen.append(b)
        for pattern in self.selection.include or ():
            if not any(matches(b.name, pattern) for b in chosen):
                why = next((b.reason for b in blocks if b.name == pattern), "it did not run in the forward")
                raise SecateursError(f"'{pattern}' cannot be removed: {why}, so an identity cannot stand in for it")
        return chosen

    def _routers(self) -> dict[str, int]:
        """Mixture-of-experts routers: a Linear beside an ``experts`` module, with one output per expert
        (the experts a ModuleList, or stacked in 3-D weights). Name -> number of experts."""
        found = {}
        for name, module in self.modules.items():
            if not isinstance(module, nn.Linear):
                continue
            parent, _, _ = name.rpartition(".")
            experts = self.modules.get(f"{parent}.experts" if parent else "experts")
            if experts is None:
                continue
            if isinstance(experts, nn.ModuleList):
                count = len(experts)
            else:
                stacks = [p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3]
                count = stacks[0] if stacks else 0
            if count > 1 and module.out_features == count:
                found[name] = count
        return found

    def _stacked_weights(self, types: tuple[type[nn.Module], ...]) -> dict[str, tuple[str, nn.Module, str, str]]:
        """3-D weights (one matrix per expert) of included modules of other types.
        Name -> (module name, module, tensor name, why a method that cannot prune them leaves them dense)."""
        found = {}
        for mod_name, module in self.modules.items():
            if isinstance(module, types) or not self.included(mod_name) or self.refused(mod_name, module):
                continue
            for pname, reason in _stacks(module):
                found[f"{mod_name}.{pname}" if mod_name else pname] = (mod_name, module, pname, reason)
        return found

    def targets(
        self, *, example_inputs: Any = None, types: tuple[type[nn.Module], ...] | None = None, stacked: bool = False
    ) -> tuple[list[Target], dict[str, str]]:
        """The weight tensors to prune and the candidates left out; see :func:`select_targets`."""
        selection = self.selection
        types = types or prunable_types()
        candidates = [(n, m) for n, m in self.modules.items() if isinstance(m, types)]
        stacks = self._stacked_weights(types)
        for pattern in selection.include or ():
            if not any(matches(n, pattern) for n, _ in candidates) and \
                    not (stacked and any(matches(mod_name, pattern) for mod_name, *_ in stacks.values())):
                raise SecateursError(f"include name '{pattern}' matches no prunable layer; check the spelling "
                                     "against `secateurs analyze` output")
        output = None if selection.prune_output_layer else find_output_layer(self.model, example_inputs)
        routers = self._routers()
        targets: list[Target] = []
        skipped: dict[str, str] = {}
        owner: dict[int, str] = {}  # tensor identity -> the target that prunes it
        for mod_name, module in candidates:
            if not self.included(mod_name):
                continue
            for tensor in weight_names(module):
                name = mod_name if tensor == "weight" else f"{mod_name}.{tensor}"
                reason = _unprunable_reason(module, tensor) or self.refused(mod_name, module)
                if reason is not None:
                    skipped[name] = reason
                elif mod_name == output:
                    skipped[name] = "output layer (set prune_output_layer=True to prune it)"
                elif mod_name in routers and not any(matches(mod_name, p) for p in selection.include or ()):
                    skipped[name] = (f"router of {routers[mod_name]} experts (pruning it changes which experts run): "
                                     "name it in include to prune it")
                elif weight_key(module, tensor) in owner:
                    skipped[name] = f"shares its weight with {owner[weight_key(module, tensor)]} (masked together)"
                else:
                    owner[weight_key(module, tensor)] = name
                    targets.append(Target(name, mod_name, module, tensor))
        for name, (mod_name, module, tensor, reason) in stacks.items():
            if stacked:
                targets.append(Target(name, mod_name, module, tensor, stacked=True))
            else:
                skipped[name] = reason
        position = {name: i for i, name in enumerate(self.modules)}
        targets.sort(key=lambda t: position[t.module_name])  # model order, stacks among the layers (stable)
        if not targets:
            hint = ""
            if output is not None and output in skipped and "output layer" in skipped[output]:
                hint = " (the output layer is left alone unless prune_output_layer=True / --prune-output-layer)"
            raise SecateursError(
                f"no layer left to prune after include/ignore/filter among {len(candidates)} candidate "
                f"layers{hint}: loosen the selection"
            )
        return targets, skipped


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


def no_cache_inputs(model: nn.Module, inputs: Any) -> Any:
    """A transformers model must not build a KV cache during calibration (a forward that only feeds hooks)."""
    if isinstance(inputs, dict) and "use_cache" not in inputs \
            and "use_cache" in inspect.signature(model.forward).parameters:
        return {**inputs, "use_cache": False}
    return inputs


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
    stacked: bool = False  # a 3-D stack of matrices, one per expert (fused mixture-of-experts weights)

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.tensor)


def select_targets(
    model: nn.Module,
    selection: Selection,
    *,
    example_inputs: Any = None,
    types: tuple[type[nn.Module], ...] | None = None,
    stacked: bool = False,
) -> tuple[list[Target], dict[str, str]]:
    """Return ``(targets, skipped)``.

    ``targets`` lists the weight tensors to prune in model order; ``skipped``
    maps names of candidates left out to the reason. A tensor shared by several
    layers (tied weights) is one target; the other users are reported. With ``stacked``, 3-D weights
    (one matrix per expert, in modules of other types) are targets too (``Target.stacked``).
    """
    return selection.resolve(model).targets(example_inputs=example_inputs, types=types, stacked=stacked)


def stacked_weight_names(model: nn.Module) -> list[str]:
    """Names of the 3-D stacks of weight matrices (fused mixture-of-experts weights) in ``model``, masked or not."""
    types = prunable_types()
    return [f"{mod_name}.{pname}" if mod_name else pname for mod_name, module in model.named_modules()
            if not isinstance(module, types) for pname, _ in _stacks(module)]


def _stacks(module: nn.Module) -> list[tuple[str, str]]:
    """``(tensor name, why a method that cannot prune it leaves it dense)`` of ``module``'s own stacks of
    weight matrices; a masked one is seen through its stored original (no masked copy is computed)."""
    masked = list(module.parametrizations) if parametrize.is_parametrized(module) else []
    tensors = [*module.named_parameters(recurse=False), *((n, masked_original(module, n)) for n in masked)]
    return [(name, reason) for name, p in tensors if (reason := _stacked_weight_reason(module, p)) is not None]


def _stacked_weight_reason(module: nn.Module, p: torch.Tensor) -> str | None:
    """Why a stack of weight matrices in a layer of another type is left dense (None: not such a stack)."""
    if p.dim() != 3 or not p.is_floating_point() or min(p.shape) < 2:
        return None  # a position embedding (1, tokens, width), a class token: not a stack of matrices
    return (f"a stack of {p.shape[0]} weight matrices in {type(module).__name__} (fused mixture-of-experts "
            "weights, say), which this method cannot prune: left dense (wanda, sparsegpt and unstructured with "
            "uniform allocation prune them expert by expert)")


def _unprunable_reason(module: nn.Module, tensor: str) -> str | None:
    if parametrize.is_parametrized(module, tensor):
        if any(not isinstance(p, Mask) for p in module.parametrizations[tensor]):
            return f"{tensor} has another parametrization (e.g. weight_norm): remove it first"
    elif not isinstance(module._parameters.get(tensor), nn.Parameter):
        return f"{tensor} is not a parameter"
    if not getattr(module, tensor).is_floating_point():
        return f"{tensor} is not floating point"
    return None
