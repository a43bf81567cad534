"""The ``prune_`` verb and the registry of pruning methods keyed by config type."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from torch import nn

from ..cli_options import config_flags
from ..errors import SecateursError
from ..masks import bake_on_save_pretrained
from ..utils import describe_names, nonfinite_parameters
from .report import PruneReport

__all__ = ["register_method", "prune_", "method_names", "config_class", "check_finite"]


class Method(Protocol):
    def __call__(
        self, model: nn.Module, config: Any, *, example_inputs: Any = None, data: Any = None
    ) -> PruneReport: ...


_BY_TYPE: dict[type, Method] = {}
_BY_NAME: dict[str, type] = {}

C = TypeVar("C")


def register_method(config_cls: type[C]) -> Callable[[Method], Method]:
    """Register the function that applies ``config_cls`` to a model.

    The config must be a dataclass with a class attribute ``method`` naming it
    (the CLI's ``--method`` value). Registering a type or a name twice is an error.

    That is all a new method needs, in its own module: fields declared with
    :func:`secateurs.cli_options.option` become flags of ``secateurs prune`` (checked
    here: a malformed declaration is a ``TypeError`` now, not when the CLI runs). A config
    may also offer ``step_configs(model, steps, example_inputs)`` (the steps of
    ``prune --finetune-epochs``) and ``scan(model, data, ratios=, batches=, ...)`` with a
    class attribute ``amount`` naming the field of the fraction to remove
    (``secateurs sensitivity``); see :class:`~secateurs.Channels`.
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls.__name__} must be a dataclass to be a pruning config")
    name = getattr(config_cls, "method", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{config_cls.__name__} needs a class attribute `method: ClassVar[str]`")
    config_flags([config_cls])  # its flags are well formed

    def decorator(fn: Method) -> Method:
        if config_cls in _BY_TYPE or name in _BY_NAME:
            raise ValueError(f"pruning method '{name}' is registered twice")
        _BY_TYPE[config_cls] = fn
        _BY_NAME[name] = config_cls
        return fn

    return decorator


def method_names() -> list[str]:
    return sorted(_BY_NAME)


def config_class(name: str) -> type:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise SecateursError(
            f"unknown method '{name}': choose one of {', '.join(method_names())}"
        ) from None


def check_finite(model: nn.Module, config: Any) -> None:
    """Refuse a model with NaN or inf in its parameters unless ``config.allow_nonfinite``.

    Every criterion ranks by these values: NaN sorts arbitrarily and inf always
    stays, so the cut would be meaningless. :func:`prune_` calls this first.
    """
    if getattr(config, "allow_nonfinite", False):
        return
    bad = nonfinite_parameters(model)
    if bad:
        raise SecateursError(f"weights of {describe_names(bad)} contain NaN/inf: fix the model or pass "
                             "allow_nonfinite=True (CLI: --allow-nonfinite)")


def prune_(model: nn.Module, config: Any, *, example_inputs: Any = None, data: Any = None) -> PruneReport:
    """Prune ``model`` in place as ``config`` says and return a report.

    Args:
        model: the model to prune; changed in place.
        config: a method config such as ``Unstructured(sparsity=0.8)`` or ``NM(2, 4)``.
        example_inputs: a tensor, tuple or kwargs dict the model accepts; used to
            find the output layer and, for structured methods, to trace the model.
        data: an iterable of batches (``x`` or ``(x, y)``, e.g. a DataLoader) for
            data-driven criteria (Taylor, activations).

    Returns:
        A :class:`PruneReport` with one entry per layer.

    Example:
        >>> import torch, secateurs
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5))
        >>> round(report.sparsity, 2)
        0.5
    """
    fn = _BY_TYPE.get(type(config))
    if fn is None:
        raise SecateursError(
            f"{type(config).__name__} is not a pruning config: use one of "
            f"{', '.join(c.__name__ for c in _BY_TYPE)}"
        )
    check_finite(model, config)
    start = time.perf_counter()
    report = fn(model, config, example_inputs=example_inputs, data=data)
    report.seconds = time.perf_counter() - start
    bake_on_save_pretrained(model)  # a transformers model's own save_pretrained must not drop masked weights
    return report
