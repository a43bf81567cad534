"""Sparsity regularisers: one line in any training loop, so channels become prunable.

``loss = loss + reg()`` adds the penalty; its gradient is the usual
(sub)gradient of the norm. Both regularisers can grow their strength over
training (``growth``, in the spirit of Wang et al. 2021, "Neural Pruning via
Growing Regularization"): call ``reg.step()`` once per epoch.

- :class:`SlimmingRegularizer` is network slimming (Liu et al. 2017): L1 on
  the scales of BatchNorm layers; afterwards prune globally by the ``bn``
  importance.
- :class:`GroupLassoRegularizer` penalises the L2 norm of each coupled
  channel found by the structured engine, over *every* tensor slice the
  channel owns (the producing conv's filter, its BatchNorm, the consumer's
  input columns, and for a residual stage all the convs that share it), so
  whole removable units shrink together.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SecateursError

__all__ = ["GroupLassoRegularizer", "REGULARIZERS", "SlimmingRegularizer", "make_regularizer"]


@dataclass
class _Counts:
    """How many units fell below a threshold (for logs and reports)."""

    units: int
    below: int
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {"units": self.units, "below": self.below, "threshold": self.threshold}


class _Regularizer(abc.ABC):
    """A penalty on a vector of unit norms, with a strength that can grow."""

    def __init__(self, strength: float, growth: float) -> None:
        if strength < 0 or growth < 0:
            raise SecateursError(f"regulariser strength and growth must be >= 0, got {strength} and {growth}")
        self.strength = float(strength)
        self.growth = float(growth)

    def step(self) -> float:
        """Grow the strength by ``growth`` (call once per epoch); returns the new strength."""
        self.strength += self.growth
        return self.strength

    def norms(self) -> Tensor:
        """Current norm of every unit (detached), the quantity the penalty sums."""
        with torch.no_grad():
            return self._norms().detach()

    def __call__(self) -> Tensor:
        """``strength * sum of unit norms``, differentiable."""
        return self.strength * self._norms().sum()

    def below(self, threshold: float) -> _Counts:
        """How many units have a norm under ``threshold``."""
        n = self.norms()
        return _Counts(units=int(n.numel()), below=int((n < threshold).sum()), threshold=threshold)

    def state_dict(self) -> dict[str, float]:
        return {"strength": self.strength, "growth": self.growth}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.strength, self.growth = float(state["strength"]), float(state["growth"])

    @abc.abstractmethod
    def _norms(self) -> Tensor:
        """The norm of every penalised unit, differentiable."""


class SlimmingRegularizer(_Regularizer):
    """L1 penalty on the scale (gamma) of every affine BatchNorm layer.

    Args:
        model: the model (its BatchNorm layers are found once, here).
        strength: the penalty's weight (Liu et al. use 1e-5 to 1e-4).
        growth: added to ``strength`` by every :meth:`step`.
        ignore: names of BatchNorm modules to leave out.

    Example:
        >>> import torch, secateurs
        >>> from secateurs.zoo import DigitsCNN
        >>> model = DigitsCNN()
        >>> reg = secateurs.SlimmingRegularizer(model, strength=1e-4)
        >>> loss = model(torch.randn(4, 1, 8, 8)).logsumexp(1).mean() + reg()
        >>> reg.below(0.5).units  # 32 + 64 + 128 BatchNorm channels
        224
    """

    def __init__(self, model: nn.Module, strength: float = 1e-4, *, growth: float = 0.0,
                 ignore: tuple[str, ...] = ()) -> None:
        super().__init__(strength, growth)
        self.scales = [
            m.weight for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and name not in ignore
        ]
        if not self.scales:
            raise SecateursError("the model has no affine BatchNorm layer, so network slimming has nothing to "
                                 "penalise: use the group-lasso regulariser instead")

    def _norms(self) -> Tensor:
        return torch.cat([w.abs().reshape(-1) for w in self.scales])


class GroupLassoRegularizer(_Regularizer):
    """Sum over coupled channels of the L2 norm of everything the channel owns.

    The groups come from one trace of ``model`` on ``example_inputs`` (the same
    graph channel pruning uses), so a channel's norm spans every parameter slice
    that would be removed with it. Buffers (running statistics) do not count.

    Args:
        model: the model.
        example_inputs: inputs for one traced forward pass.
        strength: the penalty's weight (1e-4 to 1e-3 of a cross-entropy loss is typical).
        growth: added to ``strength`` by every :meth:`step`.
        frozen: parameter names to leave out of every group (e.g. the output layer's).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, strength: float = 1e-4, *, growth: float = 0.0,
                 frozen: dict[str, str] | None = None) -> None:
        from ..graph import build_graph

        super().__init__(strength, growth)
        graph = build_graph(model, example_inputs, frozen_tensors=frozen)
        params = dict(model.named_parameters())
        # (parameter, dim, (channels, k) index rows, first channel of its group in the flat norm vector)
        self.slices: list[tuple[Tensor, int, Tensor, int]] = []
        offset = 0
        for g in graph.groups:
            owned = [(params[m.tensor], m.dim, g.indices[m]) for m in g.members if m.tensor in params]
            if not owned:
                continue
            self.slices.extend((p, d, rows, offset) for p, d, rows in owned)
            offset += g.size
        if not offset:
            raise SecateursError("no prunable channel group found, so group lasso has nothing to penalise")
        self.units = offset

    def _norms(self) -> Tensor:
        squares = None
        for p, dim, rows, start in self.slices:
            per_index = p.movedim(dim, 0).reshape(p.shape[dim], -1).pow(2).sum(1)
            per_channel = per_index[rows.to(p.device)].sum(1)
            if squares is None:
                squares = p.new_zeros(self.units, dtype=torch.float32)
            squares = squares.index_add(0, torch.arange(start, start + len(rows), device=p.device),
                                        per_channel.float())
        # The epsilon keeps the gradient of sqrt finite for channels already at zero.
        return (squares + 1e-12).sqrt()


REGULARIZERS = ("bn-l1", "group-lasso")


def make_regularizer(name: str, model: nn.Module, *, strength: float, growth: float = 0.0,
                     example_inputs: Any = None) -> _Regularizer:
    """Build a regulariser by its CLI name: ``bn-l1`` (network slimming) or ``group-lasso``."""
    if name == "bn-l1":
        return SlimmingRegularizer(model, strength, growth=growth)
    if name == "group-lasso":
        if example_inputs is None:
            raise SecateursError("group lasso traces the model: pass example_inputs")
        return GroupLassoRegularizer(model, example_inputs, strength, growth=growth)
    raise SecateursError(f"unknown regulariser '{name}': choose one of {', '.join(REGULARIZERS)}")
