"""Pruning schedules: gradual magnitude pruning during training (AGP).

Zhu & Gupta (2017), "To prune, or not to prune": sparsity rises from
``initial`` to ``final`` over ``n`` pruning events spaced ``every`` steps
apart, following a cubic that prunes fast while many redundant weights remain
and slowly near the end:

    s_t = final + (initial - final) * (1 - (t - start) / (n * every)) ** 3
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import SecateursError

__all__ = ["AGP", "GradualPruner"]


@dataclass(frozen=True)
class AGP:
    """The cubic sparsity schedule of automated gradual pruning.

    Attributes:
        final: sparsity reached at ``end`` and kept afterwards, in [0, 1).
        initial: sparsity at ``start``.
        start: first training step that prunes.
        end: step at which ``final`` is reached.
        every: prune every this many steps between ``start`` and ``end``.

    Example:
        >>> from secateurs.train import AGP
        >>> s = AGP(final=0.8, start=0, end=100, every=10)
        >>> [round(s.sparsity(t), 3) for t in (0, 50, 100, 200)]
        [0.0, 0.7, 0.8, 0.8]
    """

    final: float
    initial: float = 0.0
    start: int = 0
    end: int = 1000
    every: int = 100

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial <= self.final < 1.0:
            raise SecateursError(f"AGP needs 0 <= initial <= final < 1, got initial={self.initial}, final={self.final}")
        if self.start < 0 or self.end <= self.start:
            raise SecateursError(f"AGP needs 0 <= start < end, got start={self.start}, end={self.end}")
        if self.every < 1:
            raise SecateursError(f"AGP's every must be at least 1, got {self.every}")

    def sparsity(self, step: int) -> float:
        """Target sparsity at training step ``step``."""
        if step <= self.start:
            return self.initial
        if step >= self.end:
            return self.final
        progress = (step - self.start) / (self.end - self.start)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3

    def is_pruning_step(self, step: int) -> bool:
        """Whether the schedule prunes at ``step`` (``start``, then every ``every`` steps, and ``end``)."""
        return self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)


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
        from ..methods import Unstructured

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
        from ..methods import prune_

        prune_(model, dataclasses.replace(self.config, sparsity=0.0, threshold=None))

    def __call__(self, step: int) -> float | None:
        """Prune if ``step`` is a pruning step; returns the sparsity applied, or None."""
        from ..methods import prune_

        if not self.schedule.is_pruning_step(step):
            return None
        target = self.schedule.sparsity(step)
        if target <= self.current:
            return None
        prune_(self.model, dataclasses.replace(self.config, sparsity=target, threshold=None))
        self.current = target
        return target
