"""Per-weight importance for unstructured and N:M pruning (higher = keep).

A criterion is an :class:`ElementImportance`: ``score(weight, context)`` gives one
score per entry of a weight, from the weight alone. The built-in names
(``magnitude``, ``random``) are instances in one registry,
:data:`ELEMENT_IMPORTANCE`; :func:`register_element_importance` adds your own, and
:class:`~secateurs.Unstructured` and :class:`~secateurs.NM` take a name or an instance.

Element-wise criteria are data-free on purpose: they also run where no data is
(streaming, gradual AGP pruning, N:M). Weights scored by calibration data
(Wanda's ``|w| * ||x||``, SparseGPT) are methods of their own
(:mod:`secateurs.methods.oneshot`): they measure each block's inputs on the model
as pruned so far, block by block, and SparseGPT also updates the weights.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import SecateursError
from .criteria import register_criterion, resolve_criterion

__all__ = ["ELEMENT_IMPORTANCE", "ElementContext", "ElementImportance", "element_importance", "element_scores",
           "register_element_importance"]


@dataclass
class ElementContext:
    """What an element-wise criterion may read besides the weight.

    Attributes:
        generator: random numbers (seeded by the config's ``seed``), shared by the weights of one
            pruning; None: torch's global generator.
    """

    generator: torch.Generator | None = None


class ElementImportance(abc.ABC):
    """An element-wise criterion: subclass it, name it and implement :meth:`score`.

    Register an instance with :func:`register_element_importance` to use it by name,
    or pass the instance to :class:`~secateurs.Unstructured` / :class:`~secateurs.NM`.

    Attributes:
        name: what configs, the CLI and reports call it.

    Example:
        >>> import torch, secateurs
        >>> from secateurs.importance import ElementImportance
        >>> class Squared(ElementImportance):
        ...     name = "squared"
        ...     def score(self, weight, context):
        ...         return weight.detach().float() ** 2
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.5, importance=Squared()))
        >>> report.layers[0].sparsity
        0.5
    """

    name: str = ""

    @abc.abstractmethod
    def score(self, weight: Tensor, context: ElementContext) -> Tensor:
        """One score per entry of ``weight`` (same shape; higher = keep)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class _Magnitude(ElementImportance):
    name = "magnitude"

    def score(self, weight: Tensor, context: ElementContext) -> Tensor:
        return weight.detach().abs().float()


class _Random(ElementImportance):
    name = "random"

    def score(self, weight: Tensor, context: ElementContext) -> Tensor:
        return torch.rand(weight.shape, generator=context.generator, dtype=torch.float32).to(weight.device)


ELEMENT_IMPORTANCE: dict[str, ElementImportance] = {}
"""Every element-wise criterion usable by name, built-in and registered: name -> :class:`ElementImportance`."""


def register_element_importance(criterion: ElementImportance | type[ElementImportance]) -> Any:
    """Make ``criterion`` usable by name (``Unstructured(importance=name)``, recipes, ``--importance``).

    Also a class decorator: on a subclass it registers an instance (built with no
    arguments) and returns the class unchanged.

    Args:
        criterion: an :class:`ElementImportance` with a ``name`` not registered yet.

    Returns:
        ``criterion``.
    """
    return register_criterion(criterion, ElementImportance, ELEMENT_IMPORTANCE, "element")


def element_importance(criterion: str | ElementImportance) -> ElementImportance:
    """The criterion a config names: a registered name, or an instance with a name of its own."""
    return resolve_criterion(criterion, ElementImportance, ELEMENT_IMPORTANCE)


register_element_importance(_Magnitude())
register_element_importance(_Random())


def element_scores(
    name: str | ElementImportance, weight: Tensor, mask: Tensor | None, generator: torch.Generator | None
) -> Tensor:
    """Score every entry of ``weight``; entries already masked out score ``-inf``
    so they are the first to go and earlier zeros are kept."""
    criterion = element_importance(name)
    scores = criterion.score(weight, ElementContext(generator))
    if not isinstance(scores, Tensor) or scores.shape != weight.shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise SecateursError(f"element importance '{criterion.name}' gave {got} for a weight of shape "
                             f"{tuple(weight.shape)}: score must return one value per weight (same shape)")
    if mask is not None:
        scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return scores
