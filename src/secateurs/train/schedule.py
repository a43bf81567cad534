"""Gradual magnitude pruning during training (AGP, Zhu & Gupta 2017).

The schedule itself (:class:`AGP`, the cubic sparsity curve) lives with the pruning methods in
:mod:`secateurs.methods.schedule`, which the unstructured method's ``steps`` use too; it is
re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..errors import SecateursError
from ..methods import Unstructured, prune_
from ..methods.schedule import AGP

__all__ = ["AGP", "GradualPruner"]


class GradualPruner:
    """Apply an :class:`AGP` schedule with an unstructured method during training.

    Construction masks every target weight with nothing pruned yet (do it before
    wrapping the model in DDP); ``pruner(step)`` then shrinks the masks to the
    schedule's sparsity when ``step`` is a pruning step. Masks only ever grow (a pruned weight never returns),
    and they stay in force between pruning steps, so ``optimizer.step()``
    cannot revive a weight.

    Args:
        model: the model to prune (not a DDP wrapper: pass ``ddp.module``).
        schedule: the sparsity schedule.
        config: an :class:`~secateurs.Unstructured` config giving scope,
            importance and selection; its ``sparsity`` is replaced by the schedule's.
    """

    def __init__(self, model: nn.Module, schedule: AGP, config: Any = None) -> None:
        self.model = model
        self.schedule = schedule
        self.config = config if config is not None else Unstructured(sparsity=0.0)
        if not isinstance(self.config, Unstructured):
            raise SecateursError("gradual pruning uses the unstructured method: pass an Unstructured config")
        self.current = 0.0
        # Mask every target now, with nothing pruned: later steps then only shrink
        # existing masks in place. Registering a new parametrization after
        # DistributedDataParallel wrapped the model would detach the weights from
        # DDP's gradient hooks.
        prune_(model, dataclasses.replace(self.config, sparsity=0.0, threshold=None))

    def __call__(self, step: int) -> float | None:
        """Prune if ``step`` is a pruning step; returns the sparsity applied, or None."""
        if not self.schedule.is_pruning_step(step):
            return None
        target = self.schedule.sparsity(step)
        if target <= self.current:
            return None
        prune_(self.model, dataclasses.replace(self.config, sparsity=target, threshold=None))
        self.current = target
        return target
